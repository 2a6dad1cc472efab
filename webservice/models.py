"""Request and response bodies, with the examples shown at ``/docs``.

Responses are built from the Reader's own ``to_dict()`` output and sent as they
are; these models document them (and let schemathesis check them).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

from eventindex.query.triggers import expression_pattern
from eventindex.records.schema import EVENT_SCHEMA
from webservice.options import MAX_EVENT_NUMBER, MAX_RUN_NUMBER

EXAMPLE_COLLECTION = "data15_13TeV.physics_Main"
EXAMPLE_DATASET = "data15_13TeV.00284484.physics_Main.merge.AOD.r7562_p2521"
EXAMPLE_GUID = "f9223f1e-5d25-4f79-bab1-b524a1d53585"


def _json_integer(value: object) -> object:
    """JSON integers, and numbers like ``7.0`` (JSON Schema counts them as integers) while
    a double holds them exactly; strings and booleans are refused, not converted."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        raise PydanticCustomError(
            "int_precision", "Input should be written as an integer: a float loses digits"
        )
    raise PydanticCustomError("int_type", "Input should be a valid integer")


# Constraints before the validator, or they leave the JSON schema as "ge"/"le".
_INTEGER = BeforeValidator(_json_integer)
RunNumber = Annotated[int, Field(ge=0, le=MAX_RUN_NUMBER), _INTEGER]
EventNumber = Annotated[int, Field(ge=0, le=MAX_EVENT_NUMBER), _INTEGER]
# JavaScript's Number.MAX_SAFE_INTEGER: more rows than anyone can read, exact in any client.
MAX_ROW_LIMIT = 2**53 - 1
RowLimit = Annotated[int, Field(ge=1, le=MAX_ROW_LIMIT), _INTEGER]
EventKey = tuple[RunNumber, EventNumber]
# Data formats as ATLAS names them (RAW, AOD, DAOD_PHYS), as the wire codec checks them.
FORMAT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
FormatName = Annotated[str, StringConstraints(pattern=FORMAT_PATTERN)]
# Bounds the fast paths (routes/events.py) check as the models do.
MAX_COLLECTION_CHARS = 256
MAX_DATASET_CHARS = 512
MAX_FORMATS = 64
DatasetPattern = Annotated[str, StringConstraints(min_length=1, max_length=MAX_DATASET_CHARS)]
CollectionName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_COLLECTION_CHARS)]
EVENT_COLUMNS: tuple[str, ...] = tuple(EVENT_SCHEMA.names)


def _known_column(name: str) -> str:
    if name not in EVENT_COLUMNS:
        raise ValueError(f"unknown column {name!r}; an event has {', '.join(EVENT_COLUMNS)}")
    return name


ColumnName = Annotated[
    str,
    AfterValidator(_known_column),
    WithJsonSchema({"type": "string", "enum": list(EVENT_COLUMNS)}),
]
MAX_EXPRESSION_CHARS = 4096
EXAMPLE_EXPRESSION = "HLT_mu4_imedium OR (L1_EM15VH AND NOT L1_XE50)"
# The schema states the grammar (names with an underscore, parentheses one deep) for
# clients; the parser itself checks every expression and names the bad token.
EXPRESSION_PATTERN = expression_pattern(1)
EXPRESSION_DESCRIPTION = (
    "Trigger names with AND, OR, NOT (or &, |, !) and parentheses. L1 items mean their "
    "after-veto bit; `L1_EM12:TBP` or `:TAP` the other masks."
)
GUID_PATTERN = r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$"


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LookupRequest(RequestBody):
    """Many events at once; results come back in the order asked."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "collection": EXAMPLE_COLLECTION,
                    "events": [[284484, 191438], [284484, 7]],
                    "formats": ["AOD"],
                    "dataset": None,
                }
            ]
        }
    )

    collection: CollectionName | None = Field(
        None, description="The event collection; may be omitted when the catalog holds one."
    )
    events: list[EventKey] = Field(
        min_length=1,
        description="`[run_number, event_number]` pairs: at least one, at most the service's "
        "limit (100,000 by default; more is refused with 413).",
    )
    formats: list[FormatName] | None = Field(
        None, max_length=MAX_FORMATS, description="Only locations of these formats."
    )
    dataset: DatasetPattern | None = Field(
        None, description="Only datasets whose names match this glob, e.g. `*.AOD.*`."
    )


class SelectRequest(RequestBody):
    """Every event of a run range (or those passing a trigger expression), streamed as NDJSON."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "collection": EXAMPLE_COLLECTION,
                    "run_min": 284484,
                    "run_max": 284484,
                    "dataset": "*.daq.RAW",
                    "trigger": EXAMPLE_EXPRESSION,
                    "columns": ["run_number", "event_number", "lumi_block"],
                    "limit": 10,
                }
            ]
        }
    )

    collection: CollectionName | None = Field(
        None, description="The event collection; may be omitted when the catalog holds one."
    )
    run_min: RunNumber = Field(description="First run number (inclusive).")
    run_max: RunNumber = Field(description="Last run number (inclusive), at least `run_min`.")
    dataset: DatasetPattern | None = Field(
        None, description="Only datasets whose names match this glob."
    )
    trigger: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_EXPRESSION_CHARS,
        json_schema_extra={"pattern": EXPRESSION_PATTERN},
        description="Only events passing this trigger expression, decoded run by run with "
        f"the menu of the run's SMK. {EXPRESSION_DESCRIPTION}",
    )
    columns: list[ColumnName] | None = Field(
        None, min_length=1, max_length=256, description="Columns of each row (default: all)."
    )
    limit: RowLimit | None = Field(None, description="Stop after this many rows.")

    @field_validator("run_max")
    @classmethod
    def _not_below_run_min(cls, run_max: int, info: ValidationInfo) -> int:
        run_min = info.data.get("run_min")
        if run_min is not None and run_max < run_min:
            raise ValueError(f"run_max {run_max} is below run_min {run_min}")
        return run_max


