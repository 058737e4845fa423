r"""APTS scaling: time per outer iteration and per local phase for D in {1, 2, 4, 8} devices.

For each device count ``D`` a separate Python process is started (the number of simulated CPU
devices is fixed when JAX starts: ``XLA_FLAGS=--xla_force_host_platform_device_count=D``; with
``--backend gpu`` the first ``D`` GPUs are used and larger ``D`` are skipped). In it, ``N = D``
subdomains (one per device, ``--per-device`` for more) train the 784-512-256-10 MLP (535,818
parameters) with full-batch APTS (:func:`apts_jax.parallel.make_apts`, L-SR1, 3 local steps,
float32), on Fashion-MNIST when it is found offline and on generated data otherwise, in two modes:

* **strong** scaling: ``--strong-samples`` (default 4,096) samples in total, ``S/N`` per subdomain;
* **weak** scaling: ``--weak-samples`` (default 1,024) samples per subdomain, ``N`` times as many in
  total.

Timed (median and IQR over ``--repeats`` calls after ``--warmup`` untimed ones, each call
``block_until_ready``; compilation excluded):

* ``outer_step``: one jitted outer iteration ``prog.step`` (local phases, 3 all-reduces, the global
  trust-region iteration);
* ``local_phase``: the local phase alone — :func:`apts_jax.apts.local_phase` on every subdomain
  (``jax.shard_map`` over the devices, ``jax.vmap`` within a device), no communication — started
  from the state reached after the warm-up iterations (filled L-SR1 memories), at most
  ``local_steps`` local trust-region iterations each (their mean count is reported);
* ``gradient``: one ``value_and_grad`` of a single subdomain's shard on one device (the unit of
  local work: an ideal local phase costs about ``local iterations x gradient``).

Communication per outer iteration comes from the compiled HLO of ``prog.step`` and of the local
phase program (:mod:`apts_jax.hlo` via ``benchmarks/communication.py``): all-reduce count,
gradient-sized all-reduces, bytes (expected: 3 gradient-sized all-reduces for the outer step, none
for the local phase).

**Simulated devices share the host's cores.** On the 2-core development machine the ``D`` "devices"
run on the same 2 cores, so no speedup is expected (strong-scaling time stays flat or grows, weak
scaling grows about linearly with ``D``); the numbers show the overhead of the decomposition, not
parallel speedup. On a machine with ``D`` real accelerators run ``--backend gpu``.

Outputs: ``benchmarks/results/scaling.json`` and ``benchmarks/results/scaling.png``.

Usage::

    python benchmarks/scaling.py                              # D in {1, 2, 4, 8}, CPU
    python benchmarks/scaling.py --backend gpu --devices 1 2 4 8
    python benchmarks/scaling.py --quick --out /tmp/s.json    # tiny MLP, D in {1, 2}
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "scaling.json"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=None, help="default 1 2 4 8")
    p.add_argument("--backend", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--per-device", type=int, default=1, help="subdomains per device")
    p.add_argument("--strong-samples", type=int, default=4096)
    p.add_argument("--weak-samples", type=int, default=1024)
    p.add_argument("--local-steps", type=int, default=3)
    p.add_argument("--model", choices=["sr1", "first_order"], default="sr1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="MLP 784-32-10, D in {1, 2}, small data")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def _stats(times: list[float]) -> dict[str, Any]:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": statistics.median(times), "iqr_s": q[2] - q[0], "min_s": min(times),
            "times_s": times}


def _load_data(samples: int, seed: int = 0) -> tuple[Any, Any, str]:
    import numpy as np

    try:
        from apts_jax.data import find_dataset, load_dataset

        if find_dataset("fashion_mnist") is not None:
            ds = load_dataset("fashion_mnist", download=False)
            idx = np.arange(samples) % ds.train_x.shape[0]
            return ds.train_x[idx], ds.train_y[idx], "fashion_mnist"
    except Exception:  # pragma: no cover - fall back to generated data
        pass
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, 784)).astype(np.float32)
    y = rng.integers(0, 10, samples).astype(np.int32)
    return x, y, "generated"


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Measure everything for ``D = args.worker`` devices (runs in its own process)."""
    import jax

    d = args.worker
    if args.backend == "cpu":
        jax.config.update("jax_platforms", "cpu")
    import numpy as np
    from jax.flatten_util import ravel_pytree

    from apts_jax import parallel

    sys.path.insert(0, str(HERE))
    from _common import init_mlp, mlp_loss
    from communication import summarize

    devices = jax.devices()
    if len(devices) < d:
        return {"devices": d, "skipped": f"only {len(devices)} {args.backend} device(s)"}
    sizes = [784, 32, 10] if args.quick else [784, 512, 256, 10]

    loss_fn = mlp_loss
    params = init_mlp(jax.random.key(0), sizes, gain=1.0)
    flat0, unravel = ravel_pytree(params)
    n_params = int(flat0.size)
    n_sub = d * args.per_device

    def timed(fn: Any, *a: Any) -> tuple[list[float], Any]:
        out = None
        for _ in range(args.warmup):
            out = jax.block_until_ready(fn(*a))
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*a))
            ts.append(time.perf_counter() - t0)
        return ts, out

    rows = []
    modes = [("strong", args.strong_samples), ("weak", args.weak_samples * n_sub)]
    for mode, total in modes:
        total -= total % n_sub
        x, y, source = _load_data(total)
        layout = parallel.subdomain_layout(n_sub, d)
        data = parallel.split_data(layout, (x, y))
        prog = parallel.make_apts(loss_fn, params, layout, local_steps=args.local_steps,
                                  model=args.model, preset="paper")
        state = prog.init(params, data)
        t0 = time.perf_counter()
        compiled = prog.step.lower(state, data).compile()
        compile_step = time.perf_counter() - t0
        comm = summarize(compiled.as_text(), n_params, d)

        # Outer iterations (warm-up iterations also fill the L-SR1 memories).
        st = state
        for _ in range(args.warmup):
            st, _ = prog.step(st, data)
        jax.block_until_ready(st)
        step_times = []
        accepted = []
        for _ in range(args.repeats):
            t1 = time.perf_counter()
            st, info = prog.step(st, data)
            jax.block_until_ready(st)
            step_times.append(time.perf_counter() - t1)
            accepted.append(bool(info.accepted))

        # The local phase alone, from the state reached (no communication).
        local_prog = _local_phase_program(layout, loss_fn, unravel, st, args)
        largs = (st.params, st.grad, st.radius, st.local_value, st.local_grad, st.local_memory,
                 data)
        t0 = time.perf_counter()
        lcompiled = local_prog.lower(*largs).compile()
        compile_local = time.perf_counter() - t0
        lcomm = summarize(lcompiled.as_text(), n_params, d)
        local_times, (steps, its) = timed(lcompiled, *largs)
        del steps

        # One subdomain's value_and_grad on one device (the unit of local work).
        one_shard = jax.device_put((x[: total // n_sub], y[: total // n_sub]), devices[0])
        vg1 = jax.jit(jax.value_and_grad(lambda f, s: loss_fn(unravel(f), s)))
        grad_times, _ = timed(vg1, jax.device_put(flat0, devices[0]), one_shard)

        rows.append({
            "mode": mode, "devices": d, "subdomains": n_sub, "samples_total": total,
            "samples_per_subdomain": total // n_sub, "data": source,
            "outer_step": _stats(step_times), "outer_step_accepted": accepted,
            "local_phase": _stats(local_times),
            "local_iterations_mean": float(np.mean(np.asarray(its))),
            "local_iterations_max": int(np.max(np.asarray(its))),
            "local_phase_per_iteration_s": statistics.median(local_times)
            / max(1, int(np.max(np.asarray(its)))),
            "gradient_one_subdomain": _stats(grad_times),
            "compile_s": {"outer_step": compile_step, "local_phase": compile_local},
            "collectives": {"outer_step": {k: comm[k] for k in (
                "all_reduce", "gradient_sized", "other_collectives", "bytes",
                "ring_bytes_per_device", "in_loops")},
                "local_phase": {k: lcomm[k] for k in ("all_reduce", "gradient_sized",
                                                      "other_collectives", "bytes")}},
        })
        print(f"D={d} {mode:6} S={total:6d}: outer step {statistics.median(step_times):.3f} s, "
              f"local phase {statistics.median(local_times):.3f} s "
              f"({float(np.mean(np.asarray(its))):.1f} local its), 1-shard grad "
              f"{statistics.median(grad_times) * 1e3:.1f} ms, all-reduces {comm['all_reduce']} "
              f"({comm['gradient_sized']} gradient-sized), local-phase collectives "
              f"{lcomm['all_reduce'] + lcomm['other_collectives']}", flush=True)
    return {"devices": d, "backend": jax.default_backend(),
            "device_kind": devices[0].device_kind, "num_params": n_params,
            "sizes": sizes, "rows": rows}


def _local_phase_program(layout: Any, loss_fn: Any, unravel: Any, st: Any,
                         args: argparse.Namespace) -> Any:
    """Jitted ``shard_map`` running :func:`apts_jax.apts.local_phase` on every subdomain."""
    import jax
    from jax.sharding import PartitionSpec as P

    from apts_jax.apts import local_phase, to_varying
    from apts_jax.radius import DEFAULT_RADIUS_CONFIG

    axis, n_sub = layout.axis_name, layout.num_subdomains

    def local_body(theta: Any, grad: Any, radius: Any, lv: Any, lg: Any, mem: Any,
                   blk: Any) -> Any:
        cap = radius / n_sub

        def one(lv_i: Any, lg_i: Any, mem_i: Any, shard: Any) -> Any:
            def vg(z: Any) -> Any:
                zv = to_varying(z, axis)
                return jax.value_and_grad(lambda f: loss_fn(unravel(f), shard))(zv)

            res = local_phase(vg, theta, lv_i, lg_i, grad, cap, mem_i,
                              local_steps=args.local_steps, model=args.model,
                              config=DEFAULT_RADIUS_CONFIG, skip_tol=1e-8)
            return res.step, res.iterations

        return jax.vmap(one)(lv, lg, mem, blk)

    mem_spec = None if st.local_memory is None else P(axis)
    return jax.jit(jax.shard_map(
        local_body, mesh=layout.mesh,
        in_specs=(P(), P(), P(), P(axis), P(axis), mem_spec, P(axis)),
        out_specs=(P(axis), P(axis)), check_vma=False))


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cores": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version()}
    try:
        import jax
        import jaxlib

        info["jax"], info["jaxlib"] = jax.__version__, jaxlib.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        info["loadavg"] = list(os.getloadavg())
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:  # pragma: no cover
        pass
    return info


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, mode in zip(axes, ("strong", "weak"), strict=True):
        rows = sorted((r for w in report["results"] if "rows" in w for r in w["rows"]
                       if r["mode"] == mode), key=lambda r: r["devices"])
        if not rows:
            continue
        ds = [r["devices"] for r in rows]
        for key, label, style in (("outer_step", "outer iteration", "o-"),
                                  ("local_phase", "local phase", "s-")):
            med = [r[key]["median_s"] for r in rows]
            ax.plot(ds, med, style, label=label)
        ax.plot(ds, [r["local_phase_per_iteration_s"] for r in rows], "s--", color="tab:orange",
                alpha=0.5, label="local phase / local iterations")
        t1 = rows[0]["outer_step"]["median_s"] if rows[0]["devices"] == 1 else None
        if t1 is not None:
            ideal = [t1 / d if mode == "strong" else t1 for d in ds]
            ax.plot(ds, ideal, "k:", label="ideal (outer iteration)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ds, [str(d) for d in ds])
        ax.set_yscale("log")
        ax.set_xlabel(f"devices D (= subdomains / {report['settings']['per_device']})")
        ax.set_ylabel("seconds (median)")
        per = rows[0]["samples_total"] if mode == "strong" else rows[0]["samples_per_subdomain"]
        ax.set_title(f"{mode} scaling ({per} samples {'total' if mode == 'strong' else 'per subdomain'})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = report["machine"]
    sim = " (simulated devices sharing the cores)" if report["settings"]["backend"] == "cpu" else ""
    fig.suptitle(f"APTS {report['settings']['model']}, MLP {report['settings']['sizes']}, "
                 f"{m.get('cores')} cores{sim}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker is not None:
        result = worker(args)
        args.worker_out.write_text(json.dumps(result))
        return 0
    ds = args.devices or ([1, 2] if args.quick else [1, 2, 4, 8])
    if args.quick:
        args.strong_samples, args.weak_samples = min(args.strong_samples, 512), min(
            args.weak_samples, 128)
    results = []
    t_all = time.perf_counter()
    passthrough = ["--backend", args.backend, "--per-device", str(args.per_device),
                   "--strong-samples", str(args.strong_samples), "--weak-samples",
                   str(args.weak_samples), "--local-steps", str(args.local_steps), "--model",
                   args.model, "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    if args.quick:
        passthrough.append("--quick")
    for d in ds:
        env = dict(os.environ)
        if args.backend == "cpu":
            flags = [f for f in env.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count")]
            env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={d}"])
            env["JAX_PLATFORMS"] = "cpu"
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "w.json"
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                                   str(d), "--worker-out", str(out), *passthrough], env=env)
            if proc.returncode != 0 or not out.is_file():
                results.append({"devices": d, "error": f"worker exited {proc.returncode}"})
                continue
            results.append(json.loads(out.read_text()))
    sizes = next((r["sizes"] for r in results if "sizes" in r), None)
    report = {
        "schema_version": SCHEMA_VERSION,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/scaling.py", *(argv or sys.argv[1:])]),
        "machine": machine_info(),
        "settings": {"backend": args.backend, "devices": ds, "per_device": args.per_device,
                     "strong_samples": args.strong_samples,
                     "weak_samples_per_subdomain": args.weak_samples,
                     "local_steps": args.local_steps, "model": args.model,
                     "repeats": args.repeats, "warmup": args.warmup, "sizes": sizes,
                     "dtype": "float32", "quick": args.quick},
        "note": ("simulated CPU devices share the host's cores: no parallel speedup is possible "
                 "here; the times show the decomposition's overhead" if args.backend == "cpu"
                 else "real devices"),
        "results": results,
        "wall_s": time.perf_counter() - t_all,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")
    if not args.no_plot:
        png = args.out.with_suffix(".png")
        plot(report, png)
        print(f"wrote {png}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
