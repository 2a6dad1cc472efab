"""EventIndex: catalogue every event and object a large experiment produces."""

__version__ = "0.1.0"
