"""Atomic training checkpoints with orbax-checkpoint.

A checkpoint holds one training state (any pytree of JAX arrays: parameters, optimizer state,
counters) plus a JSON document (epoch, metric history, timers, the config). It is written by
:class:`orbax.checkpoint.CheckpointManager`, which writes into a temporary folder
``<epoch>.orbax-checkpoint-tmp-<stamp>`` and renames it to ``<epoch>`` only when everything is on
disk, so a killed writer never leaves a folder that looks like a finished checkpoint. Leftover
temporary folders are ignored by :meth:`Checkpointer.latest_epoch` and removed when the manager
opens (``cleanup_tmp_directories``). Saving is synchronous (no background thread), so after
:meth:`Checkpointer.save` returns the checkpoint is complete.

The state is stored as the flat list of its leaves (``jax.tree.leaves``) and restored into the
tree structure, shapes, dtypes and shardings of a *template* state built the same way as the
original (e.g. by re-running the initialisation), so any pytree type (``flax.nnx.State``, optax
NamedTuples, ``None`` sub-trees) round-trips, and restored arrays are bitwise equal to the saved
ones, placed on the template's devices.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["Checkpointer"]


def _quiet_orbax() -> None:
    # orbax logs every save/restore at INFO/WARNING through absl; keep the CLI output readable.
    for name in ("absl", "orbax", "orbax.checkpoint"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except Exception:  # pragma: no cover - absl is an orbax dependency
        pass


def _to_shape_dtype_struct(x: jax.Array) -> jax.ShapeDtypeStruct:
    """Shape, dtype and sharding of ``x``, as orbax restores it (``ocp.tree`` since 0.11.x)."""
    import orbax.checkpoint as ocp

    tree = getattr(ocp, "tree", None)
    convert = getattr(tree, "to_shape_dtype_struct", None) or ocp.utils.to_shape_dtype_struct
    return convert(x)


class Checkpointer:
    """Save and restore ``(state, meta)`` pairs by epoch in ``directory``.

    Args:
      directory: the checkpoint folder (created if missing); one sub-folder per saved epoch.
      max_to_keep: how many of the newest checkpoints to keep.
    """

    def __init__(self, directory: str | os.PathLike[str], max_to_keep: int = 2) -> None:
        import orbax.checkpoint as ocp

        _quiet_orbax()
        self._ocp = ocp
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_epoch(self) -> int | None:
        """The newest complete checkpoint's epoch, or None."""
        self._manager.reload()
        return self._manager.latest_step()

    def all_epochs(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, epoch: int, state: Any, meta: dict[str, Any]) -> None:
        """Write ``state`` and ``meta`` (JSON-serialisable) as checkpoint ``epoch``; atomic."""
        ocp = self._ocp
        leaves = [jnp.asarray(x) if not isinstance(x, jax.Array) else x
                  for x in jax.tree.leaves(state)]
        self._manager.save(
            int(epoch),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(leaves), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, epoch: int, template: Any) -> tuple[Any, dict[str, Any]]:
        """Checkpoint ``epoch`` as ``(state, meta)``; ``state`` has ``template``'s structure,
        shapes, dtypes and shardings."""
        ocp = self._ocp
        leaves, treedef = jax.tree.flatten(template)
        abstract = [_to_shape_dtype_struct(jnp.asarray(x)) for x in leaves]
        try:
            restored = self._manager.restore(
                int(epoch),
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        except ValueError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"checkpoint {epoch} in {self.directory} does not match the current "
                f"configuration ({first})"
            ) from err
        got = list(restored.state)
        if len(got) != len(abstract):
            raise ValueError(
                f"checkpoint {epoch} in {self.directory} holds {len(got)} arrays, the current "
                f"configuration needs {len(abstract)}; it was written by another configuration."
            )
        for a, b in zip(got, abstract, strict=True):
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(
                    f"checkpoint {epoch} in {self.directory} does not match the current "
                    f"configuration (array {a.shape} {a.dtype} where {b.shape} {b.dtype} is "
                    "needed)."
                )
        return jax.tree.unflatten(treedef, got), dict(restored.meta)

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
