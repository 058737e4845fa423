"""``benchmarks/paper.py --quick``: per-run and summary JSON schemas, resumability, dry run.

Runs the script in subprocesses (it configures simulated CPU devices before JAX starts) on a
subset of the quick protocol (``--only``): one first-order APTS and SAPTS configuration, Adam at
batch 128 (two learning rates), one SGD run and L-BFGS. The first invocation stops after
``--max-runs 3``; the second one must skip those three (their files unchanged) and run the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "paper.py"
ONLY = r"^fashion_mnist/(lbfgs|apts-N2-fo|sapts-N2-(fo|default)|adam-b128|sgd-b500-lr1\.00e-02)"
EXPECTED = {
    "lbfgs-s0", "apts-N2-fo-s0", "sapts-N2-fo-b500-s0", "adam-b128-lr1.00e-03-s0",
    "adam-b128-lr1.00e-02-s0", "sgd-b500-lr1.00e-02-s0", "sapts-N2-default-b256-s0",
}
HISTORY_KEYS = {
    "epoch": int, "iterations": int, "wall_time_s": float, "train_time_s": float,
    "train_loss": float, "train_accuracy": float, "test_loss": float, "test_accuracy": float,
    "grad_evals": int, "data_passes": float, "compile_s": float,
    "train_time_excl_compile_s": float,
}
RUN_KEYS = {
    "schema_version": int, "name": str, "group": str, "dataset": str, "method": str,
    "params": dict, "protocol": dict, "argv": list, "config": dict, "history": list,
    "final": dict, "session_elapsed_s": float, "machine": dict, "date": str, "command": str,
    "timing_note": str,
}
GROUP_KEYS = {
    "method": str, "params": dict, "seeds": list, "epochs": int,
    "final_test_accuracy_mean": float, "final_test_accuracy_std": float,
    "final_train_loss_mean": float, "train_time_s_mean": float, "compile_s_mean": float,
    "data_passes_mean": float, "reached": str,
}


def _data_available() -> bool:
    from apts_jax.data import find_dataset

    return find_dataset("fashion_mnist") is not None


pytestmark = pytest.mark.skipif(not _data_available(), reason="Fashion-MNIST not found offline")


def run_paper(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def check_types(doc: dict, spec: dict, where: str, nullable: tuple[str, ...] = ()) -> None:
    for key, typ in spec.items():
        assert key in doc, f"{where}: missing {key!r}"
        value = doc[key]
        if value is None and key in nullable:
            continue
        if typ is float:
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (where, key)
        else:
            assert isinstance(value, typ), f"{where}: {key!r} is {type(value).__name__}"


def check_run(doc: dict, epochs: int) -> None:
    check_types(doc, RUN_KEYS, doc.get("name", "?"))
    assert doc["schema_version"] == 1
    assert doc["dataset"] == "fashion_mnist"
    assert doc["name"] == f"{doc['group']}-s{doc['params']['seed']}"
    assert doc["method"] in ("apts", "sapts", "adam", "sgd", "lbfgs")
    assert set(doc["params"]) == {"subdomains", "order", "batch_size", "lr", "seed"}
    assert doc["argv"][0] == "train" and all(isinstance(a, str) for a in doc["argv"])
    assert doc["config"]["optimizer"] == doc["method"]
    assert doc["config"]["resolved"]["train_samples"] == 2000  # the quick subset
    hist = doc["history"]
    assert [r["epoch"] for r in hist] == list(range(epochs + 1))
    for row in hist:
        check_types(row, HISTORY_KEYS, f"{doc['name']} epoch {row['epoch']}")
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert 0.0 <= row["compile_s"] <= row["train_time_s"] + 1e-6 or row["epoch"] == 0
    times = [r["train_time_excl_compile_s"] for r in hist]
    assert times[0] == 0.0 and all(b >= a for a, b in zip(times, times[1:], strict=False))
    assert hist[1]["compile_s"] > 0  # the step function compiles during the first epoch
    final = doc["final"]
    assert final["test_accuracy"] == hist[-1]["test_accuracy"]
    assert final["compile_s"] == pytest.approx(sum(r["compile_s"] for r in hist))
    assert final["train_loss"] < hist[0]["train_loss"]  # every method trains
    for key in ("cores", "jax", "backend", "num_devices"):
        assert key in doc["machine"]
    if doc["method"] in ("apts", "sapts"):
        assert doc["params"]["subdomains"] == 2 and doc["params"]["order"] in ("fo", "default")
        assert doc["devices"] == 2
        assert hist[-1]["radius"] is not None


def check_summary(summary: dict, epochs: int) -> None:
    assert summary["schema_version"] == 1 and summary["mode"] == "quick"
    assert summary["target_gap"] == pytest.approx(0.003)
    assert summary["protocol"]["epochs"] == epochs
    ds = summary["datasets"]["fashion_mnist"]
    groups = ds["groups"]
    assert set(groups) == {n.rsplit("-s", 1)[0] for n in EXPECTED}
    for name, g in groups.items():
        check_types(g, GROUP_KEYS, name)
        assert g["epochs"] == epochs and g["seeds"] == [0]
        assert g["final_test_accuracy_std"] == 0.0  # one seed
        assert "time_to_target_s_mean" in g and "ratio_to_adam_grid" in g
    adam = ds["adam"]["per_batch_size"]["128"]
    assert adam["num_lrs"] == 2
    assert {adam["best"]["lr"], adam["median"]["lr"]} == {1e-3, 1e-2}
    assert adam["best"]["accuracy"] >= adam["median"]["accuracy"]
    best = ds["best_adam"]
    assert best["accuracy"] == adam["best"]["accuracy"] and best["batch_size"] == 128
    assert ds["target_accuracy"] == pytest.approx(best["accuracy"] - 0.003)
    grid = adam["grid_train_time_s"]
    assert ds["adam_grid_train_time_s"] == pytest.approx(grid) and grid > 0
    best_group = groups[adam["best"]["group"]]
    assert best_group["reached"] == "1/1"  # the best Adam run reaches its own target
    t = best_group["time_to_target_s_mean"]
    assert best_group["ratio_to_adam_grid"] == pytest.approx(t / grid)


@pytest.mark.slow  # heavy; run with pytest -m slow (CI time, issue 9)
def test_quick_paper_protocol_schema_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "paper"
    epochs = 2
    common = ["--quick", "--out", str(out), "--only", ONLY, "--epochs", str(epochs),
              "--datasets", "fashion_mnist"]

    first = run_paper(*common, "--max-runs", "3")
    assert "7 to run" in first.stdout and "ran 3 run(s)" in first.stdout, first.stdout
    ds_dir = out / "fashion_mnist"
    done = {p.stem for p in ds_dir.glob("*.json")}
    assert len(done) == 3 and done <= EXPECTED
    before = {name: (ds_dir / f"{name}.json").read_bytes() for name in done}
    assert (out / "summary.json").is_file() and (out / "summary.md").is_file()
    assert not (ds_dir / ".work").exists()  # work folders are removed once a run is finished

    listing = run_paper(*common, "--dry-run", "--no-probe")
    assert listing.stdout.count("[done   ]") == 3 and listing.stdout.count("[todo   ]") == 4

    second = run_paper(*common)
    assert "3 finished (skipped), 4 to run" in second.stdout, second.stdout
    assert {p.stem for p in ds_dir.glob("*.json")} == EXPECTED
    for name, content in before.items():
        assert (ds_dir / f"{name}.json").read_bytes() == content  # finished runs untouched

    for name in EXPECTED:
        check_run(json.loads((ds_dir / f"{name}.json").read_text()), epochs)
    check_summary(json.loads((out / "summary.json").read_text()), epochs)
    md = (out / "summary.md").read_text()
    assert "| apts-N2-fo |" in md and "(best)" in md and "| sapts-N2-default-b256 |" in md
    default = json.loads((ds_dir / "sapts-N2-default-b256-s0.json").read_text())
    assert "--preset" not in default["argv"] and "--local-steps" not in default["argv"]
    assert (out / "fashion_mnist_fig1_apts.png").stat().st_size > 10_000
    assert (out / "fashion_mnist_fig2_sapts.png").stat().st_size > 10_000

    third = run_paper(*common, "--no-plots")
    assert "7 finished (skipped), 0 to run" in third.stdout


# ------------------------------------------------------------------------------------------------
# In-process unit tests of the summary logic (no training)
# ------------------------------------------------------------------------------------------------


def _load_paper_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_paper_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _fake_run(method: str, group: str, seed: int, accs: list[float], times: list[float],
              **params) -> dict:
    history = [{"epoch": i, "test_accuracy": a, "train_loss": 1.0 / (i + 1),
                "train_time_excl_compile_s": t}
               for i, (a, t) in enumerate(zip(accs, times, strict=True))]
    final = dict(history[-1], epoch=len(accs) - 1, compile_s=1.0, data_passes=1.0)
    return {"method": method, "group": group, "history": history, "final": final,
            "params": {"subdomains": None, "order": None, "batch_size": None, "lr": None,
                       "seed": seed, **params}}


def test_summary_selects_best_and_median_lr_and_time_to_target() -> None:
    paper = _load_paper_module()
    runs = []
    for lr, acc in ((1e-4, 0.70), (1e-3, 0.90), (1e-2, 0.80)):
        for seed in (0, 1):
            runs.append(_fake_run("adam", f"adam-b128-lr{lr:.2e}", seed, [0.1, acc],
                                  [0.0, 10.0], batch_size=128, lr=lr))
    # APTS reaches 0.897 (= 0.90 - 0.3 pp) at epoch 2 with seed 0 only.
    runs.append(_fake_run("apts", "apts-N2-sr1", 0, [0.1, 0.85, 0.898], [0.0, 2.0, 4.0],
                          subdomains=2, order="sr1"))
    runs.append(_fake_run("apts", "apts-N2-sr1", 1, [0.1, 0.85, 0.89], [0.0, 2.0, 4.0],
                          subdomains=2, order="sr1"))
    s = paper.summarize_dataset(runs)
    adam = s["adam"]["per_batch_size"]["128"]
    assert adam["best"]["lr"] == 1e-3 and adam["median"]["lr"] == 1e-2
    assert adam["grid_train_time_s"] == pytest.approx(30.0)  # one sweep: 3 lrs x 10 s
    assert adam["grid_train_time_all_seeds_s"] == pytest.approx(60.0)
    assert s["target_accuracy"] == pytest.approx(0.897)
    g = s["groups"]["apts-N2-sr1"]
    assert g["reached"] == "1/2" and g["time_to_target_s"] == [4.0, None]
    assert g["time_to_target_s_mean"] == pytest.approx(4.0)
    assert g["ratio_to_adam_grid"] == pytest.approx(4.0 / 30.0)
    assert g["final_test_accuracy_mean"] == pytest.approx(0.894)
    assert g["train_time_per_data_pass_s"] == pytest.approx(4.0)  # 4 s over 1 data pass
    one = s["against_adam_batch"]["128"]  # a single batch size: the same target and grid
    best, med = one["targets"]["best"], one["targets"]["median"]
    assert best["target_accuracy"] == pytest.approx(0.897) and one["grid_train_time_s"] == 30.0
    assert best["adam_time_to_target_s"] == pytest.approx(10.0)
    assert set(best["groups"]) == {"apts-N2-sr1"}
    assert best["groups"]["apts-N2-sr1"]["reached"] == "1/2"
    assert best["groups"]["apts-N2-sr1"]["ratio_to_adam_grid"] == pytest.approx(4.0 / 30.0)
    # Median lr 1e-2 -> 0.80 (no gap): both APTS seeds reach it at epoch 1 (2 s).
    assert med["adam_group"] == "adam-b128-lr1.00e-02" and med["target_accuracy"] == 0.80
    assert med["groups"]["apts-N2-sr1"]["reached"] == "2/2"
    assert med["groups"]["apts-N2-sr1"]["time_to_target_s_mean"] == pytest.approx(2.0)
    assert med["groups"]["apts-N2-sr1"]["ratio_to_adam_grid"] == pytest.approx(2.0 / 30.0)
    assert s["compute_s"] is None  # the fake runs carry no elapsed time
    assert "apts-N2-sr1" in paper.markdown({
        "mode": "full", "date": "d", "command": "c", "datasets": {"x": s},
        "machine": {"cores": 2, "jax": "0", "backend": "cpu"}})


def test_plan_names_and_counts() -> None:
    paper = _load_paper_module()
    full = paper.plan(paper.FULL, ["fashion_mnist"])
    # 3 seeds x (APTS and SAPTS: 3 N x 2 models of the paper's method; SAPTS: 3 N with the
    # library's default; Adam and SGD: 2 batches x 13 lrs; L-BFGS).
    assert len(full) == 3 * (2 * 6 + 3 + 2 * 26 + 1)
    names = {s.name for s in full}
    assert len(names) == len(full)
    assert {"apts-N4-sr1-s2", "sapts-N1-fo-b10000-s0", "adam-b128-lr1.00e-05-s0",
            "sgd-b10000-lr1.00e-01-s1", "lbfgs-s0"} <= names
    assert paper.FULL.lrs[0] == 1e-5 and paper.FULL.lrs[-1] == 1e-1 and len(paper.FULL.lrs) == 13
    # The paper's nu = 5 local iterations for every run of the paper's method, no flag for the
    # baselines.
    by_name = {s.name: s for s in full}
    argv = by_name["sapts-N2-sr1-b10000-s0"].argv(paper.FULL, Path("out"), None)
    assert argv[argv.index("--local-steps") + 1] == "5" and "--second-order" in argv
    assert argv[argv.index("--preset") + 1] == "paper"  # pinned, whatever the default
    # The default configuration: no preset, no model flag, the library's minibatch rule.
    assert {"sapts-N1-default-b625-s0", "sapts-N4-default-b624-s2"} <= names
    assert not any(s.order == "default" and s.method == "apts" for s in full)
    argv = by_name["sapts-N2-default-b624-s1"].argv(paper.FULL, Path("out"), None)
    assert "--preset" not in argv and "--second-order" not in argv and "--first-order" not in argv
    assert "--local-steps" not in argv  # the CLI's default nu
    assert argv[argv.index("--batch-size") + 1] == "624"
    assert "--local-steps" not in by_name["adam-b128-lr1.00e-05-s0"].argv(paper.FULL, Path("o"), None)
