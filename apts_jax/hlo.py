r"""Parse compiled HLO text: collective operations (communication counts and volumes) and the
control-flow structure (``while`` / ``conditional`` ops, fusions, custom calls).

``collective_stats(hlo_text)`` lists every collective instruction of an HLO module, as printed by
``jax.jit(f).lower(*args).compile().as_text()`` (or the pre-optimisation ``lower(...).as_text("hlo")``),
in all computations: the entry, while bodies and conditions, called computations and fusions.

Each entry is ``(kind, element_count, bytes)``:

* ``kind``: ``"all-reduce"``, ``"all-gather"``, ``"reduce-scatter"``, ``"all-to-all"``,
  ``"ragged-all-to-all"``, ``"collective-permute"`` or ``"collective-broadcast"``. The asynchronous
  pair ``<kind>-start`` / ``<kind>-done`` counts once, as ``<kind>`` (the ``-start`` half);
* ``element_count``: the number of array elements the instruction produces. For an all-reduce this
  is the operand size; a combined all-reduce (XLA's ``all-reduce-combiner`` merges several into one
  instruction with a tuple result) counts the sum over the tuple. For an async ``-start`` whose
  result tuple also carries the operand (``all-gather-start``, ``collective-permute-start``) or
  ``u32[]`` contexts, only the largest array of the tuple is counted (the gathered/permuted result);
* ``bytes``: the same elements times their dtype sizes.

Example — the gradient-sized all-reduces of a program with ``n`` parameters::

    stats = collective_stats(compiled.as_text())
    big = [s for s in stats if s[0] == "all-reduce" and s[1] >= n]

The parser reads the textual result shape of each instruction (``f32[22]{0}``,
``(f32[22]{0}, s32[])``, ``bf16[4,8]{1,0:T(8,128)}``); operand names are not needed, so it works on
compiled text, where operands are printed without shapes.

``op_counts(hlo_text)`` counts every instruction by opcode, in all computations, and
``structure_counts`` keeps the ones that matter on an accelerator: ``while`` and ``conditional``
(data-dependent control flow: the device waits for the host to read the predicate on GPU),
``fusion`` (each a kernel launch on GPU), ``custom-call`` (library calls: LAPACK / cuSOLVER
eigendecompositions, LU) and the collectives::

    counts = structure_counts(jax.jit(f).lower(*args).compile().as_text())
    assert counts["while"] == 0 and counts["conditional"] == 0

Instructions inside fused computations are not counted by ``structure_counts`` (a fusion is one
kernel whatever it contains); ``op_counts(..., include_fused=True)`` counts them too.
"""

from __future__ import annotations

import re

__all__ = [
    "COLLECTIVE_KINDS",
    "DTYPE_BYTES",
    "STRUCTURE_OPS",
    "collective_stats",
    "count_large",
    "op_counts",
    "structure_counts",
]

#: Collective opcodes recognised (each also as ``<kind>-start``; ``<kind>-done`` is ignored).
COLLECTIVE_KINDS: tuple[str, ...] = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
    "collective-broadcast",
)

#: Bytes per element of the HLO primitive types (sub-byte types rounded up to one byte).
DTYPE_BYTES: dict[str, int] = {
    "pred": 1, "s2": 1, "s4": 1, "s8": 1, "s16": 2, "s32": 4, "s64": 8,
    "u2": 1, "u4": 1, "u8": 1, "u16": 2, "u32": 4, "u64": 8,
    "f4e2m1fn": 1, "f8e3m4": 1, "f8e4m3": 1, "f8e4m3fn": 1, "f8e4m3fnuz": 1, "f8e4m3b11fnuz": 1,
    "f8e5m2": 1, "f8e5m2fnuz": 1, "f8e8m0fnu": 1,
    "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
}

_KIND_ALT = "|".join(re.escape(k) for k in sorted(COLLECTIVE_KINDS, key=len, reverse=True))
# `  [ROOT ]%name = <shape> <opcode>(` ; the shape may be a tuple containing spaces.
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>[^=\"]*?)\s+"
    rf"(?P<op>(?:{_KIND_ALT})(?:-start|-done)?)\("
)
_ARRAY = re.compile(r"\b(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[0-9,]*)\]")
# XLA annotates long tuples with `/*index=5*/` comments; their `=` would stop the shape match.
_COMMENT = re.compile(r"/\*.*?\*/")


