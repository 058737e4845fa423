"""The OBS solve before and after the straight-line rewrite (issue 10), side by side in one process.

Times, for float32 problems of size n and memory m = 5, jitted:

* ``old``: ``obs.solve`` / ``obs.solve_memory`` of a reference commit (default ``1063f29``, the
  last one before the rewrite: Newton ``while_loop``, one ``lax.cond`` for the explicit
  complement), loaded from ``git show <ref>:apts_jax/{obs,lsr1}.py`` into private modules;
* ``cond``: the current solver with ``straight_line=False`` (Gram formula for ``||g_perp||``, the
  explicit ``g_perp`` behind one ``lax.cond``; the default on CPU);
* ``straight``: the current solver with ``straight_line=True`` (explicit ``g_perp`` always, no
  ``while``/``conditional``; the default on GPU/TPU).

Problems: the four scenarios of ``benchmarks/obs_cost.py`` (``pd``/``indef`` pairs, radius 0.1 and
10; ``g`` generic, so the Gram formula is trusted) and ``near_span``: ``g`` inside ``span(Psi)``
up to a 1e-3 relative perturbation, which makes the ``cond`` variant (and the old code) take the
explicit branch — its worst case.

Timing: every function is compiled and run twice first. Then ``repeats`` blocks, each running every
(variant, function, n, scenario) once in a freshly shuffled order, so that load from other
processes hits all columns alike; each call is timed with ``time.perf_counter`` around the call and
``jax.block_until_ready``. Reported per (n, function, variant): the median over blocks of each
generic scenario, averaged over the four (``median_s``), the ``near_span`` median, the ratios to
``old``, and every sample.
The structure (``while`` / ``conditional`` counts of the compiled HLO) of every variant is recorded.

Usage::

    python benchmarks/obs_variants.py               # -> benchmarks/results/obs_variants.json
    python benchmarks/obs_variants.py --ns 10000 --repeats 3 --out /tmp/v.json   # quick
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import os
import random
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apts_jax import hlo, obs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_report  # noqa: E402
from obs_cost import SCENARIOS, make_memory, make_pairs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "obs_variants.json"
DEFAULT_REF = "1063f29"
NS = (10_000, 100_000, 500_000, 1_800_000)
M = 5
VARIANTS = ("old", "cond", "straight")
NEAR_SPAN = "near_span_r0.1"


def load_reference(ref: str) -> types.ModuleType:
    """``apts_jax/obs.py`` of commit ``ref`` as a private module, bound to that commit's ``lsr1``."""

    def module(name: str, path: str, **inject: Any) -> types.ModuleType:
        src = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        src = src.replace("from apts_jax import lsr1\n", "")
        mod = types.ModuleType(name)
        mod.__file__ = f"{ref}:{path}"
        mod.__dict__.update(inject)
        exec(compile(src, mod.__file__, "exec"), mod.__dict__)  # noqa: S102 (our own history)
        return mod

    old_lsr1 = module("apts_jax_ref_lsr1", "apts_jax/lsr1.py")
    return module("apts_jax_ref_obs", "apts_jax/obs.py", lsr1=old_lsr1)


