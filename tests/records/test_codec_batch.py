"""decode_messages (several messages into one table), the zstd block's strictness across
threads, and how fast and how full encode_message_batches cuts messages."""

from __future__ import annotations

import binascii
import dataclasses
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pyarrow as pa
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from eventindex.records import codec
from eventindex.records.codec import (
    DecodedMessages,
    MessageError,
    decode_events,
    decode_messages,
    encode_events,
    encode_message_batches,
)
from eventindex.records.schema import EVENT_SCHEMA
from tests.records.test_codec import (
    PLAIN,
    VALID,
    events_of,
    make_events,
    make_header,
    needs_zstd,
    packed,
    plain,
    realistic_table,
    replace,
)


def messages_of(table: pa.Table, target: int = 6_000, version: int = 2) -> list[bytes]:
    template = make_header(0, message_id="batch", version=version)
    return [payload for _, payload in encode_message_batches(table, template, target)]


def one_by_one(payloads: Sequence[bytes | str]) -> pa.Table:
    return pa.concat_tables([decode_events(payload)[1] for payload in payloads])


def test_a_batch_decodes_to_the_tables_of_its_messages_laid_end_to_end() -> None:
    table = realistic_table(900)
    payloads = messages_of(table)
    assert len(payloads) > 3
    result = decode_messages(payloads)
    assert isinstance(result, DecodedMessages)
    assert result.errors == []
    assert result.accepted == list(range(len(payloads)))
    assert [h.message_id for h in result.headers] == [f"batch:{i}" for i in range(len(payloads))]
    assert sum(h.count for h in result.headers) == table.num_rows
    result.table.validate(full=True)
    assert result.table.schema == EVENT_SCHEMA
    assert result.table.equals(table)
    assert result.table.num_rows == one_by_one(payloads).num_rows


@pytest.mark.parametrize("version", [1, 2])
def test_varying_flags_references_and_formats_join_across_messages(version: int) -> None:
    # random booleans (bit-packed pieces), 0-3 references (rebased offsets), mixed formats
    table = make_events(300, references=[i % 4 for i in range(300)], seed=3)
    payloads = messages_of(table, 5_000, version)
    assert len(payloads) > 3
    result = decode_messages(payloads)
    assert result.table.equals(table)
    result.table.validate(full=True)


def test_messages_of_several_versions_and_mask_widths_share_a_batch() -> None:
    narrow = make_events(40, widths=(2, 2, 2, 4), seed=1)
    wide = make_events(40, widths=(32, 32, 32, 128), seed=2, event_base=10**6)
    payloads = [
        encode_events(narrow, make_header(40, message_id="a")),
        encode_events(wide, make_header(40, message_id="b", version=1)),
        encode_events(narrow.slice(0, 7), make_header(7, message_id="c")),
        encode_events(wide.slice(0, 0), make_header(0, message_id="d")),
    ]
    result = decode_messages(payloads)
    assert [h.message_id for h in result.headers] == ["a", "b", "c", "d"]
    assert result.table.equals(one_by_one(payloads))
    # widths differ, so the table is in more than one record batch
    assert result.table.column("l1_tbp").num_chunks >= 2


def test_bad_messages_are_refused_alone_with_the_error_decode_events_gives() -> None:
    good = messages_of(realistic_table(300), 5_000)
    bad_json = b"{not json"
    bad_row = json.dumps(plain(bcid=[1, 2, "3", *range(17)])).encode()
    payloads = [good[0], bad_json, good[1], bad_row, *good[2:]]
    result = decode_messages(payloads)
    assert result.accepted == [0, 2, *range(4, len(payloads))]
    assert [index for index, _ in result.errors] == [1, 3]
    for index, error in result.errors:
        with pytest.raises(MessageError) as expected:
            decode_events(payloads[index])
        assert (error.field, error.row, error.reason) == (
            expected.value.field,
            expected.value.row,
            expected.value.reason,
        )
    assert result.errors[1][1].field == "bcid"
    assert result.errors[1][1].row == 2
    assert result.table.equals(one_by_one([payloads[i] for i in result.accepted]))