def _arrays(shape: str) -> list[tuple[int, int]]:
    """``(elements, bytes)`` of every array in a (possibly tuple) HLO shape string."""
    out = []
    for m in _ARRAY.finditer(shape):
        dtype = m.group("dtype")
        if dtype not in DTYPE_BYTES:
            continue
        elements = 1
        for d in filter(None, m.group("dims").split(",")):
            elements *= int(d)
        out.append((elements, elements * DTYPE_BYTES[dtype]))
    return out


def collective_stats(hlo_text: str) -> list[tuple[str, int, int]]:
    """Every collective instruction in ``hlo_text`` as ``(kind, element_count, bytes)``.

    Args:
      hlo_text: an HLO module as text (compiled or not), all computations included.

    Returns:
      One tuple per instruction, in text order (see the module docstring for the counting rules).
    """
    stats: list[tuple[str, int, int]] = []
    for line in hlo_text.splitlines():
        m = _INSTR.match(_COMMENT.sub("", line))
        if m is None:
            continue
        op = m.group("op")
        if op.endswith("-done"):
            continue
        kind = op.removesuffix("-start")
        arrays = _arrays(m.group("shape"))
        if not arrays:
            continue
        if op.endswith("-start") and kind != "all-reduce" and len(arrays) > 1:
            elements, nbytes = max(arrays)
        else:
            elements = sum(a[0] for a in arrays)
            nbytes = sum(a[1] for a in arrays)
        stats.append((kind, elements, nbytes))
    return stats


def count_large(
    stats: list[tuple[str, int, int]], min_elements: int, kind: str = "all-reduce"
) -> int:
    """How many entries of ``stats`` of ``kind`` move at least ``min_elements`` elements."""
    return sum(1 for k, e, _ in stats if k == kind and e >= min_elements)


#: Opcodes reported by :func:`structure_counts` (collectives are summed under ``"collective"``).
STRUCTURE_OPS: tuple[str, ...] = ("while", "conditional", "fusion", "custom-call", "call")

# `  [ROOT ]%name = <shape> <opcode>(` with any opcode; the shape may be a tuple with spaces.
_ANY_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>[^=\"]*?)\s+(?P<op>[a-z][a-z0-9\-]*)\("
)
# A computation header: `[ENTRY ]%name (params) -> shape {`; fused ones are named `fused_*` or
# `*fused_computation*` and called by a `fusion` instruction.
_COMPUTATION = re.compile(r"^\s*(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*(?:\(.*)?\{\s*$")
_CALLS = re.compile(r"calls=%?(?P<name>[\w.\-]+)")


def op_counts(hlo_text: str, include_fused: bool = False) -> dict[str, int]:
    """How many instructions of each opcode ``hlo_text`` contains, over all computations.

    Args:
      hlo_text: an HLO module as text (compiled or not).
      include_fused: also count the instructions inside fused computations (those called by a
        ``fusion`` instruction). Off by default: a fusion is one kernel.

    Returns:
      ``{opcode: count}``.
    """
    text = _COMMENT.sub("", hlo_text)
    fused: set[str] = set()
    if not include_fused:
        for line in text.splitlines():
            m = _ANY_INSTR.match(line)
            if m is not None and m.group("op") == "fusion":
                fused.update(c.group("name") for c in _CALLS.finditer(line))
    counts: dict[str, int] = {}
    skipping = False
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header is not None and "=" not in line.split("{")[0].split("(")[0]:
            skipping = header.group("name") in fused
            continue
        if skipping:
            continue
        m = _ANY_INSTR.match(line)
        if m is None:
            continue
        op = m.group("op")
        counts[op] = counts.get(op, 0) + 1
    return counts


def structure_counts(hlo_text: str) -> dict[str, int]:
    """``while``, ``conditional``, ``fusion``, ``custom-call``, ``call`` and ``collective`` counts.

    ``collective`` counts each collective once (an async ``-start``/``-done`` pair as one), as
    :func:`collective_stats` does. Fused computations are not entered.
    """
    counts = op_counts(hlo_text)
    out = {op: counts.get(op, 0) for op in STRUCTURE_OPS}
    out["collective"] = len(collective_stats(hlo_text))
    return out
