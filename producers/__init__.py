"""Producers: extract event records on processing nodes and send them to the broker."""
