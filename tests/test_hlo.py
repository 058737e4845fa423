"""apts_jax.hlo: collective counting on HLO text."""

from apts_jax.hlo import collective_stats, count_large


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
