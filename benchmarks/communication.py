"""Cross-device communication of data-parallel APTS vs. data-parallel Adam, read from compiled HLO.

For the 784-512-256-10 ReLU MLP (535,818 float32 parameters) on ``N`` in {2, 4, 8} simulated CPU
devices (one subdomain per device), this script compiles

* ``apts_jax.parallel.make_apts(...).step``       -- full-batch APTS, one outer iteration;
* ``apts_jax.parallel.make_apts(...).fresh_step`` -- SAPTS, one outer iteration on a new
  minibatch (re-evaluates the global gradient on it first);

for ``nu`` in {1, 5} and both models (``sr1``, ``first_order``), and a data-parallel Adam
training step (``jax.jit`` of a ``shard_map``: local gradient, ``psum`` of the gradients and the
loss, ``optax.adam`` update), and counts the collectives of the optimised HLO
(``jit(...).lower(...).compile().as_text()``) with :func:`apts_jax.hlo.collective_stats`.

Every collective of these programs runs once per call (none sits in a loop; the script checks
that no collective appears inside a ``while`` body), so the static counts are the per-iteration
counts. Per epoch, with the full 60,000-sample training set split into minibatches of 10,000:

* Adam: 6 steps/epoch;  SAPTS (``fresh_step``): 6 outer iterations/epoch;
* full-batch APTS (``step``): 1 outer iteration/epoch (all 60,000 samples).

Reported per program: number of all-reduces, of *gradient-sized* all-reduces (at least ``n``
elements), other collectives, and bytes (the payload = the all-reduced buffers; a ring all-reduce
sends about ``2 (N - 1) / N`` times the payload per device, also reported). Compiling does not
need the data, so the data arguments are abstract (``jax.ShapeDtypeStruct`` with the layout's
sharding) at the real shapes.

Usage::

    python benchmarks/communication.py             # -> benchmarks/results/communication.json
    python benchmarks/communication.py --quick --out /tmp/comm.json   # tiny MLP, N in {2} (tests)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import init_mlp, mlp_loss, write_report  # noqa: E402

SCHEMA_VERSION = 1
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "communication.json"
FULL = {"sizes": [784, 512, 256, 10], "samples": 60_000, "minibatch": 10_000, "ns": [2, 4, 8],
        "nus": [1, 5], "models": ["sr1", "first_order"]}
QUICK = {"sizes": [784, 16, 16, 10], "samples": 600, "minibatch": 100, "ns": [2], "nus": [1],
         "models": ["sr1", "first_order"]}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny MLP 784-16-16-10, N = 2 (smoke test)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    p.add_argument("--ns", type=int, nargs="*", default=None, help="device/subdomain counts")
    return p


def machine_info() -> dict[str, Any]:
    import jax
    import jaxlib

    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "num_devices": jax.device_count(),
    }


_WHILE_BODY = re.compile(r"body=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def collectives_in_loops(hlo_text: str) -> int:
    """Collectives inside computations reachable from a ``while`` body (should be 0 here)."""
    from apts_jax.hlo import collective_stats

    comps: dict[str, list[str]] = {}
    name = None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line.startswith(" "):
            name = m.group(1)
            comps[name] = []
        elif name is not None:
            comps[name].append(line)
    calls = {c: set(re.findall(r"(?:calls|body|condition|to_apply|branch_computations)="
                               r"\{?%?([\w.\-]+(?:,\s*%?[\w.\-]+)*)", "\n".join(lines)))
             for c, lines in comps.items()}
    callees = {c: {x.strip().lstrip("%") for group in v for x in group.split(",")}
               for c, v in calls.items()}
    roots = {b for lines in comps.values() for b in _WHILE_BODY.findall("\n".join(lines))}
    seen, stack = set(), list(roots)
    while stack:
        c = stack.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        stack.extend(callees.get(c, ()))
    return sum(len(collective_stats("\n".join(comps[c]))) for c in seen)


_COMMENT = re.compile(r"/\*.*?\*/")


def strip_comments(hlo_text: str) -> str:
    """Drop ``/*index=5*/``-style comments (XLA prints them inside tuple shapes of >= 6 arrays)."""
    return _COMMENT.sub("", hlo_text)


def summarize(hlo_text: str, n_params: int, n_dev: int) -> dict[str, Any]:
    from apts_jax.hlo import collective_stats

    hlo_text = strip_comments(hlo_text)
    stats = collective_stats(hlo_text)
    ar = [s for s in stats if s[0] == "all-reduce"]
    payload = sum(s[2] for s in stats)
    return {
        "all_reduce": len(ar),
        "gradient_sized": sum(1 for s in ar if s[1] >= n_params),
        "other_collectives": len(stats) - len(ar),
        "bytes": int(payload),
        "ring_bytes_per_device": int(round(2 * (n_dev - 1) / n_dev * payload)),
        "in_loops": collectives_in_loops(hlo_text),
        "collectives": [list(s) for s in stats],
    }


def per_epoch(entry: dict[str, Any], calls: int) -> dict[str, Any]:
    return {
        "calls": calls,
        "all_reduce": entry["all_reduce"] * calls,
        "gradient_sized": entry["gradient_sized"] * calls,
        "bytes": entry["bytes"] * calls,
        "ring_bytes_per_device": entry["ring_bytes_per_device"] * calls,
    }


def run(cfg: dict[str, Any], log=print) -> dict[str, Any]:
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", max(cfg["ns"]))
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from apts_jax import _tree, parallel
    from apts_jax.apts import to_varying

    sizes = cfg["sizes"]

    loss_fn = mlp_loss
    params = init_mlp(jax.random.key(0), sizes)
    n_params = _tree.flat_spec(params).size
    samples, mb = cfg["samples"], cfg["minibatch"]
    steps_per_epoch = samples // mb
    log(f"MLP {'-'.join(map(str, sizes))} ({n_params:,} params); epoch = {samples} samples, "
        f"minibatches of {mb} ({steps_per_epoch}/epoch); N in {cfg['ns']}")

    def abstract_data(layout: parallel.SubdomainLayout, total: int) -> Any:
        sh = NamedSharding(layout.mesh, P(layout.axis_name))
        n = layout.num_subdomains
        return (jax.ShapeDtypeStruct((n, total // n, sizes[0]), jnp.float32, sharding=sh),
                jax.ShapeDtypeStruct((n, total // n), jnp.int32, sharding=sh))

    def make_adam_step(layout: parallel.SubdomainLayout, opt: Any) -> Any:
        """Data-parallel Adam: local gradient, psum, update (replicated params and state)."""
        axis, n = layout.axis_name, layout.num_subdomains

        def body(p: Any, s: Any, shard: Any) -> Any:
            shard = jax.tree.map(lambda a: a[0], shard)
            loss, g = jax.value_and_grad(loss_fn)(to_varying(p, axis), shard)
            g, loss = jax.lax.psum((g, loss), axis)
            g = jax.tree.map(lambda a: a / n, g)
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s, loss / n

        return jax.jit(jax.shard_map(
            body, mesh=layout.mesh, in_specs=(P(), P(), P(axis)), out_specs=(P(), P(), P()),
        ))

    rows = []
    t_all = time.perf_counter()
    for n in cfg["ns"]:
        layout = parallel.subdomain_layout(n, n)
        tiny = parallel.split_data(layout, (np.zeros((n, sizes[0]), np.float32),
                                            np.zeros((n,), np.int32)))

        opt = optax.adam(1e-3)
        adam_step = make_adam_step(layout, opt)
        t0 = time.perf_counter()
        text = adam_step.lower(params, opt.init(params), abstract_data(layout, mb)).compile()
        entry = summarize(text.as_text(), n_params, n)
        rows.append({"method": "adam", "num_devices": n, "num_subdomains": n, "local_steps": None,
                     "model": None, "program": "train_step (shard_map + psum)",
                     "samples_per_call": mb, "per_iteration": entry,
                     "per_epoch": per_epoch(entry, steps_per_epoch),
                     "compile_s": time.perf_counter() - t0})
        log(f"N = {n} adam: {entry['all_reduce']} all-reduce(s), {entry['gradient_sized']} "
            f"gradient-sized, {entry['bytes']:,} B ({time.perf_counter() - t0:.1f} s)")

        for model in cfg["models"]:
            for nu in cfg["nus"]:
                prog = parallel.make_apts(loss_fn, params, layout, local_steps=nu, model=model,
                                                   preset="paper")
                state = prog.init(params, tiny)
                for method, fn, total, calls in (
                    ("apts", prog.step, samples, 1),
                    ("sapts", prog.fresh_step, mb, steps_per_epoch),
                ):
                    t0 = time.perf_counter()
                    compiled = fn.lower(state, abstract_data(layout, total)).compile()
                    entry = summarize(compiled.as_text(), n_params, n)
                    rows.append({
                        "method": method, "num_devices": n, "num_subdomains": n,
                        "local_steps": nu, "model": model,
                        "program": "make_apts.step" if method == "apts" else
                        "make_apts.fresh_step",
                        "samples_per_call": total, "per_iteration": entry,
                        "per_epoch": per_epoch(entry, calls),
                        "compile_s": time.perf_counter() - t0,
                    })
                    log(f"N = {n} {method} {model} nu = {nu}: {entry['all_reduce']} "
                        f"all-reduce(s), {entry['gradient_sized']} gradient-sized, "
                        f"{entry['bytes']:,} B ({time.perf_counter() - t0:.1f} s)")
    return {
        "schema_version": SCHEMA_VERSION,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": machine_info(),
        "settings": {
            "dtype": "float32",
            "mlp": {"sizes": sizes, "num_params": int(n_params)},
            "samples_per_epoch": samples,
            "minibatch": mb,
            "steps_per_epoch": {"adam": steps_per_epoch, "sapts": steps_per_epoch, "apts": 1},
            "ns": list(cfg["ns"]),
            "local_steps": list(cfg["nus"]),
            "models": list(cfg["models"]),
            "gradient_sized": f"all-reduce of >= {n_params} elements",
        },
        "results": rows,
        "wall_s": time.perf_counter() - t_all,
    }


def format_table(report: dict[str, Any]) -> str:
    head = (f"{'N':>2} {'method':>6} {'model':>11} {'nu':>2} | {'AR/it':>5} {'grad/it':>7} "
            f"{'MB/it':>7} | {'it/ep':>5} {'AR/ep':>5} {'grad/ep':>7} {'MB/ep':>7} "
            f"{'ring MB/dev/ep':>14}")
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        it, ep = r["per_iteration"], r["per_epoch"]
        lines.append(
            f"{r['num_devices']:2d} {r['method']:>6} {r['model'] or '-':>11} "
            f"{r['local_steps'] if r['local_steps'] is not None else '-':>2} | "
            f"{it['all_reduce']:5d} {it['gradient_sized']:7d} {it['bytes'] / 1e6:7.2f} | "
            f"{ep['calls']:5d} {ep['all_reduce']:5d} {ep['gradient_sized']:7d} "
            f"{ep['bytes'] / 1e6:7.2f} {ep['ring_bytes_per_device'] / 1e6:14.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.ns:
        cfg["ns"] = args.ns
    report = run(cfg)
    report["quick"] = bool(args.quick)
    write_report(args.out, report, format_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
