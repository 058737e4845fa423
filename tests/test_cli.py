"""Tests of the ``apts-jax train`` command line (apts_jax.app).

Runs use a small synthetic Fashion-MNIST look-alike written as IDX files into a temporary
``--data-dir`` (learnable: each class is a fixed random template plus noise), a tiny MLP
(``--hidden 16``) and two iterations per epoch, so that every optimizer trains for one short
epoch in a few seconds. The test session simulates 8 CPU devices (tests/conftest.py).
"""

from __future__ import annotations

import csv
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("matplotlib")

from apts_jax.app import cli  # noqa: E402
from apts_jax.app.metrics import EPOCH_FIELDS, ITERATION_FIELDS  # noqa: E402
from apts_jax.app.plots import PNG_SIGNATURE  # noqa: E402

N_TRAIN, N_TEST = 512, 256
TINY = ["--hidden", "16", "--epochs", "1", "--iterations-per-epoch", "2", "--no-progress"]


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def make_fake_fashion_mnist(folder: Path, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    """Write a learnable 10-class 28x28 data set in the four IDX files of Fashion-MNIST."""
    rng = np.random.default_rng(1234)
    templates = rng.integers(0, 256, size=(10, 28, 28))
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n)
        noise = rng.normal(0.0, 60.0, size=(n, 28, 28))
        images = np.clip(templates[labels] + noise, 0, 255)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    return folder


@pytest.fixture(scope="module", autouse=True)
def _jax_started():
    """Start JAX's backends (8 simulated CPU devices, tests/conftest.py) before any in-process
    ``main``: ``--devices D`` only configures simulated devices when JAX has not started, which
    must not change the device count of the rest of the test session."""
    import jax

    assert len(jax.devices()) >= 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_fashion_mnist(tmp_path_factory.mktemp("data") / "fashion_mnist")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_valid_png(path: Path) -> None:
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, (path, img.shape)
    assert float(np.std(img)) > 0.01, f"{path} is blank"


