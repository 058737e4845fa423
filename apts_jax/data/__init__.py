"""Data layer of apts_jax: dataset readers and loaders (numpy only) and the SAPTS overlap sampler.

* :func:`load_dataset` — Fashion-MNIST / MNIST / CIFAR-10 as normalised float arrays
  (:class:`Dataset`), found locally (``data_dir``, ``$APTS_JAX_DATA_DIR``, ``/usr/share/datasets``,
  the user cache) or downloaded with checksum verification;
* :func:`read_idx`, :func:`load_idx_pair` — the IDX (MNIST) format;
* :func:`load_cifar10`, :func:`read_cifar_batch` — CIFAR-10 "python version" (trusted files only);
* :class:`OverlapSampler`, :func:`plain_minibatches` — fixed-shape, seeded minibatch / microbatch
  index arrays with exact overlaps.
"""

from apts_jax.data.cifar import CIFAR10Data, CIFARFormatError, load_cifar10, read_cifar_batch
from apts_jax.data.datasets import (
    DATASETS,
    ENV_DATA_DIR,
    ENV_MIRROR,
    ChecksumMismatchError,
    Dataset,
    DatasetNotFoundError,
    DatasetSpec,
    RemoteFile,
    default_cache_dir,
    download_file,
    find_dataset,
    load_dataset,
    verify_file,
)
from apts_jax.data.idx import IDXArray, IDXFormatError, load_idx_pair, read_idx
from apts_jax.data.sampler import EpochBatches, OverlapSampler, PlainBatches, plain_minibatches

__all__ = [
    "DATASETS",
    "ENV_DATA_DIR",
    "ENV_MIRROR",
    "CIFAR10Data",
    "CIFARFormatError",
    "ChecksumMismatchError",
    "Dataset",
    "DatasetNotFoundError",
    "DatasetSpec",
    "EpochBatches",
    "IDXArray",
    "IDXFormatError",
    "OverlapSampler",
    "PlainBatches",
    "RemoteFile",
    "default_cache_dir",
    "download_file",
    "find_dataset",
    "load_cifar10",
    "load_dataset",
    "load_idx_pair",
    "plain_minibatches",
    "read_cifar_batch",
    "read_idx",
    "verify_file",
]
