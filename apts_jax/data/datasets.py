"""Dataset loading: Fashion-MNIST, MNIST and CIFAR-10 as normalised float32 numpy arrays.

:func:`load_dataset` looks for the raw files along these routes, in order, and uses the first that
has all of them:

1. ``data_dir`` (the argument);
2. ``$APTS_JAX_DATA_DIR`` (one folder, or several separated by ``os.pathsep``);
3. the system datasets folder ``/usr/share/datasets/<name with dashes>/``, where Debian's
   ``dataset-fashion-mnist`` package installs Fashion-MNIST (``/usr/share/datasets/fashion-mnist``);
4. the user cache ``<cache>/<name>/``, ``<cache>`` being ``cache_dir`` (the argument), else
   ``$XDG_CACHE_HOME/apts_jax``, else ``~/.cache/apts_jax``;
5. a download into that cache folder (only with ``download=True``).

For routes 1 and 2 the folder may hold the files directly or in a subfolder named after the
dataset (``fashion_mnist/`` or ``fashion-mnist/``, ``mnist/``, ``cifar10/`` or ``cifar-10/``);
the subfolder is tried first. MNIST-like datasets need the four IDX files
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte`` (each raw or ``.gz``); CIFAR-10 needs ``cifar-10-batches-py/`` (or the
batch files themselves) or ``cifar-10-python.tar.gz``.

A folder that is found but holds malformed files is an error (:class:`~apts_jax.data.IDXFormatError`
or :class:`~apts_jax.data.CIFARFormatError`), not a reason to try the next route. A folder that
lacks the files is skipped (and named in the final error); for CIFAR-10, a folder holding only
some of the batch files counts as found and malformed (the error names the missing batches).

Downloads use :func:`pooch.retrieve`: the data goes to a temporary file in the cache folder, is
verified against the known checksums (MD5 and/or SHA-256 per file; any listed digest may match),
and is then renamed into place, so the cache never holds a partial or unverified file. On a
mismatch the temporary file is deleted and :class:`ChecksumMismatchError` is raised. The mirror
is ``mirror`` (the argument), else ``$APTS_JAX_DATA_MIRROR``, else the official locations (tried
in turn); a custom mirror serves the file
``<file>`` of dataset ``<name>`` at ``<mirror>/<name>/<file>`` (``file://`` URLs work too).

If no route works, :class:`DatasetNotFoundError` lists every route tried, why it failed, and how to
fix it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import os
import shutil
import urllib.parse
import urllib.request
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from apts_jax.data.cifar import CIFAR10_ARCHIVE, CIFAR10_FILES, find_cifar10, load_cifar10
from apts_jax.data.idx import IDXFormatError, load_idx_pair

__all__ = [
    "DATASETS",
    "ENV_DATA_DIR",
    "ENV_MIRROR",
    "ChecksumMismatchError",
    "Dataset",
    "DatasetNotFoundError",
    "DatasetSpec",
    "RemoteFile",
    "default_cache_dir",
    "download_file",
    "find_dataset",
    "load_dataset",
    "verify_file",
]

ENV_DATA_DIR = "APTS_JAX_DATA_DIR"
ENV_MIRROR = "APTS_JAX_DATA_MIRROR"
#: Root of the system datasets folder (Debian's ``dataset-*`` packages). Tests monkeypatch it.
SYSTEM_DATA_ROOT = Path("/usr/share/datasets")
DEFAULT_TIMEOUT = 30.0
_CHUNK = 1 << 20

Normalize = Literal["per_channel", "global", "per_feature", "unit_range"]


class DatasetNotFoundError(FileNotFoundError):
    """No route (folders, cache, download) provided the dataset; the message lists all of them."""


class ChecksumMismatchError(ValueError):
    """A downloaded file does not match any known checksum; it was deleted, nothing was cached."""


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file and the digests that identify it.

    Attributes:
      filename: the file name (also its name in the cache folder).
      checksums: ``"md5:<hex>"`` / ``"sha256:<hex>"`` digests of the file as served; the download
        is accepted if ANY of them matches.
      content_sha256: optional SHA-256 of the gunzipped payload of a ``.gz`` file; accepted as an
        alternative so that a mirror that re-packs the gzip container (other header, same data)
        still verifies.
    """

    filename: str
    checksums: tuple[str, ...] = ()
    content_sha256: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """Where and how to find one dataset (see :data:`DATASETS`)."""

    name: str
    kind: Literal["idx", "cifar"]
    num_classes: int
    class_names: tuple[str, ...]
    folder_names: tuple[str, ...]
    system_folder: str
    files: tuple[RemoteFile, ...]
    mirrors: tuple[str, ...]
    install_hint: str | None = None


