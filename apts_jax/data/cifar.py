"""Reader for CIFAR-10, "python version" (https://www.cs.toronto.edu/~kriz/cifar.html).

The distribution ``cifar-10-python.tar.gz`` unpacks to a folder ``cifar-10-batches-py`` with

* ``data_batch_1`` ... ``data_batch_5`` (training, 10000 images each) and ``test_batch`` (10000):
  pickled dicts with ``b"data"``, a ``(n, 3072)`` uint8 array whose rows hold the 1024 red, then
  1024 green, then 1024 blue values of a 32x32 image in row-major order, and ``b"labels"``, a list
  of ``n`` ints in ``0..9``;
* ``batches.meta``: a pickled dict with ``b"label_names"``, the 10 class names.

:func:`load_cifar10` accepts that folder, a folder that contains it, or the ``.tar.gz`` itself (read
in place, nothing is extracted), and returns images as ``(n, 32, 32, 3)`` uint8 (NHWC).

Security: the batches are Python pickles. Unpickling can execute arbitrary code, so only use this
reader on files from a trusted source (ideally verified against the official checksums, as
:func:`apts_jax.data.load_dataset` does for downloads). As a second line of defence the unpickler
here only resolves the few globals an ndarray pickle needs (numpy's array reconstructors and
``_codecs.encode``) and refuses every other global.
Pickles are read with ``encoding="bytes"`` (they were written by Python 2), so dict keys are bytes.

Errors (missing, truncated or corrupt batches, wrong shapes, out-of-range labels) raise
:class:`CIFARFormatError` (a :class:`ValueError`) naming the file and the problem.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "CIFAR10Data",
    "CIFAR10_ARCHIVE",
    "CIFAR10_BATCH_DIR",
    "CIFAR10_CLASSES",
    "CIFAR10_META",
    "CIFAR10_TEST_BATCHES",
    "CIFAR10_TRAIN_BATCHES",
    "CIFARFormatError",
    "find_cifar10",
    "load_cifar10",
    "read_cifar_batch",
]

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_BATCH_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCHES = ("test_batch",)
CIFAR10_META = "batches.meta"
CIFAR10_FILES = (*CIFAR10_TRAIN_BATCHES, *CIFAR10_TEST_BATCHES, CIFAR10_META)
#: The class names in label order (as in ``batches.meta``).
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_IMAGE_SHAPE = (3, 32, 32)  # channel-major in the file
_ROW = 3 * 32 * 32


class CIFARFormatError(ValueError):
    """A CIFAR-10 batch (or the archive / folder holding them) is missing, truncated or corrupt."""


@dataclass(frozen=True)
class CIFAR10Data:
    """CIFAR-10 as numpy arrays.

    Attributes:
      train_x: ``(n_train, 32, 32, 3)`` uint8 (50000 for the full set), NHWC.
      train_y: ``(n_train,)`` int32 labels in ``0..9``.
      test_x: ``(n_test, 32, 32, 3)`` uint8.
      test_y: ``(n_test,)`` int32.
      class_names: the names from ``batches.meta``.
      source: the folder or archive read.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: tuple[str, ...]
    source: Path


