"""Record schemas (events, objects, trigger menus) and the producer→consumer wire codec."""

from eventindex.records.schema import (
    EVENT_KEY,
    EVENT_SCHEMA,
    OBJECT_KEY,
    OBJECT_SCHEMA,
    REFERENCE_TYPE,
    TRIGGER_MASK_FIELDS,
    RecordKind,
    TriggerMenu,
    event_schema_with,
    key_columns,
    mask_bits_set,
    object_schema_with,
)

__all__ = [
    "EVENT_KEY",
    "EVENT_SCHEMA",
    "OBJECT_KEY",
    "OBJECT_SCHEMA",
    "REFERENCE_TYPE",
    "TRIGGER_MASK_FIELDS",
    "RecordKind",
    "TriggerMenu",
    "event_schema_with",
    "key_columns",
    "mask_bits_set",
    "object_schema_with",
]
