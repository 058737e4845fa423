"""Cost of the OBS trust-region subproblem solve next to one MLP gradient, on this machine.

Times ``apts_jax.obs.solve`` (and ``apts_jax.obs.solve_memory``, which reuses the Gram matrices
Psi^T Psi and S^T Psi cached in an ``LSR1Memory``) for float32 problems of size n and memory m,
side by side with one jitted ``value_and_grad`` of a 784-512-256-10 ReLU MLP (softmax
cross-entropy, pure ``jax.numpy``) on 10,000 random 28x28 samples.

Problems. For each (n, m) two pair structures are built with B0 = gamma I, gamma = 1:

* ``pd``:    Y = D S + noise, D = diag(d), d ~ U[1.5, 3]  (so S^T (D - gamma I) S > 0 and B > 0),
* ``indef``: Y = D S + noise, d ~ U[-1, 2]              (indefinite B),

with S ~ N(0, 1/n) (columns of norm ~1), noise = 1e-3 * N(0, 1/n) and g ~ N(0, 1/n). Each is
solved with a small (0.1) and a large (10) radius, so interior (pd, radius 10) and boundary
solutions both occur; the OBS case of every scenario is recorded.

Timing. Every function is jitted and warmed up (compile + one run) first. Measurements are taken
in ``repeats`` blocks; each block runs every (function, n, m, scenario) once and the MLP gradient
twice, in a freshly shuffled order, so that load from other processes on a shared machine hits
all columns alike. Each call is timed with ``time.perf_counter`` around the call and
``jax.block_until_ready`` of its whole output. Reported: median and interquartile range (IQR)
in seconds; for OBS the samples of the four scenarios are pooled per (n, m).

A third column, the "two-pass floor", times g - Psi Psi^T g (Psi = Y - gamma S, not formed):
the two passes over S and Y that any solve with cached Gram matrices has to make (Psi^T g,
then the step Psi v). It shows how close solve_memory is to the memory-bandwidth limit.

Structure. The compiled HLO (this backend) of ``obs.solve``, ``obs.solve_memory`` (per m, at the
smallest n) and of one jitted trust-region iteration (``apts_jax.tr.iteration``, L-SR1 model, a
least-squares objective) is read with :func:`apts_jax.hlo.structure_counts`: the number of
``while`` and ``conditional`` ops (data-dependent control flow: a device-to-host round trip per
iteration on a GPU), fusions (kernels) and custom calls (LAPACK / cuSOLVER), reported under
``"structure"``.

Variant. ``obs.solve`` / ``obs.solve_memory`` are timed with ``straight_line`` from ``--variant``
(default: the backend's default, ``cond`` on CPU and ``straight`` on GPU/TPU); the report records
the variant timed under ``settings.obs_variant`` (``"straight"``: no ``conditional``; ``"cond"``:
one ``lax.cond`` for the explicit complement of ``g``) and ``settings.straight_line``.

Usage::

    python benchmarks/obs_cost.py            # full grid -> benchmarks/results/obs_cost.json
    python benchmarks/obs_cost.py --quick --out /tmp/obs.json   # n = 1e4 only (tests)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apts_jax import hlo, lsr1, obs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_report  # noqa: E402

SCHEMA_VERSION = 1
FULL_NS = (10_000, 100_000, 500_000, 1_800_000)
FULL_MS = (3, 5, 10, 20)
QUICK_NS = (10_000,)
QUICK_MS = (3, 5)
MLP_SIZES = (784, 512, 256, 10)
GOAL = {"n": 1_800_000, "m": 5, "max_ratio": 0.02}
# (name, diagonal range of D, radius)
SCENARIOS = (
    ("pd_r0.1", (1.5, 3.0), 0.1),
    ("pd_r10", (1.5, 3.0), 10.0),
    ("indef_r0.1", (-1.0, 2.0), 0.1),
    ("indef_r10", (-1.0, 2.0), 10.0),
)
CASE_NAMES = {
    getattr(obs, name, default): name
    for name, default in (
        ("INTERIOR", 0),
        ("BOUNDARY", 1),
        ("HARD_PARALLEL", 2),
        ("HARD_COMPLEMENT", 3),
        ("SINGULAR", 4),
    )
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "obs_cost.json"


# --------------------------------------------------------------------------------------------
# The MLP: 784-512-256-10, ReLU, softmax cross-entropy.
# --------------------------------------------------------------------------------------------
def mlp_init(key: jax.Array, sizes: tuple[int, ...] = MLP_SIZES) -> list[tuple[jax.Array, ...]]:
    """He-normal weights, zero biases: W_l ~ N(0, 2 / fan_in)."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        key, sub = jax.random.split(key)
        w = jax.random.normal(sub, (fan_in, fan_out), jnp.float32) * np.sqrt(2.0 / fan_in)
        params.append((w, jnp.zeros((fan_out,), jnp.float32)))
    return params


