"""The tuning-free ablation runner (benchmarks/tuning_free.py): plan, resume and summary.

A tiny synthetic classification problem (240 samples, MLP 8-16-3) stands in for the real ones;
the summary is checked against hand-computed statistics on synthetic run documents.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import tuning_free as tf  # noqa: E402


def _tiny_data() -> tf.ProblemData:
    import jax.numpy as jnp
    import optax

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 8)) * 2.0
    y = rng.integers(0, 3, 300).astype(np.int32)
    x = (centers[y] + rng.standard_normal((300, 8))).astype(np.float32)
    sizes = (8, 16, 3)

    def loss(params: Any, batch: Any) -> Any:
        xb, yb = batch
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(tf.mlp_apply(params, xb), yb))

    def sums(params: Any, batch: Any) -> Any:
        xb, yb = batch
        logits = tf.mlp_apply(params, xb)
        return (jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, yb)),
                jnp.sum((jnp.argmax(logits, -1) == yb).astype(jnp.float32)))

    return tf.ProblemData(x[:240], y[:240], x[240:], y[240:],
                          lambda seed: tf._init_mlp(seed, sizes), loss, sums, "tiny")


TINY_CONFIG = {"stochastic": True, "batch_size": 40, "overlap": 0.05, "subdomain_overlap": 0.05,
               "num_subdomains": (2,), "local_steps": 2, "model": "first_order", "memory_size": 2,
               "preset": "paper"}


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tf.ProblemSpec("tiny", "classification", 2, 40, _tiny_data)
    monkeypatch.setitem(tf.PROBLEMS, "tiny", spec)
    monkeypatch.setitem(tf.CONFIGS, "tiny", TINY_CONFIG)
    monkeypatch.setattr(tf, "LRS", (1e-3, 1e-2))


def test_plan_counts_names_and_rejects_unknown_keys(tiny: None) -> None:
    lrs = (1e-3, 1e-2)
    full = tf.plan(["tiny"], ["tiny"], [0, 1, 2], screen=False, lrs=lrs)
    # Adam: batches {40, 128} x 2 lrs x 3 seeds; APTS: N=2 x 3 seeds.
    assert len(full) == 2 * 2 * 3 + 3
    assert {s.batch_size for s in full if s.method == "adam"} == {40, 128}
    assert {s.epochs for s in full} == {2}
    assert "tiny/full/adam-b128-lr1.00e-03-s2" in {s.key for s in full}
    assert "tiny/full/tiny-N2-s1" in {s.key for s in full}
    screen = tf.plan(["tiny"], ["tiny"], [0, 1, 2], screen=True, lrs=lrs)
    assert len(screen) == 2 * 2 + 1 and {s.seed for s in screen} == {0}
    assert {s.epochs for s in screen} == {1} and {s.protocol for s in screen} == {"screen"}
    # The fmnist problems keep the paper's batch; fmnist_small uses 1,000; 30 epochs screen to 15.
    p = tf.plan(["fmnist_small"], ["paper"], [0], screen=True, methods=["apts"])
    assert [(s.batch_size, s.subdomains, s.epochs) for s in p] == [(1000, 1, 15), (1000, 2, 15),
                                                                    (1000, 4, 15)]
    # A new make_apts option is one entry; an unknown one is rejected before anything runs.
    with pytest.raises(ValueError, match="no_such_option"):
        tf.plan(["tiny"], ["bad"], [0], screen=False,
                config_table={"bad": {**TINY_CONFIG, "no_such_option": 1}})
    runner, kwargs = tf.split_config({**TINY_CONFIG, "batch_scale": 0.5})
    assert runner["batch_scale"] == 0.5 and kwargs["local_steps"] == 2 and "batch_size" not in kwargs
    # The minibatch: max(min_batch, problem batch x batch_scale), a multiple of the largest N.
    p = tf.plan(["fmnist_small", "fmnist_mlp"], ["adaptive-mean-ell-b16x-min256"], [0],
                screen=True, methods=["apts"])
    assert {(s.problem, s.batch_size) for s in p} == {("fmnist_small", 256), ("fmnist_mlp", 624)}


def test_run_resume_and_summary_end_to_end(tiny: None, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tf, "ADAM_SMALL_BATCH", 40)  # one Adam batch size: one compilation
    out = tmp_path / "res"
    argv = ["--problems", "tiny", "--configs", "tiny", "--seeds", "0", "--out", str(out),
            "--quiet", "--no-plots"]
    assert tf.main([*argv, "--max-runs", "2"]) == 0
    files = sorted((out / "tiny" / "full").glob("*.json"))
    assert len(files) == 2
    doc = json.loads(files[0].read_text())
    assert doc["method"] == "adam" and len(doc["history"]) == 3  # epoch 0 + 2 epochs
    h = doc["history"]
    assert h[2]["data_passes"] == pytest.approx(2 * (240 // doc["params"]["batch_size"])
                                                * doc["params"]["batch_size"] / 240)
    assert h[2]["train_time_s"] >= h[1]["train_time_s"] > 0
    # Resume: a finished run is skipped (its JSON is left as it is), the others run.
    doc["final"]["test_accuracy"] = 0.123456
    files[0].write_text(json.dumps(doc))
    assert tf.main(argv) == 0
    files = sorted((out / "tiny" / "full").glob("*.json"))
    assert len(files) == 3  # 2 Adam + 1 APTS
    assert json.loads(files[0].read_text())["final"]["test_accuracy"] == 0.123456
    apts = json.loads((out / "tiny" / "full" / "tiny-N2-s0.json").read_text())
    assert apts["params"]["subdomains"] == 2 and apts["devices"] == 2
    kwargs = {k: v for k, v in apts["make_apts_kwargs"].items() if k != "preset"}
    assert kwargs == {"local_steps": 2, "model": "first_order", "memory_size": 2}
    # SAPTS data passes: per-subdomain evaluations x minibatch / N_train.
    f = apts["final"]
    assert f["data_passes"] == pytest.approx(f["grad_evals"] * 40 / 240)
    assert f["test_accuracy"] > 0.5  # it trained (3 well separated classes)
    summary = json.loads((out / "summary.json").read_text())
    s = summary["protocols"]["full"]["problems"]["tiny"]
    assert s["num_runs"] == 3 and "tiny-N2" in summary["protocols"]["full"]["selection"]["groups"]
    assert (out / "summary.md").read_text().count("### tiny") == 1


def test_multi_batch_pairs_get_the_overlap_and_count_it(tiny: None, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = {**TINY_CONFIG, "model": "sr1", "curvature_pairs": "multi_batch", "overlap": 0.25}
    monkeypatch.setitem(tf.CONFIGS, "tiny-mb", cfg)
    out = tmp_path / "res"
    assert tf.main(["--problems", "tiny", "--configs", "tiny-mb", "--methods", "apts", "--seeds",
                    "0", "--out", str(out), "--quiet", "--no-plots"]) == 0
    doc = json.loads((out / "tiny" / "full" / "tiny-mb-N2-s0.json").read_text())
    assert doc["make_apts_kwargs"]["curvature_pairs"] == "multi_batch"
    # batch 40 = 2 x 20, shared part 1: u = 39 distinct samples, overlap o = floor(0.25 u) = 9,
    # two shares of 4; K = (240 - 9) // 30 = 7 minibatches per epoch. Each outer iteration adds
    # two evaluations on the 8 pair samples to the data passes.
    f = doc["final"]
    assert f["iterations"] == 14
    assert f["data_passes"] == pytest.approx((f["grad_evals"] * 40 + 14 * 2 * 8) / 240)
    assert f["test_accuracy"] > 0.5


def _doc(problem: str, group: str, method: str, seed: int, metric: str, values: list[float],
         times: list[float], **params: Any) -> dict[str, Any]:
    hist = [{"epoch": e, metric: v, "train_time_s": t, "train_loss": 1.0, "data_passes": e}
            for e, (v, t) in enumerate(zip(values, times, strict=True))]
    return {"problem": problem, "group": group, "method": method, "protocol": "full",
            "metric": metric, "source": "tuning_free",
            "params": {"seed": seed, "epochs": len(values) - 1, **params},
            "history": hist, "final": hist[-1], "compile_s": 0.0}


def test_summary_statistics_against_hand_computation(tmp_path: Path) -> None:
    acc, mse = "test_accuracy", "test_loss"
    runs = []
    # Classification: Adam lr a (0.90, 0.92), lr b (0.80, 0.80), lr c (0.85, 0.85).
    for lr, finals in ((1e-3, (0.90, 0.92)), (1e-2, (0.80, 0.80)), (1e-4, (0.85, 0.85))):
        for s, v in enumerate(finals):
            runs.append(_doc("fmnist_mlp", f"adam-b128-lr{lr:.2e}", "adam", s, acc, [0.1, v],
                             [0.0, 4.0], batch_size=128, lr=lr))
    # Config, target 0.91 - 0.003 = 0.907: seed 0 reaches it at t=3 (0.912), seed 1 at t=2.5.
    runs.append(_doc("fmnist_mlp", "cfg-N2", "apts", 0, acc, [0.1, 0.89, 0.912], [0, 2.0, 3.0],
                     config="cfg", subdomains=2))
    runs.append(_doc("fmnist_mlp", "cfg-N2", "apts", 1, acc, [0.1, 0.908, 0.906], [0, 2.5, 5.0],
                     config="cfg", subdomains=2))
    # Regression: Adam lr x 0.10 / 0.12, lr y 0.20; config 0.105 (gap -5 %), reaches 0.102 at t=1.
    runs.append(_doc("regression", "adam-b128-lr1.00e-03", "adam", 0, mse, [1.0, 0.10], [0, 1.0],
                     batch_size=128, lr=1e-3))
    runs.append(_doc("regression", "adam-b128-lr1.00e-03", "adam", 1, mse, [1.0, 0.12], [0, 1.0],
                     batch_size=128, lr=1e-3))
    runs.append(_doc("regression", "adam-b128-lr1.00e-02", "adam", 0, mse, [1.0, 0.20], [0, 1.0],
                     batch_size=128, lr=1e-2))
    runs.append(_doc("regression", "cfg-N2", "apts", 0, mse, [1.0, 0.112, 0.1155], [0, 1.0, 2.0],
                     config="cfg", subdomains=2))
    for i, r in enumerate(runs):
        p = tmp_path / r["problem"] / "full" / f"{i}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(r))
    res = tf.summarize(tmp_path)["full"]
    c = res["problems"]["fmnist_mlp"]
    assert c["best_adam"]["lr"] == 1e-3 and c["best_adam"]["mean"] == pytest.approx(0.91)
    assert c["best_adam"]["std"] == pytest.approx(np.std([0.90, 0.92], ddof=1))
    assert c["median_adam"]["lr"] == 1e-4  # ranks 0.91 > 0.85 > 0.80: the middle one
    assert c["target"] == pytest.approx(0.907)
    g = c["groups"]["cfg-N2"]
    assert g["final_metric_mean"] == pytest.approx(0.909)
    assert g["gap"] == pytest.approx(100 * (0.909 - 0.91))  # -0.1 pp
    assert g["gap_in_tolerances"] == pytest.approx(-0.1 / 0.3)
    assert g["time_to_target_s"] == [3.0, 2.5] and g["reached"] == "2/2"
    assert g["above_median_adam"] is True
    assert g["ratio_to_adam_grid"] == pytest.approx(2.75 / 12.0)  # grid: 3 Adam groups x 4 s
    assert g["train_time_per_data_pass_s"] == pytest.approx(4.0 / 2.0)
    r = res["problems"]["regression"]
    assert r["higher_is_better"] is False
    assert r["best_adam"]["mean"] == pytest.approx(0.11) and r["best_adam"]["lr"] == 1e-3
    assert r["target"] == pytest.approx(0.11 * 1.02)
    gr = r["groups"]["cfg-N2"]
    assert gr["gap"] == pytest.approx(100 * (0.11 - 0.1155) / 0.11)  # -5 %
    assert gr["time_to_target_s"] == [1.0] and gr["reached"] == "1/1"  # 0.112 <= 0.1122
    sel = res["selection"]["groups"]["cfg-N2"]
    assert sel["worst_problem"] == "regression"  # -5 % / 2 % = -2.5 tol < -0.33 tol
    assert sel["worst_gap_in_tolerances"] == pytest.approx(-2.5)
    assert res["selection"]["configs"]["cfg"]["group"] == "cfg-N2"
    assert not math.isnan(res["problems"]["fmnist_mlp"]["adam_grid_train_time_s"])


def test_plot_handles_a_problem_without_adam_runs(tmp_path: Path) -> None:
    """A problem with APTS runs but no Adam grid yet (no target, no "reached" count) still plots
    (it raised KeyError before)."""
    pytest.importorskip("matplotlib")
    import plot_tuning_free

    ps = {"screen": False, "problems": {"p": {
        "higher_is_better": True, "num_runs": 3, "target": None, "adam_per_batch": {},
        "groups": {"cfg-N2": {"method": "apts", "final_metric_mean": 0.87,
                              "final_metric_std": 0.006}}}}}
    out = plot_tuning_free.plot_protocol(ps, tmp_path / "p.png", "full")
    assert out is not None and out.exists() and out.stat().st_size > 0
