"""The decoding entry points: :func:`decode_events` and :func:`decode_messages`.

:func:`decode_events` turns one message into a header and an ``EVENT_SCHEMA``
table. :func:`decode_messages` decodes several into one table: each message is
checked on its own, but the GUID index range and the key order are checked by
one numpy pass over all of them, and only a message that a pass flags gets its
own check, which names field, row and reason. At import, :func:`_self_check`
decodes a small message through the Arrow IPC shortcut and array by array and
turns the shortcut off if the two disagree.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from eventindex.records.codec import compression
from eventindex.records.codec.assembly import _ASSEMBLER, _FORMAT_DATA, _Decoded
from eventindex.records.codec.compression import _PACK, _b64_text
from eventindex.records.codec.header import MessageHeader
from eventindex.records.codec.message import _check_key_pieces, _decode_message
from eventindex.records.codec.wire import (
    _MASK_COLUMNS,
    _NUMBER_COLUMNS,
    _PIECE,
    _REFERENCES,
    DEFAULT_MAX_MESSAGE_BYTES,
    FORMAT_VERSION,
    GUID_LENGTH,
    MAX_COUNT,
    MessageError,
)
from eventindex.records.schema import EVENT_KEY, EVENT_SCHEMA

log = logging.getLogger(__name__)


def decode_events(
    payload: bytes | str, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> tuple[MessageHeader, pa.Table]:
    """Validate one message and return its header and its events, as an EVENT_SCHEMA table.

    Raises :class:`MessageError` naming the field, row and reason of the first
    problem found: a message is accepted whole or not at all. Messages over
    ``max_bytes`` are refused unread, and none may decode to more than
    ``MAX_EXPANSION * max_bytes`` bytes of masks (or of references).
    """
    header, (n, total, widths, pieces, *_) = _decode_message(payload, max_bytes)
    return header, pa.Table.from_batches([_ASSEMBLER.assemble(n, total, widths, pieces)])


@dataclass(frozen=True, slots=True)
class DecodedMessages:
    """What :func:`decode_messages` made of a batch of messages.

    ``headers[k]`` is the header of input message ``accepted[k]``; ``table`` holds
    the events of the accepted messages, message after message (``headers[k].count``
    rows each); ``errors`` says why each refused message (by input index) was refused.
    """

    headers: list[MessageHeader]
    accepted: list[int]
    table: pa.Table
    errors: list[tuple[int, MessageError]]


def decode_messages(
    payloads: Iterable[bytes | str], *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> DecodedMessages:
    """Validate several messages as :func:`decode_events` does, into one table.

    Each message is checked on its own and accepted whole or refused whole; the
    accepted ones are assembled into Arrow together, which costs a fraction of
    assembling each one: what a consumer that takes messages in batches wants.
    """
    decoded_messages: list[tuple[int, MessageHeader, _Decoded]] = []
    errors: list[tuple[int, MessageError]] = []
    for index, payload in enumerate(payloads):
        try:
            header, decoded = _decode_message(payload, max_bytes, defer=True)
        except MessageError as exc:
            errors.append((index, exc))
        else:
            decoded_messages.append((index, header, decoded))
    # Checks left to bulk passes over every message: the few that a bulk pass flags
    # get the message's own check, which names field, row and reason.
    decoded_only = [decoded for _, _, decoded in decoded_messages]
    flagged = {*_bad_guid_indices(decoded_only), *_unsorted_messages(decoded_only)}
    if flagged:
        for at in sorted(flagged, reverse=True):
            index, _, decoded = decoded_messages[at]
            try:
                _check_references(decoded)
                _check_keys(decoded)
            except MessageError as exc:
                errors.append((index, exc))
                del decoded_messages[at]
        errors.sort(key=lambda error: error[0])
    batches = [_ASSEMBLER.assemble_many(group) for group in _groups(decoded_messages)]
    return DecodedMessages(
        [header for _, header, _ in decoded_messages],
        [index for index, _, _ in decoded_messages],
        pa.Table.from_batches(batches, EVENT_SCHEMA),
        errors,
    )


def _check_references(decoded: _Decoded) -> None:
    if decoded.references is not None:
        decoded.references.check_indices()


def _check_keys(decoded: _Decoded) -> None:
    if not decoded.keys_checked:
        _check_key_pieces(decoded.pieces, one_run=True)


def _groups(decoded_messages: list[tuple[int, MessageHeader, _Decoded]]) -> list[list[_Decoded]]:
    """Runs of messages that one record batch can hold: the same mask widths and
    references layout, and Arrow's int32 offsets within range."""
    groups: list[list[_Decoded]] = []
    group: list[_Decoded] = []
    widths: tuple[int, ...] = ()
    layout: tuple[int, tuple[str, ...]] | None = None
    rows = references = format_bytes = 0
    for _, _, decoded in decoded_messages:
        rows += decoded.n
        references += decoded.total
        formats = _format_bytes(decoded)
        format_bytes += formats
        signature = None if decoded.references is None else decoded.references.signature()
        if (
            not groups
            or decoded.widths != widths
            or signature != layout
            or rows * max(widths, default=1) > MAX_COUNT
            or GUID_LENGTH * references > MAX_COUNT
            or format_bytes > MAX_COUNT
        ):
            group = [decoded]
            groups.append(group)
            widths, layout = decoded.widths, signature
            rows, references, format_bytes = decoded.n, decoded.total, formats
        else:
            group.append(decoded)
    return groups