@needs_zstd
def test_keys_checked_in_bulk_refuse_exactly_the_messages_decode_events_refuses() -> None:
    events = events_of("event_number")
    duplicate = list(events)
    duplicate[15] = duplicate[4]
    shifted = [e + 10**6 for e in events]
    in_two_runs = packed(
        plain(run_number={"r": [1, 10, 2, 10]}, event_number=duplicate), ["event_number"]
    )
    payloads: list[str | bytes] = [
        json.dumps(packed(plain(event_number=events), ["event_number"])),  # increasing
        json.dumps(packed(plain(event_number=duplicate), ["event_number"])),  # refused
        json.dumps(packed(plain(event_number=shifted[::-1]), ["event_number"])),  # decreasing
        json.dumps(in_two_runs),  # the same event number in two runs: fine
        json.dumps(packed(plain(event_number=events[:10] * 2), ["event_number"])),  # refused
        PLAIN[2],
    ]
    result = decode_messages(payloads)
    assert result.accepted == [0, 2, 3, 5]
    assert [(i, e.field, e.row) for i, e in result.errors] == [
        (1, "event_number", 15),
        (4, "event_number", 10),
    ]
    for index, error in result.errors:
        with pytest.raises(MessageError) as expected:
            decode_events(payloads[index])
        assert error.reason == expected.value.reason
    assert result.table.equals(one_by_one([payloads[i] for i in result.accepted]))
    assert [h.count for h in result.headers] == [20] * 4


def test_max_bytes_applies_to_each_message() -> None:
    small = encode_events(make_events(3), make_header(3))
    big = messages_of(realistic_table(300), 9_000)[0]
    assert len(small) + 10 < len(big)
    result = decode_messages([small, big], max_bytes=len(small) + 10)
    assert result.accepted == [0]
    assert result.errors[0][0] == 1
    assert "over the limit" in result.errors[0][1].reason


def test_an_empty_batch_is_an_empty_table_of_the_event_schema() -> None:
    result = decode_messages([])
    assert (result.headers, result.accepted, result.errors) == ([], [], [])
    assert result.table.num_rows == 0
    assert result.table.schema == EVENT_SCHEMA
    refused = decode_messages([b"[]"])
    assert refused.table.num_rows == 0
    assert refused.errors[0][1].reason.startswith("expected a JSON object")


def test_a_batch_takes_str_payloads_and_any_iterable() -> None:
    payloads = messages_of(make_events(60, seed=5), 4_000)
    result = decode_messages(payload.decode() for payload in payloads)
    assert result.table.equals(one_by_one(payloads))


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 25), min_size=1, max_size=6),
    references=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_batch_decoding_equals_one_by_one_decoding(
    sizes: list[int], references: int, seed: int
) -> None:
    payloads = []
    base = 0
    for i, n in enumerate(sizes):
        table = make_events(n, seed=seed + i, references=references, event_base=base)
        base += 7 * n
        if seed % 3 == 0 and n:  # a constant flag in some messages, random ones in others
            table = replace(table, "is_simulation", [True] * n)
        version = 1 + (seed + i) % 2
        payloads.append(encode_events(table, make_header(n, message_id=f"m{i}", version=version)))
    result = decode_messages(payloads)
    assert result.errors == []
    expected = one_by_one(payloads)
    assert result.table.equals(expected)
    result.table.validate(full=True)


# --------------------------------------------------------------------------- the zstd block


def block_doc() -> tuple[dict[str, Any], bytes]:
    """A message with bcid in the block, and the block's raw bytes."""
    doc = packed(plain(), ["bcid"])
    raw = (
        codec.compression._ZSTD.decompress(binascii.a2b_base64(doc["z"]), 40)
        if codec.compression._ZSTD
        else b""
    )
    return doc, raw


def rejoined(*frames: bytes) -> str:
    return binascii.b2a_base64(b"".join(frames), newline=False).decode()


@needs_zstd
def test_the_block_is_exactly_one_frame() -> None:
    doc, raw = block_doc()
    assert codec.compression._ZSTD is not None
    whole, head, tail = (
        codec.compression._ZSTD.compress(part) for part in (raw, raw[:20], raw[20:])
    )
    for text in (rejoined(whole, b"\x00"), rejoined(head, tail), rejoined(whole, whole)):
        doc["z"] = text
        with pytest.raises(MessageError) as error:
            decode_events(orjson.dumps(doc))
        assert (error.value.field, error.value.row) == ("z", None)
        assert error.value.reason.startswith("compressed block:")
    doc["z"] = rejoined(whole)
    assert decode_events(orjson.dumps(doc))[1].equals(decode_events(PLAIN[2])[1])


@needs_zstd
@pytest.mark.parametrize(("extra", "ok"), [(0, True), (1, False), (-1, False)])
def test_a_frame_without_a_declared_size_must_hold_exactly_the_arrays(extra: int, ok: bool) -> None:
    doc, raw = block_doc()
    data = raw + bytes(extra) if extra >= 0 else raw[:extra]
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    assert codec.compression._zstd_content_size(frame) is None
    doc["z"] = binascii.b2a_base64(frame, newline=False).decode()
    if ok:
        assert decode_events(orjson.dumps(doc))[1].equals(decode_events(PLAIN[2])[1])
        return
    with pytest.raises(MessageError) as error:
        decode_events(orjson.dumps(doc))
    assert (error.value.field, error.value.row) == ("z", None)
    assert error.value.reason.startswith("compressed block: not a zstd frame of 40 bytes")


