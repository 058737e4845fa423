"""Control flow in the compiled programs: ``while`` / ``conditional`` counts (issue 10).

On an accelerator every ``while`` and ``conditional`` is a kernel-launch boundary and a
device-to-host round trip for its predicate. This script compiles, on the current backend (CPU is
enough: the structure is backend independent), the OBS solve, one trust-region iteration and one
APTS outer iteration (``make_apts(...).step`` and ``fresh_step``, N = 1 and 2, nu = 1 and 5) and
counts their ops with :func:`apts_jax.hlo.structure_counts`, for

* ``now``: this checkout with its default OBS variant on this backend;
* ``straight``: this checkout with the straight-line OBS variant forced everywhere (the default on
  GPU/TPU; forced here through ``obs.resolve_straight_line``);
* ``before``: the library of an earlier commit (``--before REV``, default 1063f29, the last commit
  before the straight-line work), compiled in a child process from ``git archive REV``.

Usage: ``python benchmarks/structure.py [--before REV] [--out FILE]``; writes
``benchmarks/results/structure.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

N_PARAMS = 200


def _emit(out_dir: Path, straight: bool) -> None:
    """Compile the programs with the importable ``apts_jax`` and write their HLO texts."""
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    import jax.numpy as jnp
    import numpy as np

    from apts_jax import obs, parallel
    from apts_jax.trust_region import init_memory, iteration  # old and new module name

    if straight:
        obs.resolve_straight_line = lambda straight_line=None: True
    out_dir.mkdir(parents=True, exist_ok=True)

    def write(name: str, text: str) -> None:
        (out_dir / f"{name}.hlo").write_text(text)

    n, m = N_PARAMS, 5
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(n, m)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(n, m)), jnp.float32)
    g = jnp.asarray(rng.normal(size=n), jnp.float32)
    write("obs_solve", jax.jit(lambda g, s, y: obs.solve(g, s, y, 1.0, 0.1)).lower(g, s, y)
          .compile().as_text())

    def f(x: Any) -> Any:
        return jnp.sum(x**4) + jnp.sum(x**2)

    vg = jax.value_and_grad(f)
    x0 = jnp.ones(n, jnp.float32)
    v0, g0 = vg(x0)
    mem = init_memory("sr1", n, m, jnp.float32)
    write("obs_solve_memory", jax.jit(lambda g, mem: obs.solve_memory(g, mem, 0.1))
          .lower(g0, mem).compile().as_text())
    write("tr_iteration", jax.jit(lambda x, v, g, r, mm: iteration(vg, x, v, g, r, mm, model="sr1"))
          .lower(x0, v0, g0, jnp.float32(0.1), mem).compile().as_text())

    xs = jnp.asarray(rng.normal(size=(256, 20)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 2, 256), jnp.float32)

    def loss(p: Any, d: Any) -> Any:
        z = d[0] @ p["w"] + p["b"]
        return jnp.mean(jnp.logaddexp(0.0, z) - d[1] * z)

    p0 = {"w": jnp.zeros(20), "b": jnp.zeros(())}
    for subdomains in (1, 2):
        layout = parallel.subdomain_layout(subdomains, devices=subdomains)
        data = parallel.split_data(layout, (xs, ys))
        for nu in (1, 5):
            prog = parallel.make_apts(loss, p0, layout, local_steps=nu, model="sr1",
                                          preset="paper")
            state = prog.init(p0, data)
            for kind in ("step", "fresh_step"):
                write(f"outer_N{subdomains}_nu{nu}_{kind}",
                      getattr(prog, kind).lower(state, data).compile().as_text())


def _counts(hlo_dir: Path) -> dict[str, dict[str, int]]:
    from apts_jax.hlo import structure_counts

    return {p.stem: structure_counts(p.read_text()) for p in sorted(hlo_dir.glob("*.hlo"))}


def _child(args: list[str], pythonpath: Path | None) -> None:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    subprocess.run([sys.executable, __file__, *args], check=True, env=env, cwd=tempfile.gettempdir())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="1063f29", help="earlier commit to compare (default 1063f29)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/structure.json")
    ap.add_argument("--emit", type=Path, help=argparse.SUPPRESS)  # child mode: write HLO texts
    ap.add_argument("--straight", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.emit is not None:
        _emit(args.emit, args.straight)
        return 0

    from _common import machine_info, write_report

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        old_lib = tmp_path / "lib"
        old_lib.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "apts_jax"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old_lib)], input=archive, check=True)
        _child(["--emit", str(tmp_path / "before")], old_lib)
        _child(["--emit", str(tmp_path / "now")], ROOT)
        _child(["--emit", str(tmp_path / "straight"), "--straight"], ROOT)
        results = {k: _counts(tmp_path / k) for k in ("before", "now", "straight")}
    report = {
        "command": "python benchmarks/structure.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(),
        "before_commit": args.before,
        "results": results,
    }

    def table(rep: dict[str, Any]) -> str:
        r = rep["results"]
        lines = [f"{'program':34s} {'before':>10s} {'now':>10s} {'straight':>10s}   (while/conditional)"]
        for name in r["now"]:
            cells = [f"{r[k][name]['while']}/{r[k][name]['conditional']}" if name in r[k] else "-"
                     for k in ("before", "now", "straight")]
            lines.append(f"{name:34s} {cells[0]:>10s} {cells[1]:>10s} {cells[2]:>10s}")
        return "\n".join(lines)

    write_report(args.out, report, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
