"""Input checks shared by the factories (pure Python, run at factory / call time, never traced).

Every check raises ``TypeError``/``ValueError`` with a message that names the bad value and the
fix, before any state is built. One module so that :mod:`apts_jax.tr`, :mod:`apts_jax.minimize`,
:mod:`apts_jax.apts_transform` and :mod:`apts_jax.parallel` share them without importing each
other's private names.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

from apts_jax import radius as radius_lib
from apts_jax.radius import DEFAULT_RADIUS_CONFIG, RadiusConfig
from apts_jax.tr_model import MODELS

__all__ = [
    "APTS_OPTION_CHOICES",
    "INT32_MAX",
    "apts_options",
    "gtol",
    "local_steps",
    "model",
    "non_negative_int",
    "radius_config",
    "skip_tol",
    "split_kwargs",
]

INT32_MAX = 2**31 - 1


def model(model: Any, memory_size: Any) -> None:
    """Check the model name and the memory size."""
    if not isinstance(model, str) or model not in MODELS:
        raise ValueError(f"unknown model {model!r}; use model='sr1' or model='first_order'.")
    if isinstance(memory_size, bool) or not isinstance(memory_size, int):
        raise TypeError(
            f"memory_size must be a Python int >= 1, got {memory_size!r} "
            f"({type(memory_size).__name__})."
        )
    if memory_size < 1:
        raise ValueError(
            f"memory_size={memory_size} must be >= 1 (the number of stored SR1 pairs); "
            "the default is 5."
        )


def radius_config(
    radius: RadiusConfig | None = DEFAULT_RADIUS_CONFIG, **keywords: float | None
) -> RadiusConfig:
    """The validated :class:`RadiusConfig` from ``radius`` and the convenience keywords.

    A keyword that is not None replaces the field of ``radius``; a keyword that contradicts a
    ``radius`` other than the default (a different value for the same field) raises, since it is
    ambiguous which one the caller meant.
    """
    if radius is None:
        radius = DEFAULT_RADIUS_CONFIG
    if not isinstance(radius, RadiusConfig):
        raise TypeError(
            f"radius must be an apts_jax.RadiusConfig, got {type(radius).__name__}; e.g. "
            "radius=apts_jax.RadiusConfig(initial_radius=0.5)."
        )
    unknown = sorted(set(keywords) - set(RadiusConfig._fields))
    if unknown:
        raise TypeError(f"unknown radius constant(s) {unknown}; use {list(RadiusConfig._fields)}.")
    given = {k: v for k, v in keywords.items() if v is not None}
    if radius is not DEFAULT_RADIUS_CONFIG:
        clash = sorted(k for k, v in given.items() if v != getattr(radius, k))
        if clash:
            raise ValueError(
                f"radius constant(s) {clash} given both as keywords and, with other values, in "
                "radius=RadiusConfig(...); pass each constant once (e.g. "
                f"radius=radius._replace({clash[0]}=...))."
            )
    return radius_lib.validate_config(radius._replace(**given))


def skip_tol(value: Any) -> float:
    """The SR1 skip-rule tolerance: a finite real number >= 0."""
    try:
        out = float(value)
    except Exception as err:
        raise TypeError(f"skip_tol must be a real number, got {value!r}.") from err
    if not (math.isfinite(out) and out >= 0.0):
        raise ValueError(f"skip_tol={value!r} must be finite and >= 0; the default is 1e-8.")
    return out


def gtol(value: Any) -> float:
    """The gradient tolerance: a finite real number >= 0."""
    try:
        out = float(value)
    except Exception as err:
        raise TypeError(f"gtol must be a real number, got {value!r}.") from err
    if not (math.isfinite(out) and out >= 0.0):
        raise ValueError(f"gtol={value!r} must be finite and >= 0; the default is 1e-6.")
    return out


def non_negative_int(name: str, value: Any) -> int:
    """A Python int in ``[0, 2**31 - 1]`` (an int32 counter)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {value!r} ({type(value).__name__}).")
    if not 0 <= value <= INT32_MAX:
        raise ValueError(f"{name}={value} must lie in [0, {INT32_MAX}].")
    return value


