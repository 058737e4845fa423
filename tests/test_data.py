"""Tests of apts_jax.data readers and load_dataset (generated files; real Fashion-MNIST if present).

No test touches the internet: an autouse fixture points the mirror at a closed local port, the
cache at tmp_path and the system datasets folder at an empty folder; the download tests serve
generated files from http.server on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from apts_jax.data import (
    DATASETS,
    ENV_DATA_DIR,
    ENV_MIRROR,
    ChecksumMismatchError,
    CIFARFormatError,
    DatasetNotFoundError,
    IDXFormatError,
    RemoteFile,
    default_cache_dir,
    find_dataset,
    load_cifar10,
    load_dataset,
    load_idx_pair,
    read_cifar_batch,
    read_idx,
    verify_file,
)
from apts_jax.data import datasets as ds_mod

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
         np.float64: 0x0E}


# --------------------------------------------------------------------------------------------------
# helpers


def idx_bytes(arr: np.ndarray) -> bytes:
    """Independent IDX writer (struct based)."""
    arr = np.asarray(arr)
    code = CODES[arr.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_file(path: Path, payload: bytes, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path


def make_mnist_dir(folder: Path, n_train: int = 12, n_test: int = 6, *, gz: bool = True,
                   seed: int = 0, hw: tuple[int, int] = (4, 5)) -> dict[str, np.ndarray]:
    """Write a tiny MNIST-like set; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for role, base in IDX_NAMES.items():
        write_file(folder / (base + (".gz" if gz else "")), idx_bytes(arrays[role]), gz)
    return arrays


def cifar_batch_bytes(data: np.ndarray, labels: list[int], py2_names: bool = True) -> bytes:
    """A CIFAR-style batch pickle; with ``py2_names`` the numpy globals are renamed to
    ``numpy.core.multiarray`` as in the real (Python 2 / numpy 1) files."""
    raw = pickle.dumps(
        {b"batch_label": b"batch", b"labels": labels, b"data": data,
         b"filenames": [b"x.png"] * len(labels)},
        protocol=2,
    )
    if py2_names:
        raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    return raw


def make_cifar(folder: Path, n: int = 3, seed: int = 0) -> dict[str, tuple[np.ndarray, list]]:
    """Write ``folder/cifar-10-batches-py`` with n images per batch; returns the raw batches."""
    rng = np.random.default_rng(seed)
    out = folder / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        (out / name).write_bytes(cifar_batch_bytes(data, labels))
        batches[name] = (data, labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    (out / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": names, b"num_cases_per_batch": n, b"num_vis": 3072},
                     protocol=2)
    )
    return batches


