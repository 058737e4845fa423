"""Checkpoints of the training application: atomicity, round trips and bitwise-exact --resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from apts_jax.app import cli  # noqa: E402
from apts_jax.app import train as train_lib  # noqa: E402
from apts_jax.app.checkpoint import Checkpointer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import make_fake_fashion_mnist  # noqa: E402


def _bits(tree):
    return [(np.asarray(x).dtype.str, np.asarray(x).shape, np.asarray(x).tobytes())
            for x in jax.tree.leaves(tree)]


def _state():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("s",))
    params = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4, jnp.float32)}
    opt_state = optax.adam(1e-3).init(params)
    local = jax.device_put(jnp.arange(8.0).reshape(4, 2), NamedSharding(mesh, P("s")))
    return {"params": params, "opt": opt_state, "local": local, "none": None,
            "flag": jnp.asarray(True), "count": jnp.int32(7)}


def test_roundtrip_keeps_structure_bits_and_sharding(tmp_path):
    state = _state()
    meta = {"epoch": 3, "history": [{"loss": 0.1 + 0.2, "radius": None}]}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_epoch() is None
        ckpt.save(3, state, meta)
        assert ckpt.latest_epoch() == 3
        template = jax.tree.map(jnp.zeros_like, state)
        got, got_meta = ckpt.restore(3, template)
    assert jax.tree.structure(got) == jax.tree.structure(state)
    assert _bits(got) == _bits(state)
    assert got["local"].sharding == state["local"].sharding
    assert got_meta == meta  # floats round-trip exactly through JSON


def test_keeps_the_newest_and_rejects_a_foreign_template(tmp_path):
    state = _state()
    with Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
        for e in (1, 2, 3):
            ckpt.save(e, state, {"epoch": e})
        assert ckpt.all_epochs() == [2, 3]
        with pytest.raises(ValueError, match="does not match|holds"):
            ckpt.restore(3, {"x": jnp.zeros(5)})


def test_partial_checkpoint_is_never_picked_up(tmp_path):
    """A writer killed mid-save leaves only orbax's temporary folder, which is ignored."""
    state = _state()
    root = tmp_path / "ckpt"
    with Checkpointer(root) as ckpt:
        ckpt.save(1, state, {"epoch": 1})
    partial = root / "2.orbax-checkpoint-tmp-1700000000000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 100)
    with Checkpointer(root) as ckpt:
        assert ckpt.latest_epoch() == 1
        assert ckpt.all_epochs() == [1]
        _, meta = ckpt.restore(1, state)
        assert meta == {"epoch": 1}
    assert not partial.exists()  # cleaned up when the manager opened


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_fake_fashion_mnist(tmp_path_factory.mktemp("data") / "fashion_mnist")


def _run(argv):
    cfg = cli.parse_train_args(argv)
    return train_lib.run(cfg)


def _rows_without_times(out: Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        del r["wall_time_s"], r["train_time_s"]
    return rows


def test_resume_is_bitwise_identical(tmp_path, data_dir):
    """2 epochs straight == 1 epoch, a planted partial checkpoint, then --resume to 2 epochs.

    SAPTS with the L-SR1 model on 2 subdomains over 2 devices: the checkpoint has to carry the
    parameters, the radius, the global and the per-subdomain (sharded) L-SR1 memories and the
    counters; the minibatches of epoch 2 come from (seed, epoch) alone.
    """
    base = ["train", "--optimizer", "sapts", "--subdomains", "2", "--devices", "2",
            "--batch-size", "128", "--hidden", "16", "--iterations-per-epoch", "2",
            "--data-dir", str(data_dir), "--no-progress", "--no-plots", "--seed", "3"]
    straight = _run([*base, "--epochs", "2", "--out", str(tmp_path / "a")])

    first = _run([*base, "--epochs", "1", "--out", str(tmp_path / "b")])
    partial = tmp_path / "b" / "checkpoints" / "2.orbax-checkpoint-tmp-1"
    partial.mkdir()
    (partial / "junk").write_text("killed while writing")
    resumed = _run([*base, "--epochs", "2", "--out", str(tmp_path / "b"), "--resume"])

    assert [r["epoch"] for r in resumed.history] == [0, 1, 2]
    assert _bits(resumed.params) == _bits(straight.params)
    assert _bits(resumed.state) == _bits(straight.state)  # the whole optimizer state
    assert _bits(first.state) != _bits(straight.state)
    assert _rows_without_times(tmp_path / "b") == _rows_without_times(tmp_path / "a")
    assert ((tmp_path / "b" / "iterations.csv").read_bytes()
            == (tmp_path / "a" / "iterations.csv").read_bytes())
    assert not partial.exists()
    # Wall time continues from the checkpoint instead of restarting at zero.
    b_rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert b_rows[2]["wall_time_s"] > b_rows[1]["wall_time_s"]
