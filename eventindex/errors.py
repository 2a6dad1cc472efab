"""The project's exception hierarchy: every layer raises these, never a backend's own."""


class EventIndexError(Exception):
    """Base class of every error the platform raises on purpose."""


class ConfigError(EventIndexError):
    """The configuration has an unknown key or a bad value."""


class ValidationError(EventIndexError):
    """Input records or messages break the schema; the message says field, row and reason."""


class StorageError(EventIndexError):
    """A map-file is missing, corrupt or cannot be written."""


class CatalogError(EventIndexError):
    """The catalog backend failed or was asked for something inconsistent."""


class NotFoundError(CatalogError):
    """A collection, dataset or file the caller named does not exist."""


class AlreadyExistsError(CatalogError):
    """An entity with that name or id already exists."""


class MissingExtraError(EventIndexError):
    """An optional dependency is needed; the message names the extra to install."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the Python package {package!r}: pip install 'eventindex[{extra}]'"
        )
        self.package = package
        self.extra = extra
