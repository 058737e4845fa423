"""Reader for IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a big-endian binary array::

    offset  size     content
    0       2        0x00 0x00                       (magic, first half)
    2       1        data type code                  (magic, third byte; table below)
    3       1        ndim >= 1                       (magic, fourth byte)
    4       4*ndim   dims d_0, ..., d_{ndim-1}       (unsigned 32-bit, big-endian)
    4+4*ndim  prod(d) * itemsize                     (the values, C order, big-endian)

    type code  0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64

The file may be gzip-compressed (as distributed); compression is detected from the content (the
gzip magic ``1f 8b``), not from the file name. The reader checks the magic, that the header is
complete, and that the payload is exactly ``prod(d) * itemsize`` bytes (a shorter payload is
reported as truncated with the expected and actual byte counts, a longer one as trailing data).
Every problem raises :class:`IDXFormatError` (a :class:`ValueError`) whose message starts with the
file name.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "IDX_DTYPES",
    "IDXArray",
    "IDXFormatError",
    "load_idx_pair",
    "read_idx",
]

#: IDX data type code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"
# A sanity bound on ndim: real IDX files have ndim <= 4; a larger byte almost surely means the file
# is not an IDX file at all.
_MAX_NDIM = 16


class IDXFormatError(ValueError):
    """An IDX file is malformed: wrong magic, truncated, bad dims, or an image/label mismatch.

    The message names the file (or both files for a pair) and the problem.
    """


@dataclass(frozen=True)
class IDXArray:
    """An array read from an IDX file, plus the file's metadata.

    Attributes:
      data: the values, in native byte order, shape ``shape``; a writable copy.
      shape: the dims declared in the header.
      dtype: the native-byte-order numpy dtype of ``data`` (the file stores big-endian).
      type_code: the IDX data type code (third magic byte).
      path: the file read.
      compressed: whether the file was gzip-compressed.
    """

    data: np.ndarray
    shape: tuple[int, ...]
    dtype: np.dtype
    type_code: int
    path: Path
    compressed: bool


def _read_bytes(path: Path) -> tuple[bytes, bool]:
    """Raw IDX bytes of ``path``, decompressing gzip if the content starts with the gzip magic."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IDXFormatError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise IDXFormatError(f"{path}: is a directory, not an IDX file") from None
    if raw[:2] != _GZIP_MAGIC:
        return raw, False
    try:
        return gzip.decompress(raw), True
    except EOFError as exc:
        raise IDXFormatError(
            f"{path}: truncated gzip stream ({len(raw)} compressed bytes; the download or copy "
            f"was probably cut off): {exc}"
        ) from None
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise IDXFormatError(f"{path}: corrupt gzip stream: {exc}") from None


def read_idx(path: str | os.PathLike[str], *, expected_ndim: int | None = None) -> IDXArray:
    """Read one IDX file (raw or gzip-compressed, detected by content).

    Args:
      path: the file.
      expected_ndim: when given, the header's ndim must equal it (3 for image files, 1 for labels).

    Returns:
      An :class:`IDXArray` with the values in native byte order.

    Raises:
      IDXFormatError: missing file, corrupt or truncated gzip, wrong magic (first two bytes not
        zero, unknown data type code, ndim 0 or implausibly large), header shorter than
        ``4 + 4*ndim`` bytes, ndim different from ``expected_ndim``, payload shorter (truncated)
        or longer (trailing bytes) than the dims declare.
    """
    path = Path(path)
    buf, compressed = _read_bytes(path)
    what = "decompressed " if compressed else ""
    if len(buf) < 4:
        raise IDXFormatError(
            f"{path}: not an IDX file: only {len(buf)} {what}bytes, the magic number needs 4"
        )
    zero0, zero1, code, ndim = buf[0], buf[1], buf[2], buf[3]
    if zero0 != 0 or zero1 != 0:
        raise IDXFormatError(
            f"{path}: wrong magic number 0x{buf[:4].hex()}: an IDX file starts with two zero bytes"
            " (is this really an IDX file?)"
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise IDXFormatError(
            f"{path}: wrong magic number 0x{buf[:4].hex()}: unknown data type code 0x{code:02X}"
            f" (known: {known})"
        )
    if ndim == 0 or ndim > _MAX_NDIM:
        raise IDXFormatError(
            f"{path}: wrong magic number 0x{buf[:4].hex()}: bad number of dimensions {ndim}"
            f" (expected 1..{_MAX_NDIM})"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise IDXFormatError(
            f"{path}: bad dims: the header declares {ndim} dimension(s), expected {expected_ndim}"
        )
    header_size = 4 + 4 * ndim
    if len(buf) < header_size:
        raise IDXFormatError(
            f"{path}: truncated header: {ndim} dims need {header_size} {what}bytes, the file has"
            f" {len(buf)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = header_size + math.prod(shape) * dtype.itemsize
    if len(buf) < expected:
        raise IDXFormatError(
            f"{path}: truncated: dims {shape} of {dtype.name} need {expected} {what}bytes"
            f" ({header_size} header + {expected - header_size} data), the file has {len(buf)}"
            f" ({expected - len(buf)} missing)"
        )
    if len(buf) > expected:
        raise IDXFormatError(
            f"{path}: {len(buf) - expected} trailing bytes: dims {shape} of {dtype.name} need"
            f" {expected} {what}bytes, the file has {len(buf)} (wrong dims in the header?)"
        )
    native = dtype.newbyteorder("=")
    count = math.prod(shape)
    data = np.frombuffer(buf, dtype=dtype, count=count, offset=header_size)
    data = data.astype(native, copy=True).reshape(shape)
    return IDXArray(
        data=data, shape=shape, dtype=native, type_code=code, path=path, compressed=compressed
    )


def load_idx_pair(
    images_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
) -> tuple[IDXArray, IDXArray]:
    """Read an (images, labels) pair of IDX files and check that they belong together.

    Images must be 3-D (count, rows, cols) and labels 1-D (count) with the same count; with
    ``num_classes`` the labels must lie in ``[0, num_classes)``.

    Raises:
      IDXFormatError: either file is malformed (see :func:`read_idx`), the counts differ, or a label
        is out of range.
    """
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(
            f"{images.path} / {labels.path}: count mismatch: {images.shape[0]} images but"
            f" {labels.shape[0]} labels"
        )
    if num_classes is not None and labels.data.size:
        lo, hi = int(labels.data.min()), int(labels.data.max())
        if lo < 0 or hi >= num_classes:
            raise IDXFormatError(
                f"{labels.path}: labels out of range: found values in [{lo}, {hi}], expected"
                f" [0, {num_classes - 1}]"
            )
    return images, labels
