"""apts_jax.hlo: collective counting and control-flow structure of HLO text."""

import functools

import jax
import jax.numpy as jnp
import pytest

from apts_jax import lsr1, obs
from apts_jax.hlo import collective_stats, count_large, op_counts, structure_counts


def test_tuple_all_reduce_with_index_comments_is_counted() -> None:
    line = (
        "  %all-reduce = (f32[784,512]{1,0}, f32[512]{0}, f32[512,256]{1,0}, f32[256]{0}, "
        "f32[256,10]{1,0}, /*index=5*/f32[10]{0}, f32[]) all-reduce(%a, %b, %c, %d, %e, "
        "/*index=5*/%f, %g), replica_groups={{0,1}}, to_apply=%add"
    )
    stats = collective_stats(line)
    n = 784 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10 + 1
    assert stats == [("all-reduce", n, 4 * n)]
    assert count_large(stats, 535_818) == 1


def test_async_pairs_count_once_and_non_collectives_are_ignored() -> None:
    text = "\n".join(
        [
            "  %ars = f32[100]{0} all-reduce-start(f32[100]{0} %x), to_apply=%add",
            "  %ard = f32[100]{0} all-reduce-done(f32[100]{0} %ars)",
            "  %add.1 = f32[100]{0} add(f32[100]{0} %x, f32[100]{0} %y)",
            "  ROOT %ag = s32[8,4]{1,0} all-gather(s32[1,4]{1,0} %z), dimensions={0}",
        ]
    )
    assert collective_stats(text) == [("all-reduce", 100, 400), ("all-gather", 32, 128)]


# --------------------------------------------------------------------------------------------
# structure: while / conditional / fusion / custom-call counts


def test_op_counts_on_text_skip_fused_computations() -> None:
    text = "\n".join(
        [
            "%fused_computation (param_0: f32[4]) -> f32[4] {",
            "  %param_0 = f32[4]{0} parameter(0)",
            "  ROOT %negate.1 = f32[4]{0} negate(f32[4]{0} %param_0)",
            "}",
            "",
            "ENTRY %main (x: f32[4]) -> (f32[4], s32[]) {",
            "  %x = f32[4]{0} parameter(0)",
            "  %fusion = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_computation",
            "  %w = (s32[], f32[4]{0}) while(%t), condition=%cond, body=%body",
            "  %c = f32[4]{0} conditional(%p, %a, %b), branch_computations={%b0, %b1}",
            "  %cc = (f32[4,4]{1,0}, f32[4]{0}) custom-call(%m), custom_call_target=\"lapack_ssyevd\"",
            "  ROOT %t = (f32[4]{0}, s32[]) tuple(%fusion, %i)",
            "}",
        ]
    )
    counts = op_counts(text)
    assert counts["fusion"] == 1 and counts["while"] == 1 and counts["conditional"] == 1
    assert "negate" not in counts and counts["parameter"] == 1
    assert op_counts(text, include_fused=True)["negate"] == 1
    s = structure_counts(text)
    assert s == {"while": 1, "conditional": 1, "fusion": 1, "custom-call": 1, "call": 0,
                 "collective": 0}


def test_structure_counts_find_loops_and_branches_in_compiled_code() -> None:
    def f(x: jax.Array) -> jax.Array:
        def body(c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            i, v = c
            return i + 1, jax.lax.cond(v > 0, lambda: v * 2.0, lambda: v + 1.0)

        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]

    s = structure_counts(jax.jit(f).lower(1.0).compile().as_text())
    assert s["while"] == 1 and s["conditional"] == 1
    straight = structure_counts(jax.jit(lambda x: jnp.where(x > 0, x * 2.0, x + 1.0))
                                .lower(1.0).compile().as_text())
    assert straight["while"] == 0 and straight["conditional"] == 0


@pytest.mark.parametrize("dtype,n,m", [("float32", 40, 5), ("float64", 3, 5)])
def test_obs_and_lsr1_update_compile_to_straight_line_code(dtype: str, n: int, m: int) -> None:
    """Issue 10: no ``while`` and no ``conditional`` in the compiled OBS solve with
    ``straight_line=True`` (``solve`` and ``solve_memory``) nor in the L-SR1 update: no host round
    trip on an accelerator. ``straight_line=False`` (the CPU default) keeps exactly one
    ``conditional`` (the explicit complement of ``g``) and no ``while``."""
    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", dtype == "float64")
    try:
        g = jnp.ones((n,), dtype)
        s = jnp.ones((n, m), dtype)
        mem = lsr1.init(n, m, dtype=jnp.dtype(dtype))
        mask = jnp.ones(m, bool)
        expected_conditionals = {}
        programs = {}
        for flag in (True, False):
            solve = functools.partial(obs.solve, straight_line=flag)
            memory = functools.partial(obs.solve_memory, straight_line=flag)
            programs[f"obs.solve[{flag}]"] = jax.jit(solve).lower(g, s, s, 1.0, 1.0)
            programs[f"obs.solve(mask)[{flag}]"] = jax.jit(solve).lower(g, s, s, 1.0, 1.0, mask)
            programs[f"obs.solve_memory[{flag}]"] = jax.jit(memory).lower(g, mem, 1.0)
            for name in ("obs.solve", "obs.solve(mask)", "obs.solve_memory"):
                expected_conditionals[f"{name}[{flag}]"] = 0 if flag else 1
        programs["lsr1.update"] = jax.jit(lsr1.update).lower(mem, g, g)
        expected_conditionals["lsr1.update"] = 0
        for name, lowered in programs.items():
            counts = structure_counts(lowered.compile().as_text())
            assert counts["while"] == 0, (name, counts)
            assert counts["conditional"] == expected_conditionals[name], (name, counts)
            assert counts["fusion"] > 0, (name, counts)  # the parser saw the program
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_default_variant_follows_the_backend() -> None:
    """``straight_line=None`` is ``False`` on CPU and ``True`` on GPU/TPU; a non-bool is refused."""
    assert obs.resolve_straight_line(None) == (jax.default_backend() != "cpu")
    assert obs.resolve_straight_line(True) is True and obs.resolve_straight_line(False) is False
    with pytest.raises(TypeError, match="straight_line"):
        obs.resolve_straight_line(jnp.asarray(True))
