"""Shared helpers of the benchmark scripts: the machine a result was measured on, the plain MLP, and
writing a report (JSON file + printed table)."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU, cores, platform, Python/JAX/numpy versions, backend, devices, load average now."""
    import jax
    import jaxlib
    import numpy as np

    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": available,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "loadavg_start": list(os.getloadavg()),
    }


def init_mlp(key: Any, sizes: Sequence[int], gain: float = 2.0) -> list[tuple[Any, Any]]:
    """Weights ``N(0, gain / fan_in)`` and zero biases of a fully connected ReLU network."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        key, sub = jax.random.split(key)
        w = jax.random.normal(sub, (fan_in, fan_out), jnp.float32) * np.sqrt(gain / fan_in)
        params.append((w, jnp.zeros((fan_out,), jnp.float32)))
    return params


def mlp_loss(params: Any, shard: Any) -> Any:
    """Mean softmax cross-entropy of the ReLU MLP on one shard ``(inputs, integer labels)``."""
    import jax
    import jax.numpy as jnp

    h, labels = shard
    for w, b in params[:-1]:
        h = jax.nn.relu(h @ w + b)
    w, b = params[-1]
    logp = jax.nn.log_softmax(h @ w + b, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def write_report(out: Path, report: dict[str, Any], format_table: Callable[[dict[str, Any]], str]) -> None:
    """Write ``report`` as indented JSON to ``out`` (creating its folder) and print its table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(format_table(report))
    print(f"\nwrote {out}")
