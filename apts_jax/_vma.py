"""Varying-manual-axes (vma) helpers for code that runs inside ``jax.shard_map``.

With ``check_vma=True`` every value inside ``shard_map`` has a type that records over which mesh
axes it varies. Loop carries must keep their type, so a carry started from a constant (replicated)
must be cast to the axes over which the loop body makes it vary. Outside ``shard_map`` (or with
``check_vma=False``) all of this is a no-op.
"""

from __future__ import annotations

from typing import Any

import jax


def varying_axes(x: Any) -> frozenset[Any]:
    """The mesh axes over which ``x`` varies (empty outside ``shard_map``)."""
    try:
        aval = jax.typeof(x)
    except TypeError:
        return frozenset()
    vma = getattr(aval, "vma", None)
    if vma is None:
        mat = getattr(aval, "manual_axis_type", None)
        vma = getattr(mat, "varying", frozenset()) if mat is not None else frozenset()
    return frozenset(vma)


def match_vma(tree: Any, *refs: Any) -> Any:
    """Cast the leaves of ``tree`` to vary over every axis that any leaf of ``refs`` varies over."""
    axes: frozenset[Any] = frozenset()
    for ref in jax.tree.leaves(refs):
        axes |= varying_axes(ref)
    if not axes:
        return tree

    def cast(x: Any) -> Any:
        missing = tuple(sorted(axes - varying_axes(x), key=str))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)