def _check_outputs(out: Path, epochs: int = 1, iterations: int = 2, radius: bool = True) -> None:
    for name in ("metrics.csv", "metrics.jsonl", "iterations.csv", "config.json",
                 "summary.txt", "loss.png", "accuracy.png", "radius.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(epochs + 1))
    assert all(set(r) == set(EPOCH_FIELDS) for r in rows)
    csv_rows = _read_csv(out / "metrics.csv")
    assert list(csv_rows[0]) == list(EPOCH_FIELDS) and len(csv_rows) == epochs + 1
    for r, c in zip(rows, csv_rows, strict=True):  # the CSV holds the same numbers
        for k in EPOCH_FIELDS:
            if r[k] is None:
                assert c[k] == ""
            else:
                assert float(c[k]) == float(r[k]), k
    last = rows[-1]
    assert last["iterations"] == epochs * iterations
    assert last["grad_evals"] >= epochs * iterations
    for k in ("train_loss", "test_loss"):
        assert math.isfinite(last[k]) and last[k] > 0
    for k in ("train_accuracy", "test_accuracy"):
        assert 0.0 <= last[k] <= 1.0
    assert last["wall_time_s"] >= last["train_time_s"] > 0
    if radius:
        assert last["radius"] > 0 and 0.0 <= last["accepted_frac"] <= 1.0
    else:
        assert last["radius"] is None
    its = _read_csv(out / "iterations.csv")
    assert list(its[0]) == list(ITERATION_FIELDS) and len(its) == epochs * iterations
    for name in ("loss.png", "accuracy.png", "radius.png"):
        _assert_valid_png(out / name)
    assert (out / "checkpoints" / str(epochs)).is_dir()


# ---------------------------------------------------------------------------------------------
# Training runs, one short epoch per optimizer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer, extra, radius",
    [
        ("sapts", ["--subdomains", "4", "--devices", "2", "--batch-size", "128"], True),
        ("apts", ["--subdomains", "2", "--preset", "paper", "--first-order", "--combine", "mean",
                  "--local-boundary", "adaptive", "--norm", "adaptive"], True),
        ("tr", ["--batch-size", "128"], True),
        ("adam", ["--batch-size", "64"], False),
        ("sgd", ["--batch-size", "64", "--lr", "0.05"], False),
        ("lbfgs", [], False),
    ],
)
def test_train_each_optimizer(tmp_path, data_dir, capsys, optimizer, extra, radius):
    out = tmp_path / "run"
    argv = ["train", "--optimizer", optimizer, "--data-dir", str(data_dir), "--subset",
            str(N_TRAIN), "--out", str(out), *TINY, *extra]
    assert cli.main(argv) == 0
    _check_outputs(out, radius=radius)
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer"] == optimizer
    if optimizer == "apts":  # the APTS options reach the config (and make_apts)
        assert (config["combine"], config["local_boundary"], config["norm"]) == (
            "mean", "adaptive", "adaptive")
        assert config["preset"] == "paper" and config["acceptance"] is None
        assert config["tr_model"] == "first_order"  # --first-order over the paper's L-SR1
    if optimizer == "sapts":  # no preset given: the default, recorded explicitly
        assert config["preset"] == "tuning_free" and config["tr_model"] == "first_order"
    if optimizer == "tr":
        assert config["preset"] is None and config["tr_model"] == "sr1"
    assert config["resolved"]["train_samples"] == N_TRAIN
    assert config["resolved"]["num_params"] == 784 * 16 + 16 + 16 * 10 + 10
    printed = capsys.readouterr().out
    assert "Summary" in printed and "final test accuracy" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if optimizer != "sgd":  # sgd with two small steps may go either way
        assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_sapts_layout_is_recorded(tmp_path, data_dir):
    out = tmp_path / "run"
    argv = ["--optimizer", "sapts", "--data-dir", str(data_dir), "--out", str(out), *TINY,
            "--subdomains", "8", "--batch-size", "128", "--no-plots", "--first-order"]
    assert cli.main(argv) == 0  # no sub-command: "train" is implied
    config = json.loads((out / "config.json").read_text())
    assert config["subdomains"] == 8 and config["devices"] == 8 and config["batch_size"] == 128
    assert "8 x 16" in config["resolved"]["method"]
    assert not (out / "loss.png").exists()


def test_sapts_multi_batch_pairs_run(tmp_path, data_dir):
    out = tmp_path / "run"
    argv = ["--optimizer", "sapts", "--data-dir", str(data_dir), "--out", str(out), *TINY,
            "--subdomains", "2", "--batch-size", "64", "--overlap", "0.25", "--no-plots",
            "--second-order", "--curvature-pairs", "multi_batch"]
    assert cli.main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["curvature_pairs"] == "multi_batch" and config["tr_model"] == "sr1"
    # u = 1 + 2 x 31 = 63 distinct samples, o = floor(0.25 u) = 15: two shares of 7
    assert "multi-batch curvature pairs on 14 overlap samples" in config["resolved"]["method"]


@pytest.mark.slow  # heavy; run with pytest -m slow (CI time, issue 9)
def test_entry_point_subprocess(tmp_path, data_dir):
    """``python -m apts_jax train`` in a fresh interpreter, with --devices simulating 2 CPUs."""
    out = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "apts_jax", "train", "--optimizer", "sapts", "--devices", "2",
         "--subdomains", "2", "--batch-size", "64", "--first-order", "--data-dir",
         str(data_dir), "--out", str(out), *TINY],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "2 subdomains on 2 device(s)" in proc.stdout
    _check_outputs(out)
    config = json.loads((out / "config.json").read_text())
    assert len(config["resolved"]["devices"]) == 2


