"""Arrow schemas of the records the platform stores.

Events follow the published ATLAS EventIndex record. Trigger masks are Arrow
``binary`` values of any width: bit ``i`` is bit ``i % 8`` (least significant
first) of byte ``i // 8``, so a 256-bit L1 mask is 32 bytes and an HLT mask is
as wide as its menu. References hold, for every processing stage and format
that has the event, the file GUID and the event's position (entry) in it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator


class RecordKind(enum.StrEnum):
    EVENTS = "events"
    OBJECTS = "objects"


EVENT_KEY: tuple[str, ...] = ("run_number", "event_number")
OBJECT_KEY: tuple[str, ...] = ("object_id",)

TRIGGER_MASK_FIELDS: tuple[str, ...] = ("l1_tbp", "l1_tap", "l1_tav", "hlt_passed")

REFERENCE_TYPE = pa.struct(
    [
        pa.field("format", pa.string(), nullable=False),
        pa.field("guid", pa.string(), nullable=False),
        pa.field("position", pa.uint64(), nullable=False),
    ]
)

EVENT_SCHEMA = pa.schema(
    [
        pa.field("run_number", pa.uint32(), nullable=False),
        pa.field("event_number", pa.uint64(), nullable=False),
        pa.field("lumi_block", pa.uint32(), nullable=False),
        pa.field("timestamp", pa.uint32(), nullable=False),
        pa.field("timestamp_ns", pa.uint32(), nullable=False),
        pa.field("bcid", pa.uint16(), nullable=False),
        pa.field("lvl1_id", pa.uint32(), nullable=False),
        pa.field("is_simulation", pa.bool_(), nullable=False),
        pa.field("is_calibration", pa.bool_(), nullable=False),
        pa.field("is_testbeam", pa.bool_(), nullable=False),
        pa.field("mc_channel_number", pa.uint32(), nullable=False),
        pa.field("mc_event_weight", pa.float32(), nullable=False),
        pa.field("l1_tbp", pa.binary(), nullable=False),
        pa.field("l1_tap", pa.binary(), nullable=False),
        pa.field("l1_tav", pa.binary(), nullable=False),
        pa.field("hlt_passed", pa.binary(), nullable=False),
        pa.field("smk", pa.uint32(), nullable=False),
        pa.field("l1psk", pa.uint32(), nullable=False),
        pa.field("hltpsk", pa.uint32(), nullable=False),
        pa.field("references", pa.list_(REFERENCE_TYPE), nullable=False),
    ]
)

OBJECT_SCHEMA = pa.schema(
    [
        pa.field("object_id", pa.int64(), nullable=False),
        pa.field("ra", pa.float64(), nullable=False),
        pa.field("dec", pa.float64(), nullable=False),
    ]
)


def _with_extra(base: pa.Schema, extra: Mapping[str, pa.DataType] | None) -> pa.Schema:
    if not extra:
        return base
    clash = set(extra) & set(base.names)
    if clash:
        raise ValueError(f"extra columns clash with the record schema: {sorted(clash)}")
    return pa.schema(list(base) + [pa.field(name, dtype) for name, dtype in extra.items()])


def event_schema_with(extra: Mapping[str, pa.DataType] | None = None) -> pa.Schema:
    """The event schema plus extension columns (the Extender's vertical parts)."""
    return _with_extra(EVENT_SCHEMA, extra)


def object_schema_with(extra: Mapping[str, pa.DataType] | None = None) -> pa.Schema:
    """The object schema plus catalog-specific columns (magnitudes, fluxes, ...)."""
    return _with_extra(OBJECT_SCHEMA, extra)


def key_columns(kind: RecordKind) -> tuple[str, ...]:
    """The collection key of a record kind, in sort order."""
    return EVENT_KEY if kind is RecordKind.EVENTS else OBJECT_KEY


def mask_bits_set(mask: bytes) -> list[int]:
    """Bit numbers set in a trigger mask (bit i = byte i//8, bit i%8)."""
    bits = []
    for byte_index, value in enumerate(mask):
        remaining = value
        while remaining:
            low = remaining & -remaining
            bits.append(byte_index * 8 + low.bit_length() - 1)
            remaining ^= low
    return bits


class TriggerMenu(BaseModel):
    """A trigger menu: which trigger each bit means under one configuration key.

    ``key`` is the super master key (SMK) that the event records carry; ``level``
    is ``L1`` or ``HLT``. Bits mean nothing without the menu of their key.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: int = Field(ge=0, lt=2**32)
    level: str = Field(pattern="^(L1|HLT)$")
    bits: dict[int, str]

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, bits: dict[int, str]) -> dict[int, str]:
        names: set[str] = set()
        for bit, name in bits.items():
            if bit < 0:
                raise ValueError(f"bit {bit}: bit numbers are non-negative")
            if not name:
                raise ValueError(f"bit {bit}: empty trigger name")
            if name in names:
                raise ValueError(f"bit {bit}: trigger name {name!r} is used twice")
            names.add(name)
        return bits

    def bit_of(self, name: str) -> int:
        for bit, trigger in self.bits.items():
            if trigger == name:
                return bit
        raise KeyError(f"trigger {name!r} is not in the {self.level} menu of key {self.key}")

    @property
    def width(self) -> int:
        """Mask width in bits, rounded up to whole bytes."""
        top = max(self.bits, default=-1) + 1
        return ((top + 7) // 8) * 8