@needs_zstd
def test_threads_decode_and_encode_with_their_own_zstd_contexts() -> None:
    table = realistic_table(600)
    payloads = messages_of(table, 4_000)
    expected = one_by_one(payloads)

    def decode_all(_: int) -> pa.Table:
        return pa.concat_tables([decode_messages(payloads).table for _ in range(3)])

    def encode_all(_: int) -> list[bytes]:
        return messages_of(table, 4_000)

    with ThreadPoolExecutor(4) as pool:
        decoded = list(pool.map(decode_all, range(4)))
        encoded = list(pool.map(encode_all, range(4)))
    for result in decoded:
        assert result.equals(pa.concat_tables([expected] * 3))
    assert all(messages == payloads for messages in encoded)


# --------------------------------------------------------------------------- encoding


def test_realistic_messages_are_cut_with_about_one_encode_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = realistic_table(3000, dataset=1)
    encodes = 0
    encode = codec.encode._EventColumns.encode

    def counted(self: Any, start: int, stop: int, header: Any) -> bytes:
        nonlocal encodes
        encodes += 1
        return encode(self, start, stop, header)

    monkeypatch.setattr(codec.encode._EventColumns, "encode", counted)
    target = 10_000
    messages = list(encode_message_batches(table, make_header(0, message_id="fit"), target))
    sizes = [len(payload) for _, payload in messages]
    assert len(messages) >= 10
    assert max(sizes) <= target
    assert min(sizes[:-1]) >= codec.encode._FULL * target
    assert sum(sizes[:-1]) / (len(sizes) - 1) >= 0.93 * target  # fuller on average
    # two probes per table, then about one encode per message
    assert encodes <= 2 + 1.35 * len(messages)
    assert pa.concat_tables(decode_events(p)[1] for _, p in messages).equals(table)


def test_a_message_header_is_unchanged_by_the_batch_api() -> None:
    header = make_header(20)
    payload = encode_events(make_events(20), header)
    assert decode_messages([payload]).headers == [decode_events(payload)[0]] == [header]
    assert dataclasses.asdict(decode_messages([VALID]).headers[0]) == dataclasses.asdict(
        decode_events(VALID)[0]
    )


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"w": 3, "k": "AQID="}, "constant mask: bad base64: padding after a whole group"),
        ({"w": 3, "k": "AQ!D"}, "constant mask: bad base64: Only base64 data is allowed"),
    ],
)
def test_base64_is_strict_about_padding_after_a_whole_group(spec: Any, reason: str) -> None:
    with pytest.raises(MessageError) as error:
        decode_events(json.dumps(plain(l1_tbp=spec)))
    assert (error.value.field, error.value.row) == ("l1_tbp", None)
    assert error.value.reason == reason


def uniform_message(seed: int, bad_index_at: int | None = None, in_block: bool = False) -> bytes:
    """20 events of two references each (the layout whose references are built in bulk),
    optionally with slot 1's GUID index at row ``bad_index_at`` beyond the table."""
    table = make_events(20, references=2, seed=seed, event_base=1000 * seed)
    doc = orjson.loads(encode_events(table, make_header(20, message_id=f"u{seed}", version=1)))
    doc["v"] = 2  # the plain layout is valid version 2
    assert doc["c"]["references"]["n"] == 2
    if bad_index_at is not None:
        slot = doc["c"]["references"]["s"][1]
        slot["g"][bad_index_at] = len(doc["c"]["references"]["g"])
    return orjson.dumps(packed(doc, [], slots=["1.g"]) if in_block else doc)


@needs_zstd
@pytest.mark.parametrize("in_block", [False, True])
def test_guid_indices_checked_in_bulk_refuse_exactly_the_bad_messages(in_block: bool) -> None:
    payloads = [
        uniform_message(1, in_block=in_block),
        uniform_message(2, bad_index_at=7, in_block=in_block),
        uniform_message(3, in_block=in_block),
        uniform_message(4, bad_index_at=19, in_block=in_block),
    ]
    result = decode_messages(payloads)
    assert result.accepted == [0, 2]
    assert [(i, e.field, e.row) for i, e in result.errors] == [
        (1, "references", 7),
        (3, "references", 19),
    ]
    for index, error in result.errors:
        with pytest.raises(MessageError) as expected:
            decode_events(payloads[index])
        assert error.reason == expected.value.reason
        assert error.reason.startswith("slot 1: guid index ")
    assert result.table.equals(one_by_one([payloads[0], payloads[2]]))