def test_console_script_help():
    """The ``apts-jax`` console script (installed next to the interpreter) answers --help."""
    import shutil

    exe = Path(sys.executable).with_name("apts-jax")
    script = str(exe) if exe.exists() else shutil.which("apts-jax")
    if script is None:
        pytest.skip("the apts-jax console script is not installed (pip install -e .)")
    proc = subprocess.run([script, "train", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--optimizer" in proc.stdout and "--resume" in proc.stdout


# ---------------------------------------------------------------------------------------------
# Argument handling
# ---------------------------------------------------------------------------------------------


def test_no_arguments_is_the_default_training_job():
    cfg = cli.parse_train_args([])
    assert cfg.dataset == "fashion_mnist" and cfg.model == "mlp" and cfg.optimizer == "sapts"
    assert cfg.epochs == cli.DEFAULTS["epochs"] and cfg.subset is None and not cfg.resume
    assert cfg.out.startswith("runs/sapts-fashion_mnist-")
    assert cli.parse_train_args(["train"]).optimizer == "sapts"
    assert cli.parse_train_args(["--epochs", "3"]).epochs == 3


def test_model_choices_match_the_registry():
    from apts_jax.models import MODELS

    assert set(cli.MODEL_CHOICES) == set(MODELS)


def test_apts_option_flags_match_the_library():
    from apts_jax import _validate
    from apts_jax.app.config import APTS_OPTION_FLAGS, DEFAULT_PRESET, PRESET_CHOICES
    from apts_jax.apts_transform import DEFAULT_OPTIONS, PRESETS

    for name, choices in APTS_OPTION_FLAGS.items():
        assert choices == _validate.APTS_OPTION_CHOICES[name], name
    assert set(PRESET_CHOICES) == set(PRESETS)
    assert PRESETS[DEFAULT_PRESET] is DEFAULT_OPTIONS
    cfg = cli.parse_train_args(["--optimizer", "sapts", "--preset", "paper", "--acceptance",
                                "nonmonotone", "--nonmonotone-window", "3"])
    assert cfg.apts_options() == {"preset": "paper", "acceptance": "nonmonotone",
                                  "nonmonotone_window": 3}
    assert cli.parse_train_args(["--optimizer", "sapts"]).apts_options() == {}


@pytest.mark.parametrize(
    "argv, num_train, want",
    [
        # the default: tuning-free preset, first-order model, max(256, min(10000, n)/16) samples
        (["--optimizer", "sapts"], 60_000, ("tuning_free", False, 624, 10)),
        (["--optimizer", "sapts", "--subdomains", "1"], 60_000, ("tuning_free", False, 625, 10)),
        (["--optimizer", "sapts"], 2_000, ("tuning_free", False, 256, 10)),
        (["--optimizer", "sapts", "--second-order"], 60_000, ("tuning_free", True, 624, 10)),
        # the paper's method: L-SR1 and its 10,000-sample minibatches
        (["--optimizer", "sapts", "--preset", "paper"], 60_000, ("paper", True, 10_000, 5)),
        (["--optimizer", "sapts", "--preset", "paper", "--subdomains", "3"], 5_000,
         ("paper", True, 4_998, 5)),
        (["--optimizer", "apts", "--preset", "paper", "--first-order"], 60_000,
         ("paper", False, None, 5)),
        (["--optimizer", "apts"], 60_000, ("tuning_free", False, None, 10)),
        (["--optimizer", "sapts", "--local-steps", "3"], 60_000, ("tuning_free", False, 624, 3)),
        (["--optimizer", "sapts", "--preset", "paper", "--local-steps", "7"], 60_000,
         ("paper", True, 10_000, 7)),
        (["--optimizer", "tr"], 60_000, (None, True, None, None)),
        (["--optimizer", "tr", "--first-order"], 60_000, (None, False, None, None)),
    ],
)
def test_resolved_defaults_follow_the_preset(argv, num_train, want):
    from apts_jax.app.train import resolve_config

    cfg = resolve_config(cli.parse_train_args([*argv, "--devices", "1"]), num_train)
    assert (cfg.preset, cfg.second_order, cfg.batch_size, cfg.local_steps) == want
    assert cfg.tr_model == ("sr1" if want[1] else "first_order")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "-1"], "--epochs: must be >= 1"),
        (["--epochs", "0"], "--epochs: must be >= 1"),
        (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
        (["--subdomains", "3", "--batch-size", "100"], "not divisible by --subdomains 3"),
        (["--subdomains", "6", "--devices", "4"], "not a multiple of --devices 4"),
        (["--overlap", "1.5"], "--overlap: must be in [0, 1)"),
        (["--lr", "0.1"], "--lr is for adam and sgd"),
        (["--optimizer", "apts", "--batch-size", "64"], "full-batch method"),
        (["--resume"], "--resume needs --out"),
        (["--model", "cnn", "--hidden", "8"], "--hidden builds a custom MLP"),
        (["--batch-size", "abc"], "expected an integer"),
        (["--optimizer", "adam", "--combine", "mean"], "--combine: APTS options"),
        (["--optimizer", "tr", "--curvature-pairs", "multi_batch"],
         "--curvature-pairs: APTS options"),
        (["--norm", "linf"], "invalid choice: 'linf'"),
        (["--nonmonotone-window", "3"], "needs --acceptance nonmonotone"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("apts-jax train: error: ") and message in last, err


def test_bad_flags_found_after_startup_exit_2(tmp_path, data_dir, capsys):
    base = ["train", "--data-dir", str(data_dir), "--no-progress", "--hidden", "8"]
    # More devices than the session has (8 simulated).
    assert cli.main([*base, "--devices", "16", "--out", str(tmp_path / "a")]) == 2
    assert "only 8 device(s)" in capsys.readouterr().err
    # A minibatch larger than the (subset) training set.
    assert cli.main([*base, "--optimizer", "adam", "--subset", "100", "--batch-size", "128",
                     "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("apts-jax train: error: ") and len(err.strip().splitlines()) == 1
    # Default subdomain count (4 -> 8 on 8 devices) does not divide a given batch size.
    assert cli.main([*base, "--batch-size", "12", "--out", str(tmp_path / "c")]) == 2
    assert "not divisible by --subdomains 8" in capsys.readouterr().err
    # Multi-batch pairs without the L-SR1 memory, or with too small an overlap.
    assert cli.main([*base, "--curvature-pairs", "multi_batch", "--out", str(tmp_path / "d")]) == 2
    assert "the tuning_free preset's model is first-order: use --second-order" in (
        capsys.readouterr().err)
    assert cli.main([*base, "--curvature-pairs", "multi_batch", "--preset", "paper",
                     "--first-order", "--out", str(tmp_path / "g")]) == 2
    assert "but --first-order keeps none: use --second-order" in capsys.readouterr().err
    assert cli.main([*base, "--curvature-pairs", "multi_batch", "--second-order", "--global-step",
                     "none", "--out", str(tmp_path / "e")]) == 2
    assert "cannot be combined with --global-step none" in capsys.readouterr().err
    assert cli.main([*base, "--curvature-pairs", "multi_batch", "--second-order", "--batch-size",
                     "64", "--out", str(tmp_path / "f")]) == 2
    assert "fewer than the 8 subdomains; raise --overlap" in capsys.readouterr().err


def test_missing_dataset_exits_1(tmp_path, capsys, monkeypatch):
    import apts_jax.data.datasets as datasets

    monkeypatch.setattr(datasets, "SYSTEM_DATA_ROOT", tmp_path / "none")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("APTS_JAX_DATA_DIR", raising=False)
    monkeypatch.setenv("APTS_JAX_DATA_MIRROR", (tmp_path / "mirror").as_uri())
    rc = cli.main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty"),
                   "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("apts-jax train: error: ") and "Traceback" not in err


def test_existing_run_needs_resume(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    argv = ["train", "--optimizer", "adam", "--data-dir", str(data_dir), "--out", str(out),
            *TINY, "--no-plots"]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    # Resuming with other options is refused; with the same options and more epochs it goes on.
    assert cli.main([*argv, "--resume", "--lr", "0.01"]) == 2
    assert "options differ" in capsys.readouterr().err
    assert cli.main([*argv[:-1], "--resume", "--epochs", "2"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert (out / "loss.png").is_file()


# ---------------------------------------------------------------------------------------------
# Code shape: no import cycle in the app; the trainer's one loop and its callbacks
# ---------------------------------------------------------------------------------------------


def _app_imports() -> dict[str, set[str]]:
    """``apts_jax.app`` module -> the ``apts_jax.app`` modules it imports (anywhere in the file)."""
    import ast

    import apts_jax.app

    root = Path(apts_jax.app.__file__).parent
    names = {p.stem for p in root.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            for mod in mods:
                parts = mod.split(".")
                if parts[:2] == ["apts_jax", "app"] and len(parts) > 2 and parts[2] in names:
                    deps.add(parts[2])
        graph[path.stem] = deps - {path.stem}
    return graph


def test_app_modules_import_no_cycle():
    graph = _app_imports()
    assert {"config", "cli", "train", "trainer"} <= set(graph)
    assert "cli" not in graph["train"] and "train" not in graph["config"]
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, node, dep])}"
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_trainer_runs_one_loop_with_callbacks_and_continues_a_log():
    import jax.numpy as jnp

    from apts_jax.app.trainer import Callback, Method, StepReport, Trainer, TrainLog

    def make_method() -> Method:
        return Method(
            name="toy", label="toy", init=lambda: jnp.float32(0.0),
            step=lambda s, b: (s + b, StepReport(s + b, grad_evals=2)),
            batches=lambda epoch: iter([float(epoch), 10.0 * epoch, 100.0]),  # cut to 2
            iterations_per_epoch=2, samples_per_eval=5, num_train=10, params=lambda s: s,
        )

    events: list[tuple] = []

    class Recorder(Callback):
        def on_train_begin(self, trainer):
            events.append(("begin", trainer.log.epoch))

        def on_step(self, trainer, info):
            events.append(("step", trainer.epoch, info.loss, info.grad_evals))

        def epoch_metrics(self, trainer, state):
            return {"test_accuracy": float(state)}

        def on_epoch_end(self, trainer, state):
            events.append(("epoch", trainer.log.history[-1]["epoch"]))

        def on_train_end(self, trainer, state):
            events.append(("end", float(state)))

        def close(self):
            events.append(("close",))

    trainer = Trainer(make_method(), 2, [Recorder()])
    state = trainer.fit(make_method().init())
    assert float(state) == 1 + 10 + 2 + 20
    assert events == [("begin", 0), ("epoch", 0), ("step", 1, 1.0, 2), ("step", 1, 11.0, 4),
                      ("epoch", 1), ("step", 2, 13.0, 6), ("step", 2, 33.0, 8), ("epoch", 2),
                      ("end", 33.0), ("close",)]
    rows = trainer.log.history
    assert [r["iterations"] for r in rows] == [0, 2, 4]
    assert [r["batch_loss"] for r in rows] == [None, 6.0, 23.0]
    assert [r["data_passes"] for r in rows] == [0.0, 2.0, 4.0]  # 4 evaluations of 5 of 10 samples
    assert rows[2]["test_accuracy"] == 33.0 and rows[2]["radius"] is None
    assert [it["iteration"] for it in trainer.log.iterations] == [1, 2, 3, 4]

    # Continuing the record of epoch 1 from its state gives the same epoch 2.
    log = TrainLog(history=[dict(r) for r in rows[:2]], iterations=trainer.log.iterations[:2],
                   grad_evals=4)
    events.clear()
    again = Trainer(make_method(), 2, [Recorder()], log).fit(jnp.float32(11.0))
    assert float(again) == 33.0 and events[0] == ("begin", 1) and ("epoch", 0) not in events
    strip = ("wall_time_s", "train_time_s")
    assert [{k: v for k, v in r.items() if k not in strip} for r in log.history] == \
        [{k: v for k, v in r.items() if k not in strip} for r in rows]

    # An error inside the loop still closes every callback.
    events.clear()
    broken = make_method()
    broken.step = lambda s, b: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        Trainer(broken, 1, [Recorder()]).fit(broken.init())
    assert events[-1] == ("close",) and ("end", 0.0) not in events