def _numpy_global(module: str, name: str) -> Any:
    import importlib

    return getattr(importlib.import_module(module), name)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2
        reconstruct = _numpy_global("numpy._core.multiarray", "_reconstruct")
        frombuffer = _numpy_global("numpy._core.numeric", "_frombuffer")
    except (ImportError, AttributeError):  # numpy 1.x
        reconstruct = _numpy_global("numpy.core.multiarray", "_reconstruct")
        frombuffer = _numpy_global("numpy.core.numeric", "_frombuffer")
    import codecs

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, "latin1").
        ("_codecs", "encode"): codecs.encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the numpy globals an ndarray pickle uses."""

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} (only numpy arrays are expected in a "
                "CIFAR batch)"
            ) from None


def _unpickle(fileobj: IO[bytes], where: str) -> Any:
    try:
        return _RestrictedUnpickler(fileobj, encoding="bytes").load()
    except EOFError:
        raise CIFARFormatError(f"{where}: truncated pickle (file ends early)") from None
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, OSError, zlib.error) as exc:
        if "truncated" in str(exc):
            raise CIFARFormatError(f"{where}: truncated pickle (file ends early): {exc}") from None
        raise CIFARFormatError(f"{where}: corrupt pickle: {exc}") from None


def _get(d: dict, key: str, where: str) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise CIFARFormatError(
        f"{where}: corrupt batch: no {key!r} entry (keys: {sorted(map(str, d))})"
    )


def read_cifar_batch(
    fileobj: str | os.PathLike[str] | IO[bytes], name: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 batch (a pickle); returns ``(images (n, 32, 32, 3) uint8, labels (n,))``.

    Args:
      fileobj: a path or a binary file object.
      name: the name used in error messages (default: the path).

    Raises:
      CIFARFormatError: truncated or corrupt pickle, missing ``data``/``labels``, wrong shape or
        dtype, label count different from the image count, labels outside ``0..9``.
    """
    if isinstance(fileobj, (str, os.PathLike)):
        where = name or str(fileobj)
        try:
            with open(fileobj, "rb") as fh:
                batch = _unpickle(fh, where)
        except FileNotFoundError:
            raise CIFARFormatError(f"{where}: missing batch file") from None
    else:
        where = name or getattr(fileobj, "name", "<CIFAR batch>")
        batch = _unpickle(fileobj, where)
    if not isinstance(batch, dict):
        raise CIFARFormatError(
            f"{where}: corrupt batch: expected a dict, got {type(batch).__name__}"
        )
    data = _get(batch, "data", where)
    labels = _get(batch, "labels", where)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _ROW:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) \
            else type(data).__name__
        raise CIFARFormatError(
            f"{where}: corrupt batch: 'data' must be a uint8 array of shape (n, {_ROW}), got {desc}"
        )
    try:
        labels = np.asarray(labels)
    except (TypeError, ValueError) as exc:
        raise CIFARFormatError(f"{where}: corrupt batch: unreadable labels: {exc}") from None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise CIFARFormatError(
            f"{where}: corrupt batch: 'labels' must be a list of ints, got {labels.dtype} array of"
            f" shape {labels.shape}"
        )
    if labels.shape[0] != data.shape[0]:
        raise CIFARFormatError(
            f"{where}: count mismatch: {data.shape[0]} images but {labels.shape[0]} labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise CIFARFormatError(
            f"{where}: labels out of range: found values in [{labels.min()}, {labels.max()}],"
            f" expected [0, {len(CIFAR10_CLASSES) - 1}]"
        )
    images = data.reshape(-1, *_IMAGE_SHAPE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def _read_meta(fileobj: IO[bytes], where: str) -> tuple[str, ...]:
    meta = _unpickle(fileobj, where)
    if not isinstance(meta, dict):
        raise CIFARFormatError(f"{where}: corrupt meta file: expected a dict")
    names = _get(meta, "label_names", where)
    try:
        out = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    except (TypeError, UnicodeDecodeError) as exc:
        raise CIFARFormatError(f"{where}: corrupt meta file: unreadable label names: {exc}") \
            from None
    if len(out) != len(CIFAR10_CLASSES):
        raise CIFARFormatError(
            f"{where}: corrupt meta file: {len(out)} label names, expected {len(CIFAR10_CLASSES)}"
        )
    return out


def find_cifar10(path: str | os.PathLike[str]) -> Path | None:
    """The CIFAR-10 source under ``path``, or ``None``.

    Checked in order: ``path`` itself holding the batch files (any of them), ``path /
    cifar-10-batches-py`` holding them, ``path / cifar-10-python.tar.gz``, and ``path`` being a
    ``.tar.gz`` file. A folder holding only some of the batches is returned (so that
    :func:`load_cifar10` reports which are missing) rather than skipped.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    for folder in (path, path / CIFAR10_BATCH_DIR):
        if folder.is_dir() and any((folder / f).is_file() for f in CIFAR10_FILES):
            return folder
    if (path / CIFAR10_ARCHIVE).is_file():
        return path / CIFAR10_ARCHIVE
    return None


def _assemble(
    batches: dict[str, tuple[np.ndarray, np.ndarray]], class_names: tuple[str, ...], source: Path
) -> CIFAR10Data:
    train = [batches[n] for n in CIFAR10_TRAIN_BATCHES]
    test = [batches[n] for n in CIFAR10_TEST_BATCHES]
    return CIFAR10Data(
        train_x=np.concatenate([b[0] for b in train]),
        train_y=np.concatenate([b[1] for b in train]),
        test_x=np.concatenate([b[0] for b in test]),
        test_y=np.concatenate([b[1] for b in test]),
        class_names=class_names,
        source=source,
    )


def _load_dir(folder: Path) -> CIFAR10Data:
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing:
        raise CIFARFormatError(
            f"{folder}: incomplete CIFAR-10 folder: missing batch file(s) {', '.join(missing)}"
            f" (expected {', '.join(CIFAR10_FILES)})"
        )
    batches = {n: read_cifar_batch(folder / n) for n in (*CIFAR10_TRAIN_BATCHES,
                                                          *CIFAR10_TEST_BATCHES)}
    with open(folder / CIFAR10_META, "rb") as fh:
        names = _read_meta(fh, str(folder / CIFAR10_META))
    return _assemble(batches, names, folder)


def _load_tar(archive: Path) -> CIFAR10Data:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = {}
            for m in tar.getmembers():
                base = m.name.rstrip("/").rsplit("/", 1)[-1]
                if m.isfile() and base in CIFAR10_FILES:
                    members.setdefault(base, m)
            missing = [f for f in CIFAR10_FILES if f not in members]
            if missing:
                raise CIFARFormatError(
                    f"{archive}: incomplete CIFAR-10 archive: missing batch file(s)"
                    f" {', '.join(missing)}"
                )
            batches = {}
            names: tuple[str, ...] = ()
            for base, member in members.items():
                where = f"{archive}:{member.name}"
                fh = tar.extractfile(member)
                if fh is None:  # pragma: no cover - isfile() was checked
                    raise CIFARFormatError(f"{where}: not a regular file")
                raw = fh.read()
                if len(raw) != member.size:
                    raise CIFARFormatError(
                        f"{where}: truncated: {len(raw)} of {member.size} bytes in the archive"
                    )
                if base == CIFAR10_META:
                    names = _read_meta(io.BytesIO(raw), where)
                else:
                    batches[base] = read_cifar_batch(io.BytesIO(raw), where)
    except CIFARFormatError:
        raise
    except FileNotFoundError:
        raise CIFARFormatError(f"{archive}: archive not found") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise CIFARFormatError(
            f"{archive}: truncated or corrupt archive ({type(exc).__name__}: {exc})"
        ) from None
    return _assemble(batches, names, archive)


def load_cifar10(path: str | os.PathLike[str]) -> CIFAR10Data:
    """Load CIFAR-10 (python version) from a folder or the ``.tar.gz`` archive.

    Args:
      path: ``cifar-10-batches-py`` itself, a folder containing it (or containing
        ``cifar-10-python.tar.gz``), or the archive file.

    Returns:
      :class:`CIFAR10Data` with NHWC uint8 images and int32 labels; training batches concatenated
      in the order ``data_batch_1`` ... ``data_batch_5``.

    Raises:
      CIFARFormatError: nothing found at ``path``, a batch file missing (all are named), or a
        truncated / corrupt batch or archive.
    """
    path = Path(path)
    source = find_cifar10(path)
    if source is None:
        raise CIFARFormatError(
            f"{path}: no CIFAR-10 data found (expected {CIFAR10_BATCH_DIR}/ with"
            f" {', '.join(CIFAR10_FILES)}, or {CIFAR10_ARCHIVE})"
        )
    if source.is_dir():
        return _load_dir(source)
    return _load_tar(source)