def mlp_loss(params: list[tuple[jax.Array, ...]], x: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy  -1/N sum_i log softmax(f(x_i))[label_i]."""
    h = x
    for w, b in params[:-1]:
        h = jax.nn.relu(h @ w + b)
    w, b = params[-1]
    logits = h @ w + b
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


# --------------------------------------------------------------------------------------------
# OBS problems.
# --------------------------------------------------------------------------------------------
def make_pairs(key: jax.Array, n: int, m: int, d_range: tuple[float, float]):
    """S ~ N(0, 1/n), Y = diag(d) S + 1e-3 N(0, 1/n), d ~ U[d_range]; returns (g, S, Y)."""
    k_s, k_d, k_e, k_g = jax.random.split(key, 4)
    scale = 1.0 / np.sqrt(n)
    s = jax.random.normal(k_s, (n, m), jnp.float32) * scale
    d = jax.random.uniform(k_d, (n, 1), jnp.float32, d_range[0], d_range[1])
    y = d * s + 1e-3 * scale * jax.random.normal(k_e, (n, m), jnp.float32)
    g = jax.random.normal(k_g, (n,), jnp.float32) * scale
    return g, s, y


def two_pass_floor(g: jax.Array, s: jax.Array, y: jax.Array, gamma: jax.Array) -> jax.Array:
    """g - Psi Psi^T g with Psi = Y - gamma S, without forming Psi: two passes over S and Y.

    The memory traffic any L-SR1 subproblem solve with cached Gram matrices needs at least
    (Psi^T g to get the coordinates of g, Psi v to assemble the step): a floor for solve_memory.
    """
    a = g @ y - gamma * (g @ s)
    return g - (y @ a - s @ (gamma * a))


def make_memory(s: jax.Array, y: jax.Array, gamma: jax.Array) -> lsr1.LSR1Memory:
    """A full LSR1Memory holding exactly the pairs (S, Y), with its Gram matrices."""
    m = s.shape[1]
    _, psi_psi, s_psi = lsr1.gram_matrices(s, y, gamma, lsr1.compute_dtype(s.dtype))
    return lsr1.LSR1Memory(
        s=s, y=y, mask=jnp.ones((m,), bool), gamma=gamma, psi_psi=psi_psi, s_psi=s_psi
    )


# --------------------------------------------------------------------------------------------
# Structure of the compiled programs.
# --------------------------------------------------------------------------------------------
def _tr_module() -> Any:
    """The module with the trust-region ``iteration`` (``apts_jax.tr``; ``trust_region`` before)."""
    import importlib

    for name in ("apts_jax.tr", "apts_jax.trust_region"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def obs_kwargs(straight_line: bool | None) -> dict[str, Any]:
    """Keyword arguments selecting the OBS variant (none for a solver without the option)."""
    if straight_line is None or not hasattr(obs, "resolve_straight_line"):
        return {}
    return {"straight_line": straight_line}


def variant_name(straight_line: bool | None) -> str:
    """``"straight"`` / ``"cond"`` for the variant ``straight_line`` resolves to on this backend."""
    if not hasattr(obs, "resolve_straight_line"):
        return "unknown"
    return "straight" if obs.resolve_straight_line(straight_line) else "cond"


def structure(n: int, ms, straight_line: bool | None = None) -> dict[str, Any]:
    """``hlo.structure_counts`` of the compiled OBS solves (per m) and of one TR iteration."""
    out: dict[str, Any] = {"n": n, "backend": jax.default_backend(),
                           "obs_variant": variant_name(straight_line)}
    kw = obs_kwargs(straight_line)
    gamma = jnp.float32(1.0)
    for m in ms:
        g, s, y = make_pairs(jax.random.PRNGKey(0), n, m, (-1.0, 2.0))
        r = jnp.float32(1.0)
        solve_text = (
            jax.jit(functools.partial(obs.solve, **kw)).lower(g, s, y, gamma, r).compile().as_text()
        )
        memory_text = (
            jax.jit(functools.partial(obs.solve_memory, **kw))
            .lower(g, make_memory(s, y, gamma), r).compile().as_text()
        )
        out[f"solve_m{m}"] = hlo.structure_counts(solve_text)
        out[f"solve_memory_m{m}"] = hlo.structure_counts(memory_text)
    tr = _tr_module()
    if tr is not None and hasattr(tr, "iteration"):
        m = ms[0]
        target = jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32)

        def vg(x: jax.Array) -> tuple[jax.Array, jax.Array]:
            return jax.value_and_grad(lambda z: 0.5 * jnp.sum((z - target) ** 2))(x)

        def one(x, v, gr, rad, mem):
            return tr.iteration(vg, x, v, gr, rad, mem, model="sr1")

        x = jnp.zeros((n,), jnp.float32)
        v, gr = vg(x)
        mem = lsr1.init(n, m)
        text = jax.jit(one).lower(x, v, gr, jnp.float32(1.0), mem).compile().as_text()
        out["tr_iteration"] = hlo.structure_counts(text)
        out["tr_iteration_module"] = tr.__name__
    return out


# --------------------------------------------------------------------------------------------
# Timing helpers.
# --------------------------------------------------------------------------------------------
def timed(fn: Callable[..., Any], *args: Any) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def stats(samples: list[float]) -> dict[str, float]:
    q1, _, q3 = np.percentile(samples, [25, 50, 75])
    return {
        "median_s": float(statistics.median(samples)),
        "iqr_s": float(q3 - q1),
        "min_s": float(min(samples)),
        "count": len(samples),
    }


# --------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------
def run(ns, ms, repeats: int, mlp_samples: int, seed: int, log=print,
        straight_line: bool | None = None) -> dict[str, Any]:
    key = jax.random.PRNGKey(seed)
    info = machine_info()
    gamma = jnp.float32(1.0)
    has_memory = hasattr(obs, "solve_memory")

    # MLP gradient.
    k_p, k_x, k_y, key = jax.random.split(key, 4)
    params = mlp_init(k_p)
    x = jax.random.uniform(k_x, (mlp_samples, MLP_SIZES[0]), jnp.float32)
    labels = jax.random.randint(k_y, (mlp_samples,), 0, MLP_SIZES[-1])
    grad_fn = jax.jit(jax.value_and_grad(mlp_loss))
    num_params = sum(w.size + b.size for w, b in params)

    kw = obs_kwargs(straight_line)
    solve_fn = jax.jit(lambda g, s, y, gam, r: obs.solve(g, s, y, gam, r, **kw))
    floor_fn = jax.jit(two_pass_floor)
    memory_fn = jax.jit(lambda g, mem, r: obs.solve_memory(g, mem, r, **kw)) if has_memory else None

    # Problems: problems[(n, m)][scenario] = (solve args, solve_memory args).
    problems: dict[tuple[int, int], dict[str, tuple]] = {}
    diag: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for n in ns:
        for m in ms:
            problems[(n, m)] = {}
            diag[(n, m)] = {}
            for name, d_range, radius in SCENARIOS:
                key, sub = jax.random.split(key)
                g, s, y = make_pairs(sub, n, m, d_range)
                r = jnp.float32(radius)
                mem = make_memory(s, y, gamma) if has_memory else None
                problems[(n, m)][name] = ((g, s, y, gamma, r), (g, mem, r))

    # Warm-up (compile + one run) and a correctness read-out of every scenario.
    t0 = time.perf_counter()
    for _ in range(2):
        jax.block_until_ready(grad_fn(params, x, labels))
    log(
        f"MLP grad compiled and warmed up in {time.perf_counter() - t0:.1f}s "
        f"({num_params:,} parameters, {mlp_samples} samples)"
    )
    for (n, m), scen in problems.items():
        t0 = time.perf_counter()
        g, s, y, gam, _ = next(iter(scen.values()))[0]
        for _ in range(2):
            jax.block_until_ready(floor_fn(g, s, y, gam))
        for name, (args, margs) in scen.items():
            for _ in range(2):
                res = jax.block_until_ready(solve_fn(*args))
            entry = {
                "case": CASE_NAMES.get(int(res.case), int(res.case)),
                "newton_iterations": int(res.newton_iterations),
                "step_norm": float(res.step_norm),
                "radius": float(args[4]),
                "lambda_min": float(res.lambda_min),
                "predicted_decrease": float(res.predicted_decrease),
            }
            if memory_fn is not None:
                for _ in range(2):
                    mres = jax.block_until_ready(memory_fn(*margs))
                denom = float(jnp.linalg.norm(res.step)) or 1.0
                entry["rel_diff_solve_vs_memory"] = (
                    float(jnp.linalg.norm(res.step - mres.step)) / denom
                )
            diag[(n, m)][name] = entry
        log(
            f"n={n:>9,} m={m:>2}: compiled + warmed up in {time.perf_counter() - t0:.1f}s; cases "
            + ", ".join(f"{k}={v['case']}" for k, v in diag[(n, m)].items())
        )

    # Interleaved timing blocks.
    tasks: list[tuple] = [("grad",), ("grad",)]
    for (n, m), scen in problems.items():
        tasks.append(("floor", n, m))
        for name in scen:
            tasks.append(("solve", n, m, name))
            if memory_fn is not None:
                tasks.append(("solve_memory", n, m, name))
    samples: dict[tuple, list[float]] = {}
    rng = random.Random(seed)
    t_all = time.perf_counter()
    for block in range(repeats):
        rng.shuffle(tasks)
        for task in tasks:
            if task[0] == "grad":
                dt = timed(grad_fn, params, x, labels)
            elif task[0] == "floor":
                g, s, y, gam, _ = next(iter(problems[(task[1], task[2])].values()))[0]
                dt = timed(floor_fn, g, s, y, gam)
            else:
                fn_name, n, m, name = task
                args, margs = problems[(n, m)][name]
                dt = timed(solve_fn, *args) if fn_name == "solve" else timed(memory_fn, *margs)
            samples.setdefault(task, []).append(dt)
        log(f"block {block + 1}/{repeats} done ({time.perf_counter() - t_all:.1f}s)")

    grad_stats = stats(samples[("grad",)])
    results = []
    for (n, m), scen in problems.items():
        row: dict[str, Any] = {"n": n, "m": m}
        for fn_name in ("solve", "solve_memory"):
            if fn_name == "solve_memory" and memory_fn is None:
                row[fn_name] = None
                continue
            pooled = [t for name in scen for t in samples[(fn_name, n, m, name)]]
            per = {name: stats(samples[(fn_name, n, m, name)])["median_s"] for name in scen}
            row[fn_name] = {
                **stats(pooled),
                "worst_scenario_median_s": max(per.values()),
                "per_scenario_median_s": per,
            }
            row[f"ratio_{fn_name}"] = row[fn_name]["median_s"] / grad_stats["median_s"]
        row["two_pass_floor"] = stats(samples[("floor", n, m)])
        row["ratio_two_pass_floor"] = row["two_pass_floor"]["median_s"] / grad_stats["median_s"]
        row["scenarios"] = diag[(n, m)]
        results.append(row)

    cases_seen: dict[str, int] = {}
    for row in results:
        for entry in row["scenarios"].values():
            cases_seen[str(entry["case"])] = cases_seen.get(str(entry["case"]), 0) + 1

    goal_row = next((r for r in results if r["n"] == GOAL["n"] and r["m"] == GOAL["m"]), None)
    goal = dict(GOAL)
    if goal_row is not None:
        goal["ratio_solve"] = goal_row["ratio_solve"]
        goal["met_solve"] = goal_row["ratio_solve"] <= GOAL["max_ratio"]
        if goal_row["solve_memory"] is not None:
            goal["ratio_solve_memory"] = goal_row["ratio_solve_memory"]
            goal["met_solve_memory"] = goal_row["ratio_solve_memory"] <= GOAL["max_ratio"]

    info["loadavg_end"] = list(os.getloadavg())
    struct = structure(min(ns), ms, straight_line)
    log(f"structure (compiled HLO): {struct}")
    return {
        "schema_version": SCHEMA_VERSION,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": info,
        "settings": {
            "dtype": "float32",
            "ns": list(ns),
            "ms": list(ms),
            "repeats": repeats,
            "warmup_calls": 2,
            "gamma": 1.0,
            "scenarios": [
                {"name": name, "d_range": list(d_range), "radius": radius}
                for name, d_range, radius in SCENARIOS
            ],
            "mlp": {
                "sizes": list(MLP_SIZES),
                "samples": mlp_samples,
                "num_params": int(num_params),
                "loss": "softmax cross-entropy",
            },
            "has_solve_memory": memory_fn is not None,
            "obs_variant": variant_name(straight_line),
            "straight_line": (obs.resolve_straight_line(straight_line)
                              if hasattr(obs, "resolve_straight_line") else None),
        },
        "mlp_grad": grad_stats,
        "results": results,
        "cases_seen": cases_seen,
        "structure": struct,
        "goal": goal,
        "total_timing_s": time.perf_counter() - t_all,
    }


def format_table(report: dict[str, Any]) -> str:
    g = report["mlp_grad"]["median_s"]
    variant = report["settings"].get("obs_variant")
    lines = [
        *([f"OBS variant timed: {variant}"] if variant else []),
        f"MLP value+grad ({report['settings']['mlp']['num_params']:,} params, "
        f"{report['settings']['mlp']['samples']} samples): median {g * 1e3:.1f} ms "
        f"(IQR {report['mlp_grad']['iqr_s'] * 1e3:.1f} ms)",
        "",
        f"{'n':>10} {'m':>3} {'solve ms':>9} {'IQR':>7} {'ratio':>7} "
        f"{'solve_memory ms':>16} {'IQR':>7} {'ratio':>7} {'floor ms':>9} {'ratio':>7}",
    ]
    for r in report["results"]:
        s = r["solve"]
        line = (
            f"{r['n']:>10,} {r['m']:>3} {s['median_s'] * 1e3:>9.2f} {s['iqr_s'] * 1e3:>7.2f} "
            f"{r['ratio_solve'] * 100:>6.2f}%"
        )
        if r["solve_memory"] is not None:
            sm = r["solve_memory"]
            line += (
                f" {sm['median_s'] * 1e3:>16.2f} {sm['iqr_s'] * 1e3:>7.2f} "
                f"{r['ratio_solve_memory'] * 100:>6.2f}%"
            )
        fl = r["two_pass_floor"]
        line += f" {fl['median_s'] * 1e3:>9.2f} {r['ratio_two_pass_floor'] * 100:>6.2f}%"
        lines.append(line)
    lines.append(
        "(floor: g - Psi Psi^T g, two passes over S and Y, the least memory traffic of a solve "
        "with cached Gram matrices)"
    )
    goal = report["goal"]
    if "ratio_solve" in goal:
        text = (
            f"goal: OBS <= {goal['max_ratio']:.0%} of the gradient at n={goal['n']:,}, "
            f"m={goal['m']}: solve {goal['ratio_solve']:.2%} "
            f"({'met' if goal['met_solve'] else 'NOT met'})"
        )
        if "ratio_solve_memory" in goal:
            text += (
                f", solve_memory {goal['ratio_solve_memory']:.2%} "
                f"({'met' if goal['met_solve_memory'] else 'NOT met'})"
            )
        lines += ["", text]
    lines.append(f"cases seen: {report['cases_seen']}")
    struct = report.get("structure") or {}
    for key, counts in struct.items():
        if isinstance(counts, dict):
            lines.append(
                f"{key}: while {counts['while']}, conditional {counts['conditional']}, "
                f"fusion {counts['fusion']}, custom-call {counts['custom-call']}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="n = 1e4, m in {3, 5}, 3 repeats, 1,000 MLP samples (smoke test)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timing blocks (default 9, quick 3)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--variant",
        choices=("default", "straight", "cond"),
        default="default",
        help="obs straight_line: the backend's default, True (straight) or False (cond)",
    )
    args = parser.parse_args(argv)
    straight_line = {"default": None, "straight": True, "cond": False}[args.variant]

    if args.quick:
        ns, ms, repeats, mlp_samples = QUICK_NS, QUICK_MS, 3, 1_000
    else:
        ns, ms, repeats, mlp_samples = FULL_NS, FULL_MS, 9, 10_000
    if args.repeats is not None:
        repeats = args.repeats

    report = run(ns, ms, repeats, mlp_samples, args.seed, straight_line=straight_line)
    report["quick"] = bool(args.quick)
    write_report(args.out, report, format_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
