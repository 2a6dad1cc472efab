"""The producer → consumer wire format: versioned, columnar JSON messages of event records.

A message is one JSON object::

    {"v": 2,
     "h": {"producer": "node17.cern.ch", "message_id": "t7562.j42:0",
           "dataset": "data15_13TeV.00284484.physics_Main.merge.AOD.r7562_p2521",
           "collection": "data15_13TeV.physics_Main",
           "guid": "F2B1A5B0-1F57-E511-9E3E-02163E0133C9",
           "task_id": "7562", "job_id": "42", "count": 3, "sent_at": 1716900000.25},
     "c": {"run_number": {"k": 284484}, "event_number": {"d": [4294967312, 17, 9]},
           "lumi_block": {"k": 112}, "timestamp": {"r": [1444700000, 2, 1444700001, 1]},
           "timestamp_ns": {"z": "zstd"}, "bcid": [11, 1187, 2], "lvl1_id": {"z": "zstd"},
           "is_simulation": {"k": 0}, "is_calibration": {"k": 0}, "is_testbeam": [0, 0, 1],
           "mc_channel_number": {"k": 0}, "mc_event_weight": {"k": 1.0},
           "l1_tbp": {"w": 2, "z": "zstd"}, "l1_tap": {"w": 2, "z": "zstd"},
           "l1_tav": {"w": 1, "u": "BAU=", "i": [0, 1, 0]}, "hlt_passed": {"w": 1, "k": "AA=="},
           "smk": {"k": 2160}, "l1psk": {"k": 3}, "hltpsk": [5, 5, 6],
           "references": {"n": 2,
                          "g": ["0A66C3F2-56B6-E511-8B7B-02163E011F0E",
                                "5D2C7A1E-0B2D-4B3A-9C4E-1F2A3B4C5D6E"],
                          "s": [{"f": "RAW", "g": {"k": 0}, "p": {"d": [41, 1, 1]}},
                                {"f": "AOD", "g": [1, 1, 0], "p": {"z": "zstd"}}]}},
     "z":"KLUv/SA8vQEA5ALA1AEAiBMAAFg+DwAHAAAACAAAAAkAAAABgAMAAYEBAAEAAYAAAQcAAAAAAAAAAgArWTQDTw=="}

* ``v``: the format version. This codec writes 2 (or, when the header asks for
  it, the plain layout of version 1) and reads both.
* ``h``: the header: the fields of :class:`MessageHeader` except ``version``;
  ``sent_at`` may be left out. ``message_id`` is unique per message and is what
  consumers use to make redelivery idempotent; ``guid`` is the producer's output
  file; ``count`` the number of events.
* ``c``: one entry per column of ``EVENT_SCHEMA``, all present and no other.
  Every array of numbers (the integer, boolean and float columns, and the ``g``
  and ``p`` arrays of reference slots) is written in one of these encodings,
  which the encoder picks array by array and message by message:

  - a plain JSON array of ``count`` values (or of the slot's size);
  - ``{"k": v}``: the value of every row (a run number, a trigger key, a flag);
  - ``{"r": [v1, n1, v2, n2, ...]}``: runs, ``n1`` rows of ``v1`` and so on,
    every count at least 1 (timestamps, luminosity blocks, prescale keys);
  - ``{"d": [first, delta1, ...]}``: ``count`` entries whose running sums are the
    values (sorted numbers such as event numbers, when there is no ``z`` block);
  - ``{"z": "zstd"}``: the values are in the message's compressed block ``z``
    (not for booleans).

  Values must be within the Arrow type: uint16, uint32, uint64 (running sums
  included), 0/1 for booleans, float32 for ``mc_event_weight``. Booleans and
  numbers are never JSON ``true``/``false``, which makes a stray boolean cheap
  to detect. Runs and deltas apply to integers only.
* trigger masks: ``{"w": width_in_bytes, ...}``, every mask of the column being
  ``w`` bytes (the encoder pads shorter masks with zero bytes, which set no
  bits; bit ``i`` is bit ``i % 8`` of byte ``i // 8``), and one of ``"b64"``:
  base64 of the ``count`` masks concatenated; ``"k"``: base64 of the one mask of
  every row; ``"u"`` and ``"i"``: base64 of a table of distinct masks, and per
  row its index in that table (an integer array as above, not packed);
  ``"z": "zstd"``: the masks are in the compressed block.
* ``references``: ``n`` is the number of references of each event (one integer
  when every event has the same number, else an array of ``count`` integers);
  ``g`` is the table of distinct file GUIDs of this message (canonical
  8-4-4-4-12 hex); ``s`` holds one object per reference slot: slot ``k`` covers
  the ``k``-th reference of every event that has more than ``k`` references, in
  event order: ``f`` its data format (one string for the whole slot, or an
  array of strings), ``g`` indices into the GUID table, ``p`` the event's
  position (entry number, uint64) in that file.
* ``z`` (present exactly when some array is ``{"z": "zstd"}``): base64 of one
  zstd frame holding the little-endian values of every such array, columns in
  schema order and then each slot's ``g`` and ``p``. Trigger masks are mostly
  zero bytes and one frame catches what columns share (after-veto bits are
  nearly always the after-prescale bits); numbers cost no Python object per
  value to decode.

Version 1 is the same without ``z`` and with plain arrays and ``"b64"`` masks only.

Decoding validates everything and rejects a message with :class:`MessageError`,
naming the field, the 0-based row and the reason; it never drops rows. Each JSON
array is checked in bulk, by one C-level conversion (``array.fromlist``) that
checks JSON type and range together, and running sums of deltas by the same
conversion of ``itertools.accumulate`` (exact: Python integers do not
overflow; long arrays of int32 deltas go through numpy's int64 ``cumsum``,
which cannot overflow either, and a range check); only an array known to be
bad is scanned row by row, to name its first bad row. The compressed block
must decompress to exactly the bytes its arrays need. What a message may expand
to is bounded before anything is allocated: ``count`` by its size in bytes,
masks, references and the block each by ``MAX_EXPANSION`` times ``max_bytes``.
The record batch is then assembled from the decoded buffers with a single Arrow
IPC read rather than twenty-odd array constructors, which for a 10 kB message
would cost more than parsing its JSON.

:func:`decode_messages` decodes several messages into one table: each is
checked as :func:`decode_events` checks it and accepted or refused on its own,
but the work numpy does per call (reference buffers, the key order check, the
GUID index range check, the IPC read) is done once for all of them, and only a
message a bulk pass flags gets its own check, which names field, row and reason.
Base64 goes through pybase64 (SIMD) and zstd through one reused context per
thread; :func:`encode_message_batches` compresses at a cheap level and fits
rows to the target from the bytes per row of the previous message.

The package, one responsibility a module; each imports only modules above it here:

* :mod:`.wire`: versions, limits, :class:`MessageError`, the column layout;
* :mod:`.compression`: the zstd codec of the ``z`` block, and base64;
* :mod:`.reasons`: where (field, row) and why a message is refused;
* :mod:`.header`: :class:`MessageHeader` and its decoding;
* :mod:`.arrays`: number arrays in every encoding, to Arrow buffers;
* :mod:`.references`: the ``references`` column;
* :mod:`.assembly`: body pieces to a RecordBatch with one Arrow IPC read;
* :mod:`.message`: one message, checked, to body pieces;
* :mod:`.decode`: :func:`decode_events` and :func:`decode_messages`;
* :mod:`.encode`: :func:`encode_events` and :func:`encode_message_batches`.
"""

from eventindex.records.codec.decode import DecodedMessages, decode_events, decode_messages
from eventindex.records.codec.encode import encode_events, encode_message_batches
from eventindex.records.codec.header import MessageHeader
from eventindex.records.codec.wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    FORMAT_VERSION,
    MAX_EXPANSION,
    SUPPORTED_VERSIONS,
    MessageError,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "FORMAT_VERSION",
    "MAX_EXPANSION",
    "SUPPORTED_VERSIONS",
    "DecodedMessages",
    "MessageError",
    "MessageHeader",
    "decode_events",
    "decode_messages",
    "encode_events",
    "encode_message_batches",
]