def local_steps(value: Any) -> int:
    """APTS's :math:`\\nu`: a Python int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"local_steps (nu) must be an integer >= 1, got {value!r}; the paper uses 5."
        )
    return value


def split_kwargs(
    fn: Callable[..., Any], kwargs: dict[str, Any], who: str, *, strict: bool = True
) -> dict[str, Any]:
    """The keyword arguments of ``kwargs`` that ``fn`` accepts; raise on any other (``strict``).

    Like optax's line searches, a keyword is passed iff ``fn``'s signature names it; a function
    with ``**kwargs`` receives everything. The first positional parameter (the params) is never
    filled from ``kwargs``. With ``strict=False`` the others are dropped silently (for a second
    function that shares the extra arguments already checked against the first). (Hand-written:
    optax has no public helper for this.)
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return dict(kwargs)
    params = list(sig.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(kwargs)
    positional = [
        p for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    first = positional[0].name if positional else None
    names = {
        p.name for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name != first
    }
    rest = sorted(k for k in kwargs if k not in names)
    if rest and strict:
        raise TypeError(
            f"Unexpected keyword arguments passed to {who}: {rest} are not accepted by "
            "value_fn. Add them to value_fn's signature or stop passing them."
        )
    return {k: v for k, v in kwargs.items() if k in names}


#: Allowed values of the string fields of ``apts_jax.apts_transform.APTSOptions`` (issue 11). The
#: first entry of each is the paper's choice.
APTS_OPTION_CHOICES: dict[str, tuple[str, ...]] = {
    "local_boundary": ("ball", "adaptive"),
    "combine": ("sum", "mean"),
    "acceptance": ("monotone", "nonmonotone"),
    "norm": ("l2", "adaptive"),
    "curvature_pairs": ("same_batch", "multi_batch"),
    "model": ("sr1", "first_order"),
    "global_step": ("tr", "none"),
}


def apts_options(options: Any) -> Any:
    """Check an ``APTSOptions`` (duck-typed NamedTuple) and return it with normalised fields.

    String fields must be one of :data:`APTS_OPTION_CHOICES`; ``nonmonotone_window`` must be a
    Python int >= 1; ``curvature_pairs="multi_batch"`` needs the memory it feeds (the global
    step's L-SR1 memory: ``model="sr1"``, ``global_step="tr"``).
    """
    fields = getattr(options, "_fields", None)
    if fields is None:
        raise TypeError(
            f"options must be an apts_jax.APTSOptions, got {type(options).__name__}; e.g. "
            "options=apts_jax.APTSOptions(combine='mean') or preset='paper'."
        )
    for name, allowed in APTS_OPTION_CHOICES.items():
        value = getattr(options, name)
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(
                f"unknown {name} {value!r}; use one of {list(allowed)} ({name}={allowed[0]!r} is "
                "the paper's method)."
            )
    local_steps(options.local_steps)
    window = options.nonmonotone_window
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= 10_000:
        raise ValueError(
            f"nonmonotone_window={window!r} must be an integer in [1, 10000] (the number of "
            "last accepted values the non-monotone test compares against); e.g. 5."
        )
    if options.curvature_pairs == "multi_batch":
        if options.model != "sr1":
            raise ValueError(
                f"curvature_pairs='multi_batch' forms the secant pairs of the global L-SR1 memory, "
                f"but model={options.model!r} keeps none; pass model='sr1' (or "
                "curvature_pairs='same_batch')."
            )
        if options.global_step != "tr":
            raise ValueError(
                "curvature_pairs='multi_batch' feeds the L-SR1 memory of the global step (step "
                f"5), but global_step={options.global_step!r} skips it; pass global_step='tr' (or "
                "curvature_pairs='same_batch')."
            )
    return options
