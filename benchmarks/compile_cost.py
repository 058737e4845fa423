"""Compile time and compiled-program size of the OBS solve and of one APTS outer iteration.

Most of the test suite's time (and a user's first step) is XLA compilation of these programs
(issue 9). This script compiles, on the current backend and with the current ``XLA_FLAGS``,

* ``obs.solve_memory`` (n = 11, m = 5, both ``straight_line`` variants),
* ``make_apts(...).step`` on a logistic problem (n = 11, N = 2 subdomains on 2 devices), for the
  L-SR1 and the first-order model,

``--repeats`` times each (``lower(...).compile()`` always compiles anew: no persistent cache is
configured here) and reports the median compile time and the size of the optimised HLO text.

Usage: ``python benchmarks/compile_cost.py [--repeats 3] [--out FILE]`` (default
``benchmarks/results/compile_cost.json``). To measure what the tests compile with
(``tests/conftest.py``), run it with ``XLA_FLAGS="--xla_backend_optimization_level=0
--xla_cpu_use_fusion_emitters=false"`` on jaxlib 0.10 (the committed ``compile_cost.json``) and
with ``XLA_FLAGS=--xla_backend_optimization_level=0`` on jaxlib >= 0.11, which no longer has the
second flag (``compile_cost_jax012.json``); ``compile_cost_jax010_o0.json`` is jaxlib 0.10 with
the first flag only. The flags used are recorded in each result file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/compile_cost.json")
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    import jax.numpy as jnp
    import numpy as np
    from _common import machine_info

    from apts_jax import lsr1, obs
    from apts_jax.parallel import make_apts, split_data, subdomain_layout

    def measure(lower: Any) -> dict[str, Any]:
        times, size = [], 0
        for _ in range(args.repeats):
            lowered = lower()
            t0 = time.perf_counter()
            compiled = lowered.compile()
            times.append(time.perf_counter() - t0)
            size = len(compiled.as_text())
        return {"compile_s_median": statistics.median(times), "compile_s": times,
                "hlo_chars": size}

    results: dict[str, Any] = {}
    g, mem = jnp.ones(11), lsr1.init(11, 5)
    for straight in (False, True):
        def lower_obs(straight: bool = straight) -> Any:
            return jax.jit(lambda g, m, r: obs.solve_memory(g, m, r, straight_line=straight)
                           ).lower(g, mem, 1.0)
        results[f"obs.solve_memory straight_line={straight}"] = measure(lower_obs)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 10)).astype(np.float32)
    y = (x @ rng.normal(size=10) > 0).astype(np.float32)

    def loss(p: Any, d: Any) -> Any:
        xs, ys = d
        z = xs @ p["w"] + p["b"]
        return jnp.mean(jnp.logaddexp(0.0, z) - ys * z)

    p0 = {"w": jnp.zeros(10), "b": jnp.zeros(())}
    layout = subdomain_layout(2, devices=2)
    data = split_data(layout, (x, y))
    for model in ("sr1", "first_order"):
        def lower_step(model: str = model) -> Any:
            prog = make_apts(loss, p0, layout, model=model, preset="paper")
            return prog.step.lower(prog.init(p0, data), data)
        results[f"make_apts step model={model}"] = measure(lower_step)

    for k, v in results.items():
        print(f"{k:42s} compile {v['compile_s_median']:6.2f} s  HLO {v['hlo_chars'] / 1e3:8.0f} K chars")
    doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": "python benchmarks/compile_cost.py " + " ".join(sys.argv[1:] if argv is None
                                                                     else argv),
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "machine": machine_info(),
           "repeats": args.repeats, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