_IDX_ROLES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# --- Checksums -----------------------------------------------------------------------------------
# Fashion-MNIST, per file, in this order:
#   md5     official, from the table in zalandoresearch/fashion-mnist README.md (also shipped in
#           /usr/share/doc/dataset-fashion-mnist/README.md.gz);
#   sha256  official, from tensorflow/datasets tensorflow_datasets/url_checksums/fashion_mnist.txt
#           (sizes 26421880 / 29515 / 4422102 / 5148 bytes);
#   sha256  of Debian's copy (package dataset-fashion-mnist 0.0~git20200523.55506a9-1), computed
#           here from /usr/share/datasets/fashion-mnist/*.gz.
#   content_sha256: of the decompressed IDX payload, computed here from the Debian files.
# The Debian .gz files are NOT byte-identical to the official ones: Debian's build
# (strip-nondeterminism) rewrote the gzip header, dropping the stored file name and setting the
# mtime to the package date, which is why they are 23-24 bytes shorter. The deflate data, CRC and
# payload are unchanged: re-inserting the name and the original mtimes (1504176606 for train-*,
# 1504176627 for t10k-*, i.e. 2017-08-31) into the Debian files reproduces files whose MD5 and
# SHA-256 equal the official digests above (checked when this table was written; see
# tests/test_data.py::test_debian_fashion_mnist_is_the_official_data). Hence the payload digest
# identifies the official data.
_FASHION_FILES = (
    RemoteFile(
        "train-images-idx3-ubyte.gz",
        (
            "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "sha256:3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "sha256:b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        ),
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    RemoteFile(
        "train-labels-idx1-ubyte.gz",
        (
            "md5:25c81989df183df01b3e8a0aad5dffbe",
            "sha256:a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "sha256:0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        ),
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    RemoteFile(
        "t10k-images-idx3-ubyte.gz",
        (
            "md5:bef4ecab320f06d8554ea6380940ec79",
            "sha256:346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "sha256:cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        ),
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    RemoteFile(
        "t10k-labels-idx1-ubyte.gz",
        (
            "md5:bb300cfdad3c16e7a12a480ee83cd310",
            "sha256:67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            "sha256:8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        ),
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
)
# MNIST: md5 as published with torchvision's MNIST dataset class (torchvision/datasets/mnist.py);
# sha256 from tensorflow/datasets tensorflow_datasets/url_checksums/mnist.txt (sizes 9912422 /
# 28881 / 1648877 / 4542 bytes). Neither could be recomputed here (no copy of MNIST on this
# machine). No payload digest is known, so a re-packed gzip does not verify.
_MNIST_FILES = (
    RemoteFile(
        "train-images-idx3-ubyte.gz",
        (
            "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "sha256:440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
    ),
    RemoteFile(
        "train-labels-idx1-ubyte.gz",
        (
            "md5:d53e105ee54ea40749a09fcbcd1e9432",
            "sha256:3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        ),
    ),
    RemoteFile(
        "t10k-images-idx3-ubyte.gz",
        (
            "md5:9fb629c4189551a2d022fa330f9573f3",
            "sha256:8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
    ),
    RemoteFile(
        "t10k-labels-idx1-ubyte.gz",
        (
            "md5:ec29112dd5afa0611ce80d1b7f02629c",
            "sha256:f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
    ),
)
# CIFAR-10 python version: md5 as published on https://www.cs.toronto.edu/~kriz/cifar.html (also
# torchvision's CIFAR10.tgz_md5); sha256 as used by Keras (keras/datasets/cifar10.py file_hash) and
# torchvision's prototype datasets; size 170498071 bytes. Not recomputed here (no copy on this
# machine).
_CIFAR10_FILES = (
    RemoteFile(
        CIFAR10_ARCHIVE,
        (
            "md5:c58f30108f718f92721af3b95e74349a",
            "sha256:6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        ),
    ),
)

#: The known datasets. Keys are the canonical names accepted by :func:`load_dataset`.
DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        kind="idx",
        num_classes=10,
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        folder_names=("fashion_mnist", "fashion-mnist"),
        system_folder="fashion-mnist",
        files=_FASHION_FILES,
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
        ),
        install_hint="sudo apt-get install dataset-fashion-mnist",
    ),
    "mnist": DatasetSpec(
        name="mnist",
        kind="idx",
        num_classes=10,
        class_names=tuple(str(i) for i in range(10)),
        folder_names=("mnist",),
        system_folder="mnist",
        files=_MNIST_FILES,
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        kind="cifar",
        num_classes=10,
        class_names=(),  # read from batches.meta
        folder_names=("cifar10", "cifar-10"),
        system_folder="cifar10",
        files=_CIFAR10_FILES,
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
    ),
}


class Dataset(NamedTuple):
    """A loaded dataset.

    Attributes:
      train_x: ``(n_train, d)`` (``flatten=True``; ``d = H*W*C`` in row-major ``(h, w, c)``
        order, i.e. the NHWC array reshaped) or ``(n_train, H, W, C)`` normalised inputs
        (``dtype``, float32 by default); MNIST-like images have ``C = 1``.
      train_y: ``(n_train,)`` int32 labels in ``[0, num_classes)``.
      test_x, test_y: the same for the test set (normalised with the TRAINING statistics).
      num_classes: number of classes (10 for all three).
      name: canonical dataset name.
      source: the folder or archive the raw data came from.
      class_names: class names in label order.
      mean, std: the statistics used, ``x_normalised = (x_raw - mean) / std`` with ``x_raw`` in
        ``0..255``, shaped like one sample of ``train_x`` (float32).
      normalize: the normalisation mode used.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    name: str
    source: Path
    class_names: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    normalize: str


# --- helpers -------------------------------------------------------------------------------------


def _canonical_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = {"fashionmnist": "fashion_mnist", "cifar_10": "cifar10"}.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return key


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/apts_jax`` if ``XDG_CACHE_HOME`` is an absolute path, else
    ``~/.cache/apts_jax``."""
    # Not pooch.os_cache: platformdirs accepts a relative $XDG_CACHE_HOME and differs on macOS.
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "apts_jax"
    return Path.home() / ".cache" / "apts_jax"


def _idx_candidates(base: str) -> tuple[str, ...]:
    dotted = base.replace("-idx", ".idx")  # e.g. train-images.idx3-ubyte (a common re-packing)
    return (f"{base}.gz", base, f"{dotted}.gz", dotted)


def _find_idx_files(folder: Path) -> dict[str, Path] | None:
    found = {}
    for role, base in _IDX_ROLES.items():
        for cand in _idx_candidates(base):
            if (folder / cand).is_file():
                found[role] = folder / cand
                break
        else:
            return None
    return found


def _probe_folder(spec: DatasetSpec, folder: Path) -> tuple[Path | dict[str, Path] | None, str]:
    """``(found, why_not)``: the dataset's files in ``folder`` (directly), else a reason."""
    if not folder.is_dir():
        return None, f"{folder} does not exist"
    if spec.kind == "idx":
        files = _find_idx_files(folder)
        if files is not None:
            return files, ""
        missing = [b for b in _IDX_ROLES.values()
                   if not any((folder / c).is_file() for c in _idx_candidates(b))]
        return None, f"{folder} lacks {', '.join(m + '[.gz]' for m in missing)}"
    source = find_cifar10(folder)
    if source is not None:
        return source, ""
    return None, f"{folder} lacks {CIFAR10_ARCHIVE} and cifar-10-batches-py/"


def _probe_root(spec: DatasetSpec, root: Path, subfolders: bool) -> tuple[object, str]:
    """Probe ``root/<folder name>`` (when ``subfolders``) then ``root`` itself."""
    candidates = [root / n for n in spec.folder_names] if subfolders else []
    candidates.append(root)
    reasons = []
    for folder in candidates:
        found, why = _probe_folder(spec, folder)
        if found is not None:
            return found, ""
        if folder.is_dir() or folder == root:
            reasons.append(why)
    return None, "; ".join(reasons)


def _checksum_matches(path: Path, checksums: tuple[str, ...]) -> bool:
    """Whether ``path`` matches ANY of ``checksums`` (``"md5:<hex>"`` / ``"sha256:<hex>"``)."""
    import pooch

    return any(pooch.hashes.hash_matches(str(path), item) for item in checksums)


def _gunzip_sha256(path: Path) -> str | None:
    # Hand-written: pooch hashes files as stored; this digests the gzip payload (re-packed mirrors).
    h = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                h.update(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return h.hexdigest()


def verify_file(path: str | os.PathLike[str], remote: RemoteFile) -> bool:
    """Whether ``path`` matches one of ``remote.checksums`` or, for gzip, ``content_sha256``.

    Returns ``True`` when ``remote`` lists no checksum at all (nothing to verify against).
    """
    path = Path(path)
    if not remote.checksums and remote.content_sha256 is None:
        return True
    if _checksum_matches(path, remote.checksums):
        return True
    return remote.content_sha256 is not None and _gunzip_sha256(path) == remote.content_sha256


def _verifying_downloader(remote: RemoteFile, timeout: float):
    """A pooch downloader that fetches ``url`` and then checks it against ``remote``.

    pooch checks one ``known_hash``; a file here may match any of several digests (official,
    Debian, gunzipped payload), so the check runs inside the downloader, on pooch's temporary
    file, before pooch renames it into place (and pooch deletes it when this raises).
    """
    import pooch

    http = pooch.HTTPDownloader(progressbar=False, timeout=timeout,
                                headers={"User-Agent": "apts_jax"})

    def download(url: str, output_file: str, pup: object) -> None:
        if url.startswith("file://"):  # pooch has no downloader for local mirrors
            shutil.copyfile(urllib.request.url2pathname(urllib.parse.urlparse(url).path),
                            output_file)
        else:
            http(url, output_file, pup)
        if not remote.checksums and remote.content_sha256 is None:
            warnings.warn(
                f"no checksum is known for {remote.filename}; {url} was not verified",
                stacklevel=4,
            )
        elif not verify_file(output_file, remote):
            got = {alg: pooch.file_hash(output_file, alg=alg) for alg in ("sha256", "md5")}
            expected = list(remote.checksums)
            if remote.content_sha256:
                expected.append(f"sha256 of the gunzipped content:{remote.content_sha256}")
            raise ChecksumMismatchError(
                f"{url}: checksum mismatch for {remote.filename} "
                f"({os.path.getsize(output_file)} bytes): got sha256:{got['sha256']} "
                f"md5:{got['md5']}, expected one of {', '.join(expected)}. The download was "
                f"deleted and nothing was written to {Path(output_file).parent}; the mirror "
                "serves a corrupt or different file."
            )

    return download


def download_file(
    url: str, dest: str | os.PathLike[str], remote: RemoteFile, *, timeout: float = DEFAULT_TIMEOUT
) -> Path:
    """Download ``url`` to ``dest`` with :func:`pooch.retrieve`, verifying ``remote``'s checksums.

    pooch streams the data to a temporary file next to ``dest`` (same folder) and renames it to
    ``dest`` only after the check passed; on any failure (network error, checksum mismatch,
    interruption) the temporary file is removed. An existing ``dest`` is returned as it is.

    Raises:
      ChecksumMismatchError: the file matches none of the known digests.
      OSError (e.g. ``requests.HTTPError``, ``requests.ConnectionError``): the download failed.
    """
    import pooch

    dest = Path(dest)
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel("WARNING")  # pooch's INFO lines suggest a known_hash; we verified already
    try:
        pooch.retrieve(url, known_hash=None, fname=dest.name, path=dest.parent,
                       downloader=_verifying_downloader(remote, timeout), progressbar=False)
    finally:
        logger.setLevel(level)
    return dest


def _mirror_urls(spec: DatasetSpec, filename: str, mirror: str | None) -> list[str]:
    if mirror:
        return [f"{mirror.rstrip('/')}/{spec.name}/{filename}"]
    return [base + filename for base in spec.mirrors]


def _download_into(
    spec: DatasetSpec, folder: Path, mirror: str | None, timeout: float
) -> tuple[bool, str]:
    """Fetch the missing files of ``spec`` into ``folder``; ``(ok, why_not)``.

    Network failures are reported (the caller raises the combined error); a checksum mismatch is
    raised at once. A cache folder created here and left empty by a failure is removed again.
    """
    created = not folder.exists()
    try:
        return _download_files(spec, folder, mirror, timeout)
    finally:
        if created and folder.is_dir() and not any(folder.iterdir()):
            with contextlib.suppress(OSError):  # e.g. another process just wrote into it
                folder.rmdir()


def _download_files(
    spec: DatasetSpec, folder: Path, mirror: str | None, timeout: float
) -> tuple[bool, str]:
    for remote in spec.files:
        dest = folder / remote.filename
        if dest.is_file():
            continue  # only verified files are ever renamed into the cache
        errors = []
        # pooch fetches one URL per file; falling back from one mirror to the next is ours.
        for url in _mirror_urls(spec, remote.filename, mirror):
            try:
                download_file(url, dest, remote, timeout=timeout)
                break
            except ChecksumMismatchError:
                raise
            except (OSError, TimeoutError, ValueError) as exc:  # requests' errors are OSErrors
                errors.append(f"{url}: {exc}")
        else:
            return False, "; ".join(errors)
    return True, ""


# --- normalisation -------------------------------------------------------------------------------


def _statistics(x: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)`` of uint8 ``x`` of shape ``(n, H, W, C)``, shaped ``(H, W, C)``, float64.

    The sums of ``x`` and ``x**2`` are accumulated exactly in int64, in chunks of rows, then
    ``mean = S1 / count`` and ``var = S2 / count - mean**2`` in float64. Features (or channels)
    that are constant over the training set get ``std = 1``.
    """
    shape = x.shape[1:]
    if mode == "unit_range":
        return np.zeros(shape), np.full(shape, 255.0)
    axes = {"per_feature": (0,), "per_channel": (0, 1, 2), "global": (0, 1, 2, 3)}[mode]
    count = math.prod(x.shape[a] for a in axes)
    s1 = s2 = 0
    lo = hi = None
    for start in range(0, x.shape[0], 2048):
        chunk = x[start:start + 2048]
        s1 = s1 + chunk.sum(axis=axes, dtype=np.int64, keepdims=True)
        sq = chunk.astype(np.int32)
        sq *= sq
        s2 = s2 + sq.sum(axis=axes, dtype=np.int64, keepdims=True)
        cmin, cmax = chunk.min(axis=axes, keepdims=True), chunk.max(axis=axes, keepdims=True)
        lo = cmin if lo is None else np.minimum(lo, cmin)
        hi = cmax if hi is None else np.maximum(hi, cmax)
    mean = s1.astype(np.float64) / count
    var = np.maximum(s2.astype(np.float64) / count - mean * mean, 0.0)
    std = np.where(hi > lo, np.sqrt(var), 1.0)
    return np.broadcast_to(mean[0], shape).copy(), np.broadcast_to(std[0], shape).copy()


def _apply(x: np.ndarray, mean: np.ndarray, std: np.ndarray, dtype: np.dtype) -> np.ndarray:
    out = np.empty(x.shape, dtype=dtype)
    m = mean.astype(dtype)
    inv = (1.0 / std).astype(dtype)
    for start in range(0, x.shape[0], 4096):
        out[start:start + 4096] = (x[start:start + 4096].astype(dtype) - m) * inv
    return out


# --- public API ----------------------------------------------------------------------------------


def find_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path | None:
    """Where :func:`load_dataset` would read ``name`` from without downloading, or ``None``.

    Returns the folder holding the IDX files, or the CIFAR-10 folder / archive.
    """
    spec = DATASETS[_canonical_name(name)]
    found, _ = _locate(spec, data_dir, cache_dir)
    if found is None:
        return None
    if isinstance(found, dict):
        return next(iter(found.values())).parent
    return found


def _env_roots() -> list[Path]:
    raw = os.environ.get(ENV_DATA_DIR, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p]


def _cache_folder(spec: DatasetSpec, cache_dir: str | os.PathLike[str] | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / spec.name


def _locate(spec, data_dir, cache_dir) -> tuple[object, list[str]]:
    """Walk routes 1-4; ``(found, report lines)``."""
    report = []
    if data_dir is None:
        report.append("data_dir argument: not given")
    else:
        found, why = _probe_root(spec, Path(data_dir).expanduser(), subfolders=True)
        if found is not None:
            return found, report
        report.append(f"data_dir argument: {why}")
    roots = _env_roots()
    if not roots:
        report.append(f"${ENV_DATA_DIR}: not set")
    for root in roots:
        found, why = _probe_root(spec, root, subfolders=True)
        if found is not None:
            return found, report
        report.append(f"${ENV_DATA_DIR}: {why}")
    system = Path(SYSTEM_DATA_ROOT) / spec.system_folder
    found, why = _probe_folder(spec, system)
    if found is not None:
        return found, report
    report.append(f"system datasets folder: {why}")
    cache = _cache_folder(spec, cache_dir)
    found, why = _probe_folder(spec, cache)
    if found is not None:
        return found, report
    report.append(f"user cache: {why}")
    return None, report


def _not_found(spec: DatasetSpec, report: list[str], cache: Path, mirror: str | None) -> str:
    names = ([r.filename for r in spec.files] if spec.kind == "idx"
             else [CIFAR10_ARCHIVE, "or cifar-10-batches-py/ (" + ", ".join(CIFAR10_FILES) + ")"])
    lines = [f"Could not load dataset {spec.name!r}. Routes tried, in order:"]
    lines += [f"  {i}. {r}" for i, r in enumerate(report, 1)]
    lines.append("How to fix (any one of):")
    if spec.install_hint:
        lines.append(
            f"  * on Debian/Ubuntu: `{spec.install_hint}` (installs"
            f" {Path(SYSTEM_DATA_ROOT) / spec.system_folder})"
        )
    lines.append(
        f"  * put {', '.join(names)} into a folder and pass data_dir=<folder> or set"
        f" {ENV_DATA_DIR}=<folder> (files directly in it or in a subfolder"
        f" {spec.folder_names[0]}/), or copy them into {cache}"
    )
    lines.append(
        f"  * allow downloads (download=True, network access), or set {ENV_MIRROR} (or mirror=)"
        f" to a reachable mirror serving <mirror>/{spec.name}/<file>"
        + (f" (current mirror: {mirror})" if mirror else "")
    )
    return "\n".join(lines)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    mirror: str | None = None,
    flatten: bool = True,
    normalize: Normalize = "per_channel",
    subset: int | tuple[int | None, int | None] | None = None,
    dtype: npt.DTypeLike = np.float32,
    timeout: float = DEFAULT_TIMEOUT,
) -> Dataset:
    """Load ``"fashion_mnist"``, ``"mnist"`` or ``"cifar10"`` as normalised arrays.

    The raw data is looked up along the routes in the module docstring (``data_dir``,
    ``$APTS_JAX_DATA_DIR``, ``/usr/share/datasets/<name>``, the user cache, then a verified
    download into the cache when ``download`` is true).

    Normalisation uses TRAINING-set statistics only (of the training samples actually returned,
    i.e. after ``subset``); the test set is transformed with the same ``mean`` and ``std``:
    ``x = (raw - mean) / std`` with ``raw`` the 0..255 pixel values and

    * ``"per_channel"`` (default): one mean/std per colour channel, over all training pixels of
      that channel (for the grey-scale MNIST-like sets this equals ``"global"``);
    * ``"global"``: one scalar mean/std over all training pixels and channels;
    * ``"per_feature"``: one mean/std per input feature (pixel and channel); features constant on
      the training set get ``std = 1`` (beware: near-constant border pixels get a tiny std);
    * ``"unit_range"``: ``mean = 0``, ``std = 255``, i.e. ``x = raw / 255`` in ``[0, 1]``.

    The statistics are computed in float64 and returned in :attr:`Dataset.mean` / ``std``.

    Args:
      name: ``"fashion_mnist"`` (or ``"fashion-mnist"``), ``"mnist"``, ``"cifar10"``.
      data_dir: a folder to look in first (files directly or in a subfolder named after the set).
      download: whether to download into the cache if no local copy is found.
      cache_dir: the cache root (default :func:`default_cache_dir`); files go to
        ``<cache_dir>/<name>/``.
      mirror: base URL replacing the official locations (default ``$APTS_JAX_DATA_MIRROR``); the
        file ``f`` is fetched from ``<mirror>/<name>/f``.
      flatten: return inputs as ``(n, d)`` (default) instead of ``(n, H, W, C)``.
      normalize: see above.
      subset: ``k`` to keep the first ``k`` training and the first ``k`` test samples, or
        ``(k_train, k_test)`` (``None`` keeps all of that split); for quick runs.
      dtype: floating dtype of the inputs (default float32).
      timeout: seconds per network operation of a download.

    Returns:
      :class:`Dataset`.

    Raises:
      ValueError: unknown name or normalisation, bad ``subset``.
      DatasetNotFoundError: no route worked; the message lists every route and how to fix it.
      ChecksumMismatchError: a download did not verify (nothing was cached).
      IDXFormatError, CIFARFormatError: the files found are malformed.
    """
    spec = DATASETS[_canonical_name(name)]
    if normalize not in ("per_channel", "global", "per_feature", "unit_range"):
        raise ValueError(
            f"normalize must be 'per_channel', 'global', 'per_feature' or 'unit_range', got"
            f" {normalize!r}"
        )
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    k_train, k_test = _parse_subset(subset)
    if mirror is None:
        mirror = os.environ.get(ENV_MIRROR) or None

    found, report = _locate(spec, data_dir, cache_dir)
    cache = _cache_folder(spec, cache_dir)
    if found is None:
        if not download:
            report.append("download: disabled (download=False)")
        else:
            ok, why = _download_into(spec, cache, mirror, timeout)
            if ok:
                found, why = _probe_folder(spec, cache)
            if found is None:
                report.append(f"download into {cache}: {why}")
        if found is None:
            raise DatasetNotFoundError(_not_found(spec, report, cache, mirror))

    train_x, train_y, test_x, test_y, class_names, source = _read(spec, found)
    train_x, train_y = train_x[:k_train], train_y[:k_train]
    test_x, test_y = test_x[:k_test], test_y[:k_test]
    if train_x.shape[0] == 0:
        raise ValueError(f"{source}: the training set is empty")
    mean, std = _statistics(train_x, normalize)
    train_f = _apply(train_x, mean, std, dtype)
    test_f = _apply(test_x, mean, std, dtype)
    if flatten:
        train_f = train_f.reshape(train_f.shape[0], -1)
        test_f = test_f.reshape(test_f.shape[0], -1)
        mean, std = mean.reshape(-1), std.reshape(-1)
    return Dataset(
        train_x=train_f,
        train_y=train_y.astype(np.int32),
        test_x=test_f,
        test_y=test_y.astype(np.int32),
        num_classes=spec.num_classes,
        name=spec.name,
        source=source,
        class_names=class_names,
        mean=mean.astype(dtype),
        std=std.astype(dtype),
        normalize=normalize,
    )


def _parse_subset(subset) -> tuple[int | None, int | None]:
    if subset is None:
        return None, None
    pair = (subset, subset) if not isinstance(subset, tuple) else subset
    if len(pair) != 2:
        raise ValueError(f"subset must be an int or a pair (k_train, k_test), got {subset!r}")
    for k in pair:
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
            raise ValueError(f"subset sizes must be positive ints or None, got {subset!r}")
    return pair[0], pair[1]


def _read(spec: DatasetSpec, found):
    if spec.kind == "idx":
        assert isinstance(found, dict)
        tr_x, tr_y = load_idx_pair(found["train_images"], found["train_labels"],
                                   num_classes=spec.num_classes)
        te_x, te_y = load_idx_pair(found["test_images"], found["test_labels"],
                                   num_classes=spec.num_classes)
        if tr_x.shape[1:] != te_x.shape[1:]:
            raise IDXFormatError(
                f"{tr_x.path} / {te_x.path}: bad dims: training images are {tr_x.shape[1:]},"
                f" test images {te_x.shape[1:]}"
            )
        for arr in (tr_x, te_x):
            if arr.dtype != np.uint8:
                raise IDXFormatError(f"{arr.path}: expected uint8 pixels, found {arr.dtype}")
        source = found["train_images"].parent
        return (tr_x.data[..., None], tr_y.data, te_x.data[..., None], te_y.data,
                spec.class_names, source)
    data = load_cifar10(found)
    return data.train_x, data.train_y, data.test_x, data.test_y, data.class_names, data.source