def _format_bytes(decoded: _Decoded) -> int:
    """The bytes of format names a decoded message adds to a record batch."""
    if decoded.references is None:
        return len(decoded.pieces[_FORMAT_DATA])
    return decoded.n * sum(map(len, decoded.references.slot_formats))


def _bad_guid_indices(decoded: Sequence[_Decoded]) -> list[int]:
    """Which of the messages whose references were left for assembly have a GUID index
    beyond their table: one numpy pass over all of them instead of one per slot."""
    buffers, limits, sizes, owners = [], [], [], []
    for i, message in enumerate(decoded):
        references = message.references
        if references is None:
            continue
        for k, index in enumerate(references.guid_index):
            if type(index) is not int and references.sizes[k]:  # constants are checked as read
                buffers.append(array("I", index) if type(index) is list else index)
                limits.append(len(references.guids))
                sizes.append(references.sizes[k])
                owners.append(i)
    if not buffers:
        return []
    numbers = np.frombuffer(b"".join(buffers), np.uint32)
    beyond = np.flatnonzero(numbers >= np.repeat(np.array(limits, np.uint32), sizes))
    ends = np.cumsum(sizes)
    return sorted({owners[at] for at in np.searchsorted(ends, beyond, side="right").tolist()})


def _unsorted_messages(decoded: Sequence[_Decoded]) -> list[int]:
    """Which of the messages whose keys were left unchecked have events that do not
    strictly increase: one numpy pass over all of them instead of one per message."""
    pending = [i for i, d in enumerate(decoded) if not d.keys_checked]
    if not pending:
        return []
    piece = _PIECE[EVENT_KEY[1]]
    joined = np.frombuffer(b"".join([decoded[i].pieces[piece] for i in pending]), np.uint64)
    ends = np.cumsum([decoded[i].n for i in pending])
    not_increasing = joined[1:] <= joined[:-1]
    not_increasing[ends[:-1] - 1] = False  # the last event of one message, the first of the next
    at = np.flatnonzero(not_increasing)
    return sorted({pending[i] for i in np.searchsorted(ends, at, side="right").tolist()})


def _self_check() -> None:
    """Decode a small message both ways; if the IPC shortcut disagrees, build arrays instead.

    The shortcut leans on details of Arrow's IPC reader (alignment, metadata
    layout), so a pyarrow that differs costs speed, never correctness.
    """
    if not _ASSEMBLER.use_ipc:  # pragma: no cover
        return
    guid = "0A66C3F2-56B6-E511-8B7B-02163E011F0E"
    columns: dict[str, Any] = {name: [0, 1, 1] for name in _NUMBER_COLUMNS}
    columns["event_number"] = {"d": [2**64 - 3, 1, 1]}
    columns["run_number"] = {"k": 7}
    columns["mc_event_weight"] = {"k": 0.5}
    columns["is_testbeam"] = {"k": 1}
    columns |= {name: {"w": 3, "b64": "AQIDBAUGBwgJ"} for name in _MASK_COLUMNS}
    columns[_MASK_COLUMNS[0]] = {"w": 2, "k": "AQI="}
    columns[_REFERENCES] = {
        "n": [2, 0, 1],
        "g": [guid],
        "s": [
            {"f": ["RAW", "AOD"], "g": {"k": 0}, "p": {"d": [5, 2**31 - 1]}},
            {"f": "ESD", "g": [0], "p": [1]},
        ],
    }
    header = {
        "producer": "codec", "message_id": "self-check", "dataset": "self-check",
        "collection": "self-check", "guid": guid, "task_id": "0", "job_id": "0", "count": 3,
    }  # fmt: skip
    document = {"v": FORMAT_VERSION, "h": header, "c": columns}
    # packed arrays are memoryviews into the block: check them too
    if compression._ZSTD is not None:
        columns["bcid"] = columns["mc_event_weight"] = _PACK
        columns[_MASK_COLUMNS[1]] = {"w": 2, "z": "zstd"}
        block = array("H", [1, 2, 3]).tobytes() + array("f", [1, 2, 3]).tobytes() + b"abcdef"
        document["z"] = _b64_text(compression._ZSTD.compress(block))
    payload = orjson.dumps(document)
    try:
        _, fast = decode_events(payload)
        fast.validate(full=True)
        _ASSEMBLER.use_ipc = False
        _, slow = decode_events(payload)
        ok = fast.equals(slow)
    except (pa.ArrowException, MessageError, ValueError) as exc:  # pragma: no cover
        log.warning("Arrow IPC batch assembly failed its self-check: %s", exc)
        ok = False
    _ASSEMBLER.use_ipc = ok


_self_check()
