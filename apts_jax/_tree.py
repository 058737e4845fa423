"""Pytree <-> flat vector helpers that keep leaf dtypes and work on ``jax.ShapeDtypeStruct``.

The trust-region algebra (L-SR1 memory, OBS subproblem, radius) runs on one flat vector. At the
boundary with user pytrees we ravel every leaf into a single vector of a common *real floating*
"flat dtype" (the promoted dtype of the leaves, at least float32, so that bfloat16/float16
parameters do not carry the quasi-Newton algebra in half precision) and unravel back to the
original shapes and dtypes.

Unlike :func:`jax.flatten_util.ravel_pytree` the :class:`FlatSpec` is built from shapes and dtypes
only, so it can be computed from abstract values (``jax.ShapeDtypeStruct``) in ``init``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

__all__ = ["FlatSpec", "check_same_structure", "flat_spec", "ravel", "unravel", "path_str"]


def path_str(path: tuple[Any, ...]) -> str:
    """Readable name of a leaf path, e.g. ``['layer']['w']``; ``<root>`` for a bare array."""
    s = jax.tree_util.keystr(path)
    return s if s else "<root>"


class FlatSpec(NamedTuple):
    """Static description of a pytree of arrays, enough to ravel and unravel it.

    Attributes:
      treedef: the tree structure.
      paths: readable name of every leaf (for error messages).
      shapes: shape of every leaf.
      dtypes: dtype of every leaf.
      dtype: the flat dtype (promoted leaf dtype, at least float32).
      size: total number of elements.
    """

    treedef: Any
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    dtype: np.dtype
    size: int


def flat_spec(tree: Any, *, what: str = "params") -> FlatSpec:
    """Build the :class:`FlatSpec` of ``tree`` (arrays or ``jax.ShapeDtypeStruct`` leaves).

    Raises:
      TypeError: a leaf has no shape/dtype, or is not a real floating array (the message names
        the leaf).
      ValueError: the tree has no leaves.
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if not leaves_with_path:
        raise ValueError(f"{what} has no array leaves; the trust-region method needs parameters.")
    paths, shapes, dtypes = [], [], []
    for path, leaf in leaves_with_path:
        name = path_str(path)
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            if isinstance(leaf, float):
                leaf = jnp.asarray(leaf)
            else:
                raise TypeError(
                    f"{what} leaf {name} is a {type(leaf).__name__}, not an array; pass arrays "
                    "(or jax.ShapeDtypeStruct) with a floating dtype."
                )
        dtype = np.dtype(leaf.dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{what} leaf {name} has dtype {dtype}; the trust-region method needs real "
                f"floating parameters. Cast it, e.g. {what}{'' if name == '<root>' else name}"
                ".astype(jnp.float32), or keep integer state out of the optimized tree."
            )
        paths.append(name)
        shapes.append(tuple(int(d) for d in leaf.shape))
        dtypes.append(dtype)
    flat = np.dtype(jnp.result_type(*dtypes, jnp.float32))
    size = sum(math.prod(s) for s in shapes)
    return FlatSpec(treedef, tuple(paths), tuple(shapes), tuple(dtypes), flat, size)


def check_same_structure(spec: FlatSpec, tree: Any, what: str) -> None:
    """Raise ``ValueError`` naming the first leaf of ``tree`` whose shape differs from ``spec``.

    Dtypes of ``tree`` may differ (they are cast on ravel); non-array leaves raise ``TypeError``.
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if treedef != spec.treedef:
        raise ValueError(
            f"{what} has tree structure {treedef}, but params have {spec.treedef}; pass {what} "
            "with exactly the structure of params."
        )
    for (path, leaf), name, shape in zip(leaves_with_path, spec.paths, spec.shapes, strict=True):
        if not hasattr(leaf, "shape"):
            if isinstance(leaf, int | float):
                leaf = np.asarray(leaf)
            else:
                raise TypeError(f"{what} leaf {path_str(path)} is a {type(leaf).__name__}, "
                                "not an array.")
        if tuple(leaf.shape) != shape:
            raise ValueError(
                f"{what} leaf {name} has shape {tuple(leaf.shape)} but the params leaf has shape "
                f"{shape}; {what} must match params leaf by leaf."
            )


def ravel(spec: FlatSpec, tree: Any) -> Array:
    """Concatenate the leaves of ``tree`` into one vector of dtype ``spec.dtype``."""
    leaves = spec.treedef.flatten_up_to(tree)
    parts = [jnp.ravel(jnp.asarray(leaf)).astype(spec.dtype) for leaf in leaves]
    if len(parts) == 1:
        return jax.lax.convert_element_type(parts[0], spec.dtype)
    return jnp.concatenate(parts)


def unravel(spec: FlatSpec, flat: Array) -> Any:
    """Split ``flat`` back into a tree with the shapes and (leaf) dtypes of ``spec``."""
    leaves = []
    offset = 0
    for shape, dtype in zip(spec.shapes, spec.dtypes, strict=True):
        n = math.prod(shape)
        piece = jax.lax.slice_in_dim(flat, offset, offset + n)
        leaves.append(jax.lax.convert_element_type(piece.reshape(shape), dtype))
        offset += n
    return jax.tree_util.tree_unflatten(spec.treedef, leaves)


def zeros(spec: FlatSpec) -> Any:
    """A tree of zeros with the shapes and dtypes of ``spec``.

    (Not ``optax.tree.zeros_like``: the states are built from a :class:`FlatSpec`, which keeps the
    leaf dtypes strong even for Python-float leaves.)
    """
    leaves = [jnp.zeros(s, d) for s, d in zip(spec.shapes, spec.dtypes, strict=True)]
    return jax.tree_util.tree_unflatten(spec.treedef, leaves)


def strong(x: Any) -> Array:
    """``x`` as an array with the same dtype and ``weak_type=False`` (stable jit signatures)."""
    x = jnp.asarray(x)
    return jax.lax.convert_element_type(x, x.dtype)


def cast_like(x: Any, ref: Any) -> Array:
    """``x`` converted to the dtype of ``ref``."""
    return jax.lax.convert_element_type(jnp.asarray(x), jnp.asarray(ref).dtype)
