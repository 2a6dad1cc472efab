"""How bytes travel in a message's JSON text: zstd for the ``z`` block, base64 for all.

One zstd compression and one decompression context per thread (a context
costs as much as decompressing a small block to make), the frame header's
declared size for error messages, the marker that sends an array into the
block, and strict base64 (pybase64, SIMD) both ways. The encoder and the
decoder read the zstd codec as ``compression._ZSTD`` at call time, so that
setting it to None here shows every part of the codec working without it.
"""

from __future__ import annotations

import threading
from typing import Final

import pybase64
import zstandard

# Level 3 compresses a 10 kB message's block ~8x faster than level 9, for ~7% more
# bytes (higher levels barely decompress faster), which producers need.
_ZSTD_LEVEL: Final = 3


class _Zstd:
    """zstd with one compression and one decompression context per thread.

    Making a context costs as much as decompressing a small block, and a
    context may not be shared by threads that use it at the same time.
    """

    def __init__(self, level: int) -> None:
        self.level = level
        self._local = threading.local()

    def compress(self, data: bytes) -> bytes:
        """One frame that declares its content size."""
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(level=self.level)
        return compressor.compress(data)

    def decompress(self, frame: bytes, size: int) -> bytes:
        """Exactly ``size`` bytes from one frame and nothing after it, or zstandard.ZstdError.

        A frame that declares another size is refused before anything is
        allocated: the declared size is what the decompressor would allocate.
        """
        declared = _zstd_content_size(frame)
        if declared is not None and declared != size:
            raise zstandard.ZstdError(f"frame declares {declared} bytes")
        decompressor = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = self._local.decompressor = zstandard.ZstdDecompressor()
        data = decompressor.decompress(frame, max_output_size=size, allow_extra_data=False)
        if len(data) != size:
            raise zstandard.ZstdError(f"frame holds {len(data)} bytes")
        return data


# The codec of the ``z`` block; tests set it to None to see how the codec does without.
_ZSTD: _Zstd | None = _Zstd(_ZSTD_LEVEL)


def _zstd_content_size(frame: bytes) -> int | None:
    """The content size a zstd frame header declares, if it declares one (for error messages)."""
    if len(frame) < 6 or frame[:4] != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = frame[4]
    size_flag, single = descriptor >> 6, (descriptor >> 5) & 1
    at = 5 + (not single) + (0, 1, 2, 4)[descriptor & 3]
    field_size = (1 if single else 0, 2, 4, 8)[size_flag]
    if not field_size or len(frame) < at + field_size:
        return None
    size = int.from_bytes(frame[at : at + field_size], "little")
    return size + 256 if field_size == 2 else size


# Stands for "this array goes into the compressed block".
_PACK: Final = {"z": "zstd"}


# --------------------------------------------------------------------------- base64


def _b64(text: object) -> bytes | None:
    """Strict base64 decoding, or None.

    pybase64 decodes with SIMD, dozens of times faster than binascii, and is the
    stricter of the two: besides everything binascii's strict mode refuses, it
    refuses padding after a whole group.
    """
    if type(text) is not str:
        return None
    try:
        return pybase64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error included
        return None


def _b64_text(data: bytes) -> str:
    return pybase64.b64encode(data).decode("ascii")


def _b64_size(size: int) -> int:
    return -(-size // 3) * 4
