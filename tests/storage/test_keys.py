"""Key encoding: byte order is tuple order, for signed and unsigned widths, and it round-trips."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventindex.storage.keys import (
    decode_key,
    decode_key_columns,
    encode_bound,
    encode_key,
    encode_key_columns,
    encode_query_keys,
    key_width,
)

EVENT_DTYPES: list[np.dtype[Any]] = [np.dtype(np.uint32), np.dtype(np.uint64)]
OBJECT_DTYPES: list[np.dtype[Any]] = [np.dtype(np.int64)]
MIXED_DTYPES: list[np.dtype[Any]] = [
    np.dtype(np.int8),
    np.dtype(np.uint16),
    np.dtype(np.int32),
    np.dtype(np.int64),
]


def component(dtype: np.dtype[Any]) -> st.SearchStrategy[int]:
    info = np.iinfo(dtype)
    low, high = int(info.min), int(info.max)
    # The edges are where sign flips and byte order go wrong, so draw them often.
    edges = [low, low + 1, -1, 0, 1, high // 2, high // 2 + 1, high - 1, high]
    return st.one_of(
        st.sampled_from([v for v in edges if low <= v <= high]),
        st.integers(low, high),
    )


def keys_of(dtypes: list[np.dtype[Any]]) -> st.SearchStrategy[list[tuple[int, ...]]]:
    return st.lists(st.tuples(*[component(d) for d in dtypes]), min_size=1, max_size=40)


@pytest.mark.parametrize("dtypes", [EVENT_DTYPES, OBJECT_DTYPES, MIXED_DTYPES])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_encoded_order_is_tuple_order(dtypes: list[np.dtype[Any]], data: st.DataObject) -> None:
    keys = data.draw(keys_of(dtypes))
    encoded = encode_query_keys(keys, dtypes)
    assert encoded.dtype == np.dtype(f"S{key_width(dtypes)}")
    by_bytes = [keys[i] for i in np.argsort(encoded, kind="stable")]
    assert by_bytes == sorted(keys)
    for i in range(len(keys) - 1):
        assert bool(encoded[i] < encoded[i + 1]) == (keys[i] < keys[i + 1])
        assert bool(encoded[i] == encoded[i + 1]) == (keys[i] == keys[i + 1])
    assert np.searchsorted(np.sort(encoded), encoded[0], side="left") == sorted(keys).index(keys[0])


@pytest.mark.parametrize("dtypes", [EVENT_DTYPES, OBJECT_DTYPES, MIXED_DTYPES])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_decode_round_trips(dtypes: list[np.dtype[Any]], data: st.DataObject) -> None:
    keys = data.draw(keys_of(dtypes))
    encoded = encode_query_keys(keys, dtypes)
    for key, element in zip(keys, encoded, strict=True):
        # Elements lose their trailing zero bytes; decode_key must restore them.
        assert decode_key(element, dtypes) == key
        single = encode_key(key, dtypes)
        assert len(single) == key_width(dtypes)
        assert single.rstrip(b"\0") == element
        assert decode_key(single, dtypes) == key
    columns = decode_key_columns(encoded, dtypes)
    assert [c.dtype for c in columns] == dtypes
    assert list(zip(*[c.tolist() for c in columns], strict=True)) == keys
    assert np.array_equal(encode_key_columns(columns), encoded)


def test_uint64_above_2_63_sorts_after_smaller_values() -> None:
    keys = [(1, 2**64 - 1), (1, 2**63), (1, 2**63 - 1), (1, 2**32), (1, 0), (0, 2**64 - 1)]
    encoded = encode_query_keys(keys, EVENT_DTYPES)
    assert [keys[i] for i in np.argsort(encoded)] == sorted(keys)


def test_negative_int64_sorts_before_positive() -> None:
    keys = [(5,), (-1,), (-(2**63),), (0,), (2**63 - 1,), (-5,)]
    encoded = encode_query_keys(keys, OBJECT_DTYPES)
    assert [keys[i] for i in np.argsort(encoded)] == sorted(keys)


def test_numpy_integers_are_accepted() -> None:
    keys = [(np.uint32(7), np.uint64(2**64 - 1)), (np.int64(1), 2)]
    encoded = encode_query_keys(keys, EVENT_DTYPES)  # type: ignore[arg-type]
    assert decode_key(encoded[0], EVENT_DTYPES) == (7, 2**64 - 1)
    assert encode_key(keys[0], EVENT_DTYPES) == encode_query_keys(keys[:1], EVENT_DTYPES)[0]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ((-1, 5), "component 0 = -1"),
        ((2**32, 5), "component 0 = 4294967296"),
        ((1, 2**64), "component 1 = 18446744073709551616"),
        ((1, -1), "component 1 = -1"),
        ((1, 1.0), "not an integer"),
        ((1, True), "not an integer"),
        ((1, "2"), "not an integer"),
        ((1,), "1 components, expected 2"),
        ((1, 2, 3), "3 components, expected 2"),
    ],
)
def test_keys_outside_the_key_types_are_refused(key: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_key(key, EVENT_DTYPES)
    with pytest.raises(ValueError, match=message):
        encode_query_keys([(1, 1), key], EVENT_DTYPES)


def test_int64_limits() -> None:
    with pytest.raises(ValueError, match="outside int64"):
        encode_key((2**63,), OBJECT_DTYPES)
    with pytest.raises(ValueError, match="outside int64"):
        encode_query_keys([(-(2**63) - 1,)], OBJECT_DTYPES)
    assert decode_key(encode_key((-(2**63),), OBJECT_DTYPES), OBJECT_DTYPES) == (-(2**63),)


def test_no_keys_encode_to_an_empty_array() -> None:
    encoded = encode_query_keys([], EVENT_DTYPES)
    assert encoded.shape == (0,)
    assert encoded.dtype == np.dtype("S12")


def test_bounds_pad_missing_columns() -> None:
    low = encode_bound((7,), EVENT_DTYPES, upper=False)
    high = encode_bound((7,), EVENT_DTYPES, upper=True)
    assert decode_key(low, EVENT_DTYPES) == (7, 0)
    assert decode_key(high, EVENT_DTYPES) == (7, 2**64 - 1)
    assert encode_bound((7, 9), EVENT_DTYPES, upper=True) == encode_key((7, 9), EVENT_DTYPES)
    signed: list[np.dtype[Any]] = [np.dtype(np.int32), np.dtype(np.int16)]
    assert decode_key(encode_bound((-3,), signed, upper=False), signed) == (-3, -(2**15))
    with pytest.raises(ValueError, match="1 to 2 components"):
        encode_bound((), EVENT_DTYPES, upper=False)