def make_tar(src_dir: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src_dir, arcname="cifar-10-batches-py")
    return archive


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No env data dir, cache under tmp, empty system folder, mirror on a closed local port."""
    monkeypatch.delenv(ENV_DATA_DIR, raising=False)
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # the local test server must be reached directly
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(ENV_MIRROR, f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(ds_mod, "SYSTEM_DATA_ROOT", tmp_path / "system")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# IDX reader


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", list(CODES))
def test_idx_roundtrip(tmp_path, gz, dtype):
    rng = np.random.default_rng(1)
    arr = (rng.normal(size=(3, 4, 2)) * 50).astype(dtype)
    path = write_file(tmp_path / "a.idx", idx_bytes(arr), gz)
    out = read_idx(path)
    np.testing.assert_array_equal(out.data, arr)
    assert out.shape == (3, 4, 2) and out.data.shape == (3, 4, 2)
    assert out.dtype == np.dtype(dtype) and out.data.dtype.isnative
    assert out.type_code == CODES[dtype] and out.compressed is gz and out.path == path
    out.data[0, 0, 0] = 1  # writable copy


def test_idx_compression_detected_by_content(tmp_path):
    arr = np.arange(6, dtype=np.uint8)
    raw_named_gz = write_file(tmp_path / "raw.gz", idx_bytes(arr), gz=False)
    gz_named_raw = write_file(tmp_path / "plain-ubyte", idx_bytes(arr), gz=True)
    assert read_idx(raw_named_gz).compressed is False
    assert read_idx(gz_named_raw).compressed is True
    np.testing.assert_array_equal(read_idx(gz_named_raw).data, arr)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda b: b"\x01" + b[1:], "wrong magic number 0x01000803.*two zero bytes"),
        (lambda b: b[:2] + b"\x07" + b[3:], "wrong magic.*unknown data type code 0x07"),
        (lambda b: b[:3] + b"\x00" + b[4:], "wrong magic.*bad number of dimensions 0"),
        (lambda b: b[:3] + b"\x63" + b[4:], "bad number of dimensions 99"),
        (lambda b: b[:-7], "truncated: dims \\(2, 3, 4\\) of uint8 need 40 .*bytes.*has 33"),
        (lambda b: b + b"\x00\x00", "2 trailing bytes.*need 40.*has 42"),
        (lambda b: b[:9], "truncated header: 3 dims need 16 .*has 9"),
        (lambda b: b[:3], "only 3 .*bytes"),
        (lambda b: b[:4] + struct.pack(">3I", 2, 3, 5) + b[16:], "truncated.*need 46.*has 40"),
    ],
    ids=["nonzero", "typecode", "ndim0", "ndim99", "truncated", "trailing", "header", "tiny",
         "bad-dims"],
)
def test_idx_corruption(tmp_path, gz, mutate, pattern):
    good = idx_bytes(np.zeros((2, 3, 4), np.uint8))
    path = write_file(tmp_path / "bad-idx3-ubyte", mutate(good), gz)
    with pytest.raises(IDXFormatError, match=pattern) as info:
        read_idx(path)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(str(path))


def test_idx_truncated_gzip_stream(tmp_path):
    payload = idx_bytes(np.random.default_rng(0).integers(0, 256, (50, 10, 10), dtype=np.uint8))
    comp = gzip.compress(payload)
    path = tmp_path / "cut.gz"
    path.write_bytes(comp[: len(comp) // 2])
    with pytest.raises(IDXFormatError, match=r"cut\.gz: truncated gzip stream"):
        read_idx(path)
    path.write_bytes(b"\x1f\x8b" + b"garbage" * 5)
    with pytest.raises(IDXFormatError, match="corrupt gzip stream"):
        read_idx(path)


def test_idx_missing_file_and_expected_ndim(tmp_path):
    with pytest.raises(IDXFormatError, match="nope.gz: file not found"):
        read_idx(tmp_path / "nope.gz")
    path = write_file(tmp_path / "labels", idx_bytes(np.zeros(5, np.uint8)), gz=False)
    with pytest.raises(IDXFormatError, match="bad dims: the header declares 1 dim.*expected 3"):
        read_idx(path, expected_ndim=3)


def test_idx_pair_checks(tmp_path):
    imgs = write_file(tmp_path / "i.gz", idx_bytes(np.zeros((5, 2, 2), np.uint8)), gz=True)
    labs = write_file(tmp_path / "l.gz", idx_bytes(np.array([0, 1, 2, 3, 9], np.uint8)), gz=True)
    x, y = load_idx_pair(imgs, labs, num_classes=10)
    assert x.shape == (5, 2, 2) and y.shape == (5,)
    short = write_file(tmp_path / "s.gz", idx_bytes(np.zeros(4, np.uint8)), gz=True)
    with pytest.raises(IDXFormatError, match=r"i\.gz / .*s\.gz: count mismatch: 5 images but 4"):
        load_idx_pair(imgs, short)
    with pytest.raises(IDXFormatError, match="l.gz: labels out of range.*\\[0, 9\\].*\\[0, 4\\]"):
        load_idx_pair(imgs, labs, num_classes=5)
    with pytest.raises(IDXFormatError, match="bad dims"):  # swapped files
        load_idx_pair(labs, imgs)


# --------------------------------------------------------------------------------------------------
# CIFAR-10 reader


def _expected_images(data: np.ndarray) -> np.ndarray:
    """Independent NHWC conversion: pixel (h, w) of channel ch is data[ch*1024 + h*32 + w]."""
    n = data.shape[0]
    out = np.empty((n, 32, 32, 3), np.uint8)
    for ch in range(3):
        out[..., ch] = data[:, ch * 1024:(ch + 1) * 1024].reshape(n, 32, 32)
    return out


@pytest.mark.parametrize("where", ["batches_dir", "parent_dir", "tar", "tar_in_dir"])
def test_cifar_roundtrip(tmp_path, where):
    batches = make_cifar(tmp_path / "src")
    make_tar(tmp_path / "src" / "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")
    path = {
        "batches_dir": tmp_path / "src" / "cifar-10-batches-py",
        "parent_dir": tmp_path / "src",
        "tar": tmp_path / "cifar-10-python.tar.gz",
        "tar_in_dir": tmp_path,
    }[where]
    if where == "tar_in_dir":
        import shutil

        shutil.rmtree(tmp_path / "src")
    data = load_cifar10(path)
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    train_raw = np.concatenate([b[0] for b in train])
    np.testing.assert_array_equal(data.train_x, _expected_images(train_raw))
    np.testing.assert_array_equal(data.train_y, np.concatenate([b[1] for b in train]))
    np.testing.assert_array_equal(data.test_x, _expected_images(batches["test_batch"][0]))
    np.testing.assert_array_equal(data.test_y, batches["test_batch"][1])
    assert data.train_x.shape == (15, 32, 32, 3) and data.train_x.dtype == np.uint8
    assert data.test_y.dtype == np.int32
    assert data.class_names[0] == "airplane" and data.class_names[-1] == "truck"


def test_cifar_missing_batches(tmp_path):
    make_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    (folder / "test_batch").unlink()
    with pytest.raises(CIFARFormatError, match=r"missing batch file\(s\) data_batch_3, test_batch"):
        load_cifar10(folder)
    make_tar(folder, tmp_path / "a.tar.gz")
    with pytest.raises(CIFARFormatError, match="a.tar.gz: incomplete.*data_batch_3, test_batch"):
        load_cifar10(tmp_path / "a.tar.gz")
    with pytest.raises(CIFARFormatError, match="no CIFAR-10 data found"):
        load_cifar10(tmp_path / "empty")


def test_cifar_truncated_and_corrupt_batches(tmp_path):
    make_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    raw = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CIFARFormatError, match="data_batch_2: truncated pickle"):
        load_cifar10(folder)
    (folder / "data_batch_2").write_bytes(b"not a pickle at all")
    with pytest.raises(CIFARFormatError, match="data_batch_2: corrupt pickle"):
        load_cifar10(folder)
    bad_shape = cifar_batch_bytes(np.zeros((2, 100), np.uint8), [0, 1])
    with pytest.raises(CIFARFormatError, match=r"'data' must be a uint8 array of shape \(n, 307"):
        read_cifar_batch(io.BytesIO(bad_shape), "b")
    mismatch = cifar_batch_bytes(np.zeros((2, 3072), np.uint8), [0, 1, 2])
    with pytest.raises(CIFARFormatError, match="b: count mismatch: 2 images but 3 labels"):
        read_cifar_batch(io.BytesIO(mismatch), "b")
    out_of_range = cifar_batch_bytes(np.zeros((2, 3072), np.uint8), [0, 10])
    with pytest.raises(CIFARFormatError, match="labels out of range"):
        read_cifar_batch(io.BytesIO(out_of_range), "b")
    with pytest.raises(CIFARFormatError, match="no 'labels' entry"):
        read_cifar_batch(io.BytesIO(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)})), "b")


def test_cifar_truncated_archive(tmp_path):
    make_cifar(tmp_path, n=40)
    archive = make_tar(tmp_path / "cifar-10-batches-py", tmp_path / "c.tar.gz")
    raw = archive.read_bytes()
    archive.write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(CIFARFormatError, match="c.tar.gz.*(truncated|incomplete)"):
        load_cifar10(archive)


class _Evil:
    def __reduce__(self):
        return (os.getpid, ())


def test_cifar_unpickler_refuses_foreign_globals(tmp_path):
    payload = pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2)
    with pytest.raises(CIFARFormatError, match="refusing to load global"):
        read_cifar_batch(io.BytesIO(payload), "evil")


# --------------------------------------------------------------------------------------------------
# real Fashion-MNIST (Debian package dataset-fashion-mnist)

needs_real = pytest.mark.skipif(
    not all((REAL_FASHION / f"{b}.gz").is_file() for b in IDX_NAMES.values()),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@needs_real
def test_real_fashion_mnist_files():
    x, y = load_idx_pair(REAL_FASHION / "train-images-idx3-ubyte.gz",
                         REAL_FASHION / "train-labels-idx1-ubyte.gz", num_classes=10)
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8 and x.compressed
    assert y.shape == (60000,) and y.data.min() == 0 and y.data.max() == 9
    np.testing.assert_array_equal(np.bincount(y.data), np.full(10, 6000))
    xt, yt = load_idx_pair(REAL_FASHION / "t10k-images-idx3-ubyte.gz",
                           REAL_FASHION / "t10k-labels-idx1-ubyte.gz", num_classes=10)
    assert xt.shape == (10000, 28, 28) and yt.shape == (10000,)
    np.testing.assert_array_equal(np.bincount(yt.data), np.full(10, 1000))


@needs_real
def test_debian_fashion_mnist_is_the_official_data():
    """The registry accepts the Debian files, and they are the official files up to the gzip header:
    restoring the stored name and the original mtime gives the official MD5 and SHA-256."""
    mtimes = {"train": 1504176606, "t10k": 1504176627}
    for remote in DATASETS["fashion_mnist"].files:
        path = REAL_FASHION / remote.filename
        assert verify_file(path, remote)
        raw = path.read_bytes()
        assert raw[3] == 0  # Debian: no FNAME flag
        name = remote.filename[:-3].encode() + b"\0"
        official = (b"\x1f\x8b\x08\x08" + struct.pack("<I", mtimes[remote.filename.split("-")[0]])
                    + raw[8:10] + name + raw[10:])
        md5, sha = remote.checksums[0], remote.checksums[1]
        assert md5 == "md5:" + hashlib.md5(official).hexdigest()
        assert sha == "sha256:" + hashlib.sha256(official).hexdigest()
        assert remote.content_sha256 == hashlib.sha256(gzip.decompress(raw)).hexdigest()


@needs_real
def test_load_real_fashion_mnist_from_system_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(ds_mod, "SYSTEM_DATA_ROOT", Path("/usr/share/datasets"))
    d = load_dataset("fashion-mnist", download=False, cache_dir=tmp_path / "cache")
    assert d.source == REAL_FASHION and d.name == "fashion_mnist" and d.num_classes == 10
    assert d.train_x.shape == (60000, 784) and d.train_x.dtype == np.float32
    assert d.test_x.shape == (10000, 784) and d.train_y.dtype == np.int32
    assert abs(float(d.train_x.mean(dtype=np.float64))) < 1e-5
    assert abs(float(d.train_x.std(dtype=np.float64)) - 1.0) < 1e-4
    # the test set is transformed with the training statistics (so its mean is not exactly 0)
    assert 1e-4 < abs(float(d.test_x.mean(dtype=np.float64))) < 0.05
    np.testing.assert_allclose(d.mean, 72.94035, rtol=1e-5)  # 0.2860 * 255
    assert d.class_names[9] == "Ankle boot"


# --------------------------------------------------------------------------------------------------
# load_dataset: lookup order, normalisation, subset


def _route_dirs(tmp_path):
    return {
        "data_dir": tmp_path / "explicit",
        "env": tmp_path / "env",
        "system": tmp_path / "system" / "fashion-mnist",
        "cache": tmp_path / "cache" / "fashion_mnist",
    }


def test_lookup_order(monkeypatch, tmp_path):
    dirs = _route_dirs(tmp_path)
    # each route gets a different number of training samples, to identify it
    make_mnist_dir(dirs["data_dir"] / "fashion-mnist", n_train=11)  # subfolder with a dash
    make_mnist_dir(dirs["env"], n_train=12)  # files directly in the env folder
    make_mnist_dir(dirs["system"], n_train=13)
    make_mnist_dir(dirs["cache"], n_train=14)
    monkeypatch.setenv(ENV_DATA_DIR, str(dirs["env"]))
    kw = dict(download=False, cache_dir=tmp_path / "cache")
    expected = [("data_dir", 11), ("env", 12), ("system", 13), ("cache", 14)]
    for route, n in expected:
        d = load_dataset("fashion_mnist", tmp_path / "explicit", **kw)
        assert d.train_x.shape[0] == n, route
        if route == "data_dir":
            assert d.source == dirs["data_dir"] / "fashion-mnist"
            assert find_dataset("fashion_mnist", tmp_path / "explicit",
                                cache_dir=tmp_path / "cache") == d.source
        else:
            assert d.source == dirs[route]
        # disable this route for the next round
        if route == "env":
            monkeypatch.delenv(ENV_DATA_DIR)
        else:
            import shutil

            shutil.rmtree(dirs[route])
    with pytest.raises(DatasetNotFoundError):
        load_dataset("fashion_mnist", tmp_path / "explicit", **kw)


def test_env_var_subfolder_and_pathsep(monkeypatch, tmp_path):
    make_mnist_dir(tmp_path / "b" / "fashion_mnist", n_train=7)
    monkeypatch.setenv(ENV_DATA_DIR, os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    d = load_dataset("fashion_mnist", download=False)
    assert d.source == tmp_path / "b" / "fashion_mnist" and d.train_x.shape[0] == 7


def test_default_cache_dir(monkeypatch, tmp_path):
    assert default_cache_dir() == tmp_path / "xdg" / "apts_jax"
    make_mnist_dir(tmp_path / "xdg" / "apts_jax" / "mnist", n_train=9, gz=False)
    d = load_dataset("mnist", download=False)
    assert d.train_x.shape[0] == 9 and d.name == "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "apts_jax"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "apts_jax"


def test_corrupt_local_file_is_an_error_not_a_fallthrough(tmp_path):
    make_mnist_dir(tmp_path / "d")
    make_mnist_dir(tmp_path / "cache" / "fashion_mnist")
    p = tmp_path / "d" / "t10k-labels-idx1-ubyte.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.zeros(5, np.uint8))))  # 6 test images, 5 labels
    with pytest.raises(IDXFormatError, match="count mismatch: 6 images but 5 labels"):
        load_dataset("fashion_mnist", tmp_path / "d", download=False, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("mode", ["per_channel", "global", "per_feature", "unit_range"])
def test_normalisation_uses_training_statistics(tmp_path, mode):
    arrays = make_mnist_dir(tmp_path / "d", n_train=30, n_test=8)
    arrays["train_images"][:, 0, 0] = 17  # a constant feature
    write_file(tmp_path / "d" / "train-images-idx3-ubyte.gz", idx_bytes(arrays["train_images"]),
               gz=True)
    d = load_dataset("fashion_mnist", tmp_path / "d", download=False, normalize=mode,
                     flatten=False)
    tr = arrays["train_images"].astype(np.float64)[..., None]
    te = arrays["test_images"].astype(np.float64)[..., None]
    if mode in ("per_channel", "global"):
        mean, std = tr.mean(), tr.std()
    elif mode == "per_feature":
        mean, std = tr.mean(axis=0), tr.std(axis=0)
        std = np.where(std == 0, 1.0, std)
        assert std[0, 0, 0] == 1.0
    else:
        mean, std = 0.0, 255.0
    assert d.train_x.shape == (30, 4, 5, 1) and d.test_x.shape == (8, 4, 5, 1)
    np.testing.assert_allclose(d.train_x, (tr - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d.test_x, (te - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d.mean, np.broadcast_to(mean, (4, 5, 1)), rtol=1e-6)
    np.testing.assert_allclose(d.std, np.broadcast_to(std, (4, 5, 1)), rtol=1e-6)
    np.testing.assert_array_equal(d.train_y, arrays["train_labels"])
    np.testing.assert_array_equal(d.test_y, arrays["test_labels"])


def test_subset_flatten_dtype(tmp_path):
    arrays = make_mnist_dir(tmp_path / "d", n_train=30, n_test=8)
    d = load_dataset("fashion_mnist", tmp_path / "d", download=False, subset=10,
                     normalize="global", dtype=np.float64)
    assert d.train_x.shape == (10, 20) and d.test_x.shape == (8, 20)
    assert d.train_x.dtype == np.float64
    first = arrays["train_images"][:10].astype(np.float64)  # statistics of the subset only
    np.testing.assert_allclose(d.mean, np.full(20, first.mean()))
    d2 = load_dataset("fashion_mnist", tmp_path / "d", download=False, subset=(None, 3))
    assert d2.train_x.shape == (30, 20) and d2.test_y.shape == (3,)
    for bad in (0, -1, (1, 2, 3), 1.5, True):
        with pytest.raises(ValueError, match="subset"):
            load_dataset("fashion_mnist", tmp_path / "d", download=False, subset=bad)
    with pytest.raises(ValueError, match="normalize"):
        load_dataset("fashion_mnist", tmp_path / "d", download=False, normalize="zscore")
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")


def test_cifar_via_load_dataset(tmp_path):
    batches = make_cifar(tmp_path / "d" / "cifar10", n=4)
    d = load_dataset("cifar10", tmp_path / "d", download=False, flatten=False)
    assert d.train_x.shape == (20, 32, 32, 3) and d.test_x.shape == (4, 32, 32, 3)
    assert d.source == tmp_path / "d" / "cifar10" / "cifar-10-batches-py"
    raw = _expected_images(np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]))
    ref = raw.astype(np.float64)
    mean, std = ref.mean(axis=(0, 1, 2)), ref.std(axis=(0, 1, 2))
    np.testing.assert_allclose(d.train_x, (ref - mean) / std, rtol=1e-5, atol=1e-5)
    assert d.class_names[3] == "cat"
    flat = load_dataset("cifar10", tmp_path / "d", download=False)
    assert flat.train_x.shape == (20, 3072) and flat.mean.shape == (3072,)
    np.testing.assert_allclose(flat.train_x, d.train_x.reshape(20, -1))


# --------------------------------------------------------------------------------------------------
# download path against a local HTTP server


class _Server:
    def __init__(self, root: Path):
        self.hits: list[str] = []
        hits = self.hits

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                hits.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # keep pytest output clean
                pass

        handler = functools.partial(Handler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(tmp_path):
    srv = _Server(tmp_path / "www")
    yield srv
    srv.close()


def _serve_fashion(monkeypatch, tmp_path, *, wrong: bool = False):
    """Generated gz files under www/fashion_mnist; the registry entry points at their digests."""
    arrays = make_mnist_dir(tmp_path / "www" / "fashion_mnist", n_train=10, n_test=5)
    remotes = []
    for i, base in enumerate(IDX_NAMES.values()):
        path = tmp_path / "www" / "fashion_mnist" / f"{base}.gz"
        # mix the algorithms: md5 for one file, sha256 for the others
        digest = (f"md5:{hashlib.md5(path.read_bytes()).hexdigest()}" if i == 1
                  else f"sha256:{sha256(path)}")
        if wrong:
            digest = "sha256:" + "0" * 64
        remotes.append(RemoteFile(path.name, (digest,)))
    spec = dataclasses.replace(DATASETS["fashion_mnist"], files=tuple(remotes))
    monkeypatch.setitem(DATASETS, "fashion_mnist", spec)
    return arrays


def test_download_success_is_cached(monkeypatch, tmp_path, server):
    arrays = _serve_fashion(monkeypatch, tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv(ENV_MIRROR, server.url)  # the env var route to the mirror
    d = load_dataset("fashion_mnist", cache_dir=cache)
    assert len(server.hits) == 4
    assert sorted(server.hits) == sorted(f"/fashion_mnist/{b}.gz" for b in IDX_NAMES.values())
    assert d.source == cache / "fashion_mnist"
    np.testing.assert_array_equal(d.train_y, arrays["train_labels"])
    cached = sorted(p.name for p in (cache / "fashion_mnist").iterdir())
    assert cached == sorted(f"{b}.gz" for b in IDX_NAMES.values())  # no .part leftovers
    for b in IDX_NAMES.values():
        assert (cache / "fashion_mnist" / f"{b}.gz").read_bytes() == \
            (tmp_path / "www" / "fashion_mnist" / f"{b}.gz").read_bytes()
    d2 = load_dataset("fashion_mnist", cache_dir=cache, mirror=server.url)
    assert len(server.hits) == 4  # second call does not hit the server
    np.testing.assert_array_equal(d2.train_x, d.train_x)


def test_download_checksum_mismatch_leaves_nothing(monkeypatch, tmp_path, server):
    _serve_fashion(monkeypatch, tmp_path, wrong=True)
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumMismatchError, match="checksum mismatch for train-images") as info:
        load_dataset("fashion_mnist", cache_dir=cache, mirror=server.url)
    msg = str(info.value)
    assert server.url in msg and "deleted" in msg and "sha256:" + "0" * 64 in msg
    assert not (cache / "fashion_mnist").exists()  # nothing half-written, no empty folder
    assert isinstance(info.value, ValueError)


def test_download_accepts_repacked_gzip_by_content_digest(monkeypatch, tmp_path, server):
    make_mnist_dir(tmp_path / "www" / "fashion_mnist", n_train=10, n_test=5)
    remotes = []
    for base in IDX_NAMES.values():
        path = tmp_path / "www" / "fashion_mnist" / f"{base}.gz"
        payload = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(payload, compresslevel=1, mtime=12345))  # "re-packed"
        remotes.append(RemoteFile(path.name, ("md5:" + "f" * 32,),
                                  hashlib.sha256(payload).hexdigest()))
    monkeypatch.setitem(DATASETS, "fashion_mnist",
                        dataclasses.replace(DATASETS["fashion_mnist"], files=tuple(remotes)))
    d = load_dataset("fashion_mnist", cache_dir=tmp_path / "cache", mirror=server.url)
    assert d.train_x.shape == (10, 20)


def test_download_cifar_archive(monkeypatch, tmp_path, server):
    make_cifar(tmp_path / "src", n=2)
    archive = make_tar(tmp_path / "src" / "cifar-10-batches-py",
                       (tmp_path / "www" / "cifar10").mkdir(parents=True) or
                       tmp_path / "www" / "cifar10" / "cifar-10-python.tar.gz")
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(
        DATASETS["cifar10"], files=(RemoteFile(archive.name, (f"sha256:{sha256(archive)}",)),)))
    d = load_dataset("cifar10", cache_dir=tmp_path / "cache", mirror=server.url + "/")
    assert d.source == tmp_path / "cache" / "cifar10" / "cifar-10-python.tar.gz"
    assert d.train_x.shape == (10, 3072) and server.hits == ["/cifar10/cifar-10-python.tar.gz"]


def test_offline_error_names_every_route(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    mirror = f"http://127.0.0.1:{closed_port()}"  # nothing listens there: "server down"
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion_mnist", tmp_path / "nowhere", cache_dir=cache, mirror=mirror,
                     timeout=5)
    msg = str(info.value)
    for needle in (
        "Routes tried",
        "1. data_dir argument: " + str(tmp_path / "nowhere") + " does not exist",
        f"2. ${ENV_DATA_DIR}: not set",
        "3. system datasets folder: " + str(tmp_path / "system" / "fashion-mnist"),
        "4. user cache: " + str(cache / "fashion_mnist"),
        "5. download into " + str(cache / "fashion_mnist"),
        mirror + "/fashion_mnist/train-images-idx3-ubyte.gz",
        "refused",
        "apt-get install dataset-fashion-mnist",
        ENV_MIRROR,
        "data_dir=",
    ):
        assert needle in msg, (needle, msg)
    assert isinstance(info.value, FileNotFoundError)
    assert not (cache / "fashion_mnist").exists()


def test_offline_error_without_download_and_http_404(monkeypatch, tmp_path, server):
    with pytest.raises(DatasetNotFoundError, match="download: disabled \\(download=False\\)"):
        load_dataset("mnist", download=False)
    with pytest.raises(DatasetNotFoundError, match="(?s)404 Client Error.*How to fix") as info:
        load_dataset("mnist", cache_dir=tmp_path / "cache", mirror=server.url)
    assert "apt-get" not in str(info.value)  # the Debian hint is only for Fashion-MNIST


def test_download_from_a_file_mirror(monkeypatch, tmp_path):
    """A ``file://`` mirror (pooch has no downloader for it) is copied and verified like HTTP."""
    arrays = _serve_fashion(monkeypatch, tmp_path)
    d = load_dataset("fashion_mnist", cache_dir=tmp_path / "cache",
                     mirror=(tmp_path / "www").as_uri())
    np.testing.assert_array_equal(d.train_y, arrays["train_labels"])
    assert d.source == tmp_path / "cache" / "fashion_mnist"
    _serve_fashion(monkeypatch, tmp_path, wrong=True)
    with pytest.raises(ChecksumMismatchError, match="file://"):
        load_dataset("fashion_mnist", cache_dir=tmp_path / "cache2",
                     mirror=(tmp_path / "www").as_uri())
    assert not (tmp_path / "cache2" / "fashion_mnist").exists()