class EventLocation(BaseModel):
    """Where one copy of an event lives."""

    dataset: str
    format: str
    processing_tag: str
    guid: str
    position: int


class PickedEvent(BaseModel):
    """One event: its attributes and every copy of it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "collection": EXAMPLE_COLLECTION,
                    "run_number": 284484,
                    "event_number": 191438,
                    "attributes": {"lumi_block": 3, "timestamp": 1433117048, "bcid": 672},
                    "locations": [
                        {
                            "dataset": EXAMPLE_DATASET,
                            "format": "AOD",
                            "processing_tag": "r7562_p2521",
                            "guid": EXAMPLE_GUID,
                            "position": 0,
                        }
                    ],
                }
            ]
        }
    )

    collection: str
    run_number: int
    event_number: int
    attributes: dict[str, Any]
    locations: list[EventLocation]


class LookupResponse(BaseModel):
    """``results[i]`` answers ``events[i]`` (``null`` when no dataset holds it)."""

    results: list[PickedEvent | None]
    found: int = Field(description="How many of the events were found.")
    missing: list[tuple[int, int]] = Field(description="The pairs that were not found.")


class FileEvent(BaseModel):
    run_number: int
    event_number: int
    position: int = Field(description="Entry number of the event in the file.")


class FileEvents(BaseModel):
    """Every event of one file, with its entry number in that file."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "guid": EXAMPLE_GUID,
                    "format": "AOD",
                    "dataset": EXAMPLE_DATASET,
                    "processing_tag": "r7562_p2521",
                    "count": 2,
                    "events": [
                        {"run_number": 284484, "event_number": 191438, "position": 0},
                        {"run_number": 284484, "event_number": 191460, "position": 1},
                    ],
                }
            ]
        }
    )

    guid: str
    format: str
    dataset: str = Field(description="The dataset the file belongs to.")
    processing_tag: str
    count: int = Field(description="Number of events.")
    events: list[FileEvent] = Field(description="The events, by position.")


class DatasetSummary(BaseModel):
    """A dataset with the totals of its committed files."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": EXAMPLE_DATASET,
                    "collection": EXAMPLE_COLLECTION,
                    "format": "AOD",
                    "processing_tag": "r7562_p2521",
                    "project": "data15_13TeV",
                    "stream": "physics_Main",
                    "upstream": "data15_13TeV.00284484.physics_Main.daq.RAW",
                    "files": 1,
                    "rows": 576,
                    "bytes": 39205,
                    "key_min": [284484, 191438],
                    "key_max": [284484, 250131],
                    "created_at": 1795316182.9,
                }
            ]
        }
    )

    name: str
    collection: str
    format: str
    processing_tag: str
    project: str
    stream: str
    upstream: str | None
    files: int = Field(description="Committed files (masters, extensions and indexes).")
    rows: int = Field(description="Rows in those files.")
    bytes: int = Field(description="Bytes of those files.")
    key_min: list[int] | None = Field(description="Smallest key in the dataset.")
    key_max: list[int] | None = Field(description="Largest key in the dataset.")
    created_at: float


class TagFileEntry(BaseModel):
    """One map-file of a dataset, in any state."""

    file_id: str
    kind: str
    part: str
    uri: str
    rows: int
    bytes: int
    checksum: str
    key_min: list[int]
    key_max: list[int]
    state: str
    created_at: float
    committed_at: float | None
    supersedes: list[str]


class DatasetDetail(BaseModel):
    dataset: DatasetSummary
    files: list[TagFileEntry]


class Health(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"status": "ok", "version": "0.1.0", "collections": 1}]}
    )

    status: str = Field(description="`ok` when the catalog answers.")
    version: str
    collections: int = Field(description="Collections in the catalog.")


class RefreshResult(BaseModel):
    refreshed: bool
    reader: dict[str, int] = Field(description="The Reader's statistics after the refresh.")
