"""Shared fixtures: float64 switch for one test, deterministic seeds.

The test session simulates 8 CPU devices (for the data-parallel APTS tests). This must happen
before JAX initialises its backends, hence the config update at the very top of this file, which
pytest imports before any test module.

Compilation cache: most of the suite's time is XLA compilation, and some tests compile the same
programs again (e.g. the three CLI runs of the checkpoint test, each in a fresh closure, which
jit's in-memory cache does not share; hit rates were not measured). The session therefore uses
JAX's persistent compilation cache in a
fresh temporary folder (``JAX_COMPILATION_CACHE_DIR``, inherited by the pytest-xdist workers and by
subprocesses, removed at the end), so a session starts from nothing and never reads another
session's executables. ``APTS_TEST_COMPILATION_CACHE=0`` turns it off.

For the same reason the session compiles with LLVM's optimisations off
(``--xla_backend_optimization_level=0`` appended to ``XLA_FLAGS``, inherited likewise): the tests
check results, not speed, and this cuts the suite's time by about 30 % (measured on the 2-core
CI machine, test_parallel.py + test_apts_options.py: 140 s -> 99 s). XLA does not reorder
floating-point operations at any level (no fast math), so results are those of the optimised
build up to the summation order of vectorised loops. With jaxlib < 0.11 the session also selects
XLA's older CPU fusion emitters (see below). ``APTS_TEST_OPTIMIZED=1`` keeps XLA's defaults.
"""

from __future__ import annotations

import os
import shutil
import tempfile

_OWN_CACHE = None
if os.environ.get("APTS_TEST_COMPILATION_CACHE", "1") != "0" and not os.environ.get(
    "JAX_COMPILATION_CACHE_DIR"
):
    # The pytest process (or the xdist controller, which loads this file before it starts the
    # workers) creates the folder; workers and subprocesses inherit the variables.
    _OWN_CACHE = tempfile.mkdtemp(prefix="apts-jax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def _jaxlib_before(major: int, minor: int) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        parts = version("jaxlib").split(".")[:2]
        return (int(parts[0]), int(parts[1])) < (major, minor)
    except (PackageNotFoundError, ValueError):
        return False


if os.environ.get("APTS_TEST_OPTIMIZED", "0") != "1":
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in _flags:
        _flags += " --xla_backend_optimization_level=0"
    # jaxlib 0.10's XLA can still use its older (non-MLIR) CPU fusion emitters, which compile an
    # L-SR1 make_apts step about 1.7x faster at -O0 (2.9 s -> 1.7 s, to the same result;
    # benchmarks/compile_cost.py). The flag is gone in 0.12 (unknown XLA flags abort the
    # process), so it is set only for jaxlib < 0.11.
    if "xla_cpu_use_fusion_emitters" not in _flags and _jaxlib_before(0, 11):
        _flags += " --xla_cpu_use_fusion_emitters=false"
    os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import sys  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Make ``import dense_reference`` work regardless of how pytest was invoked.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def x64():
    """Enable float64 in JAX for one test and restore the previous setting afterwards."""
    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def x32():
    """Force float32 (x64 disabled) for one test and restore the previous setting afterwards."""
    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture(params=["float32", "float64"])
def precision(request):
    """Parametrise a test over float32 / float64; yields the numpy dtype; restores x64 after."""
    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", request.param == "float64")
    try:
        yield np.dtype(request.param)
    finally:
        jax.config.update("jax_enable_x64", previous)


def seed_from(*parts) -> int:
    """Stable 32-bit seed from arbitrary parts (independent of PYTHONHASHSEED)."""
    return zlib.crc32(repr(parts).encode()) & 0xFFFFFFFF


def make_rng(*parts) -> np.random.Generator:
    return np.random.default_rng(seed_from(*parts))


@pytest.fixture
def rng(request) -> np.random.Generator:
    """numpy Generator seeded from the test's node id: deterministic and different per test."""
    return make_rng(request.node.nodeid)


def pytest_unconfigure(config):
    """Remove this session's compilation cache (only the process that created it does)."""
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