def near_span_problem(key: jax.Array, n: int, m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``indef`` pairs and ``g = Psi c + 1e-3 ||Psi c|| e`` (``e`` a random unit vector)."""
    k_pairs, k_c, k_e = jax.random.split(key, 3)
    _, s, y = make_pairs(k_pairs, n, m, (-1.0, 2.0))
    inside = (y - s) @ jax.random.normal(k_c, (m,), jnp.float32)
    e = jax.random.normal(k_e, (n,), jnp.float32)
    g = inside + 1e-3 * jnp.linalg.norm(inside) * e / jnp.linalg.norm(e)
    return g, s, y


def functions(old: types.ModuleType) -> dict[tuple[str, str], Callable[..., Any]]:
    """``{(function, variant): jitted callable}``; solve takes (g, S, Y, gamma, radius), solve_memory
    (g, memory, radius)."""
    out: dict[tuple[str, str], Callable[..., Any]] = {
        ("solve", "old"): jax.jit(lambda g, s, y, gam, r: old.solve(g, s, y, gam, r)),
        ("solve_memory", "old"): jax.jit(lambda g, mem, r: old.solve_memory(g, mem, r)),
    }
    for variant, flag in (("cond", False), ("straight", True)):
        out[("solve", variant)] = jax.jit(functools.partial(obs.solve, straight_line=flag))
        out[("solve_memory", variant)] = jax.jit(
            functools.partial(obs.solve_memory, straight_line=flag))
    return out


def timed(fn: Callable[..., Any], *args: Any) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def run(ns, repeats: int, ref: str, seed: int, log=print) -> dict[str, Any]:
    info = machine_info()
    old = load_reference(ref)
    fns = functions(old)
    gamma = jnp.float32(1.0)
    key = jax.random.PRNGKey(seed)
    scenarios = [*SCENARIOS, (NEAR_SPAN, None, 0.1)]

    problems: dict[tuple[int, str], tuple[tuple, tuple]] = {}
    for n in ns:
        for name, d_range, radius in scenarios:
            key, sub = jax.random.split(key)
            if d_range is None:
                g, s, y = near_span_problem(sub, n, M)
            else:
                g, s, y = make_pairs(sub, n, M, d_range)
            r = jnp.float32(radius)
            problems[(n, name)] = ((g, s, y, gamma, r), (g, make_memory(s, y, gamma), r))

    # Warm-up and agreement of the variants (relative step difference to old).
    agreement: dict[str, dict[str, Any]] = {}
    for n in ns:
        t0 = time.perf_counter()
        for name, *_ in scenarios:
            args, margs = problems[(n, name)]
            steps = {}
            for (fn_name, variant), fn in fns.items():
                call = args if fn_name == "solve" else margs
                for _ in range(2):
                    res = jax.block_until_ready(fn(*call))
                steps[(fn_name, variant)] = res
            entry: dict[str, Any] = {"case": int(steps[("solve", "cond")].case)}
            for (fn_name, variant), res in steps.items():
                ref_step = steps[(fn_name, "old")].step
                denom = float(jnp.linalg.norm(ref_step)) or 1.0
                entry[f"{fn_name}_{variant}_rel_diff_to_old"] = (
                    float(jnp.linalg.norm(res.step - ref_step)) / denom)
            agreement[f"n={n} {name}"] = entry
        log(f"n={n:>9,}: compiled and warmed up in {time.perf_counter() - t0:.1f}s")

    tasks = [(fn_name, variant, n, name) for (fn_name, variant) in fns for n in ns
             for name, *_ in scenarios]
    samples: dict[tuple, list[float]] = {t: [] for t in tasks}
    rng = random.Random(seed)
    t_all = time.perf_counter()
    for block in range(repeats):
        rng.shuffle(tasks)
        for task in tasks:
            fn_name, variant, n, name = task
            args, margs = problems[(n, name)]
            samples[task].append(timed(fns[(fn_name, variant)],
                                       *(args if fn_name == "solve" else margs)))
        log(f"block {block + 1}/{repeats} done ({time.perf_counter() - t_all:.1f}s)")

    generic = [name for name, *_ in SCENARIOS]
    results = []
    for n in ns:
        for fn_name in ("solve", "solve_memory"):
            row: dict[str, Any] = {"n": n, "m": M, "function": fn_name}
            for variant in VARIANTS:
                # Median over blocks per scenario, then the mean over the generic scenarios.
                per = {name: float(statistics.median(samples[(fn_name, variant, n, name)]))
                       for name in generic}
                per_block = [
                    sum(samples[(fn_name, variant, n, name)][b] for name in generic) / len(generic)
                    for b in range(repeats)
                ]
                near = samples[(fn_name, variant, n, NEAR_SPAN)]
                row[variant] = {
                    "median_s": float(np.mean(list(per.values()))),
                    "block_mean_median_s": float(statistics.median(per_block)),
                    "iqr_s": float(np.subtract(*np.percentile(per_block, [75, 25]))),
                    "near_span_median_s": float(statistics.median(near)),
                    "per_scenario_median_s": per,
                    "samples_s": {name: samples[(fn_name, variant, n, name)]
                                  for name in [*generic, NEAR_SPAN]},
                }
            for variant in ("cond", "straight"):
                row[f"ratio_{variant}"] = row[variant]["median_s"] / row["old"]["median_s"]
                row[f"ratio_{variant}_near_span"] = (
                    row[variant]["near_span_median_s"] / row["old"]["near_span_median_s"])
            results.append(row)

    structure: dict[str, Any] = {}
    n0 = min(ns)
    args, margs = problems[(n0, generic[0])]
    for (fn_name, variant), fn in fns.items():
        text = fn.lower(*(args if fn_name == "solve" else margs)).compile().as_text()
        structure[f"{fn_name}_{variant}"] = hlo.structure_counts(text)

    info["loadavg_end"] = list(os.getloadavg())
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": info,
        "settings": {
            "dtype": "float32",
            "ns": list(ns),
            "m": M,
            "repeats": repeats,
            "reference_commit": ref,
            "default_variant_on_this_backend": (
                "straight" if obs.resolve_straight_line(None) else "cond"),
            "scenarios": [{"name": name, "d_range": None if d is None else list(d), "radius": r}
                          for name, d, r in scenarios],
            "statistic": "median over blocks per scenario, mean over the 4 generic scenarios "
                         "(block_mean_median_s: median over blocks of the per-block mean)",
        },
        "results": results,
        "agreement": agreement,
        "structure": structure,
        "total_timing_s": time.perf_counter() - t_all,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"OBS solve, float32, m = {report['settings']['m']}, jitted; median of "
        f"{report['settings']['repeats']} blocks (generic scenarios), ms; ratios to old "
        f"(commit {report['settings']['reference_commit']}); default here: "
        f"{report['settings']['default_variant_on_this_backend']}",
        f"{'function':>13} {'n':>10} {'old':>8} {'cond':>8} {'straight':>9} {'cond/old':>9} "
        f"{'str/old':>8} | near_span: {'old':>7} {'cond':>7} {'straight':>8}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['function']:>13} {r['n']:>10,} {r['old']['median_s'] * 1e3:>8.3f} "
            f"{r['cond']['median_s'] * 1e3:>8.3f} {r['straight']['median_s'] * 1e3:>9.3f} "
            f"{r['ratio_cond']:>9.3f} {r['ratio_straight']:>8.3f} | {'':>11}"
            f"{r['old']['near_span_median_s'] * 1e3:>7.3f} "
            f"{r['cond']['near_span_median_s'] * 1e3:>7.3f} "
            f"{r['straight']['near_span_median_s'] * 1e3:>8.3f}"
        )
    for key, counts in report["structure"].items():
        lines.append(f"{key}: while {counts['while']}, conditional {counts['conditional']}, "
                     f"fusion {counts['fusion']}, custom-call {counts['custom-call']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", type=int, nargs="+", default=list(NS))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--ref", default=DEFAULT_REF, help="git commit of the 'old' solver")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    report = run(tuple(args.ns), args.repeats, args.ref, args.seed)
    write_report(args.out, report, format_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
