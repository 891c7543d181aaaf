"""Optimization menus and menu dropout (agents/menu.py)."""
from __future__ import annotations

import random

import pytest

from autocomp_compile.agents.menu import MenuItem, apply_dropout, cpu_menu, menu_text
from autocomp_compile.targets.cpu import codegen
from autocomp_compile.targets.cpu.isa import ISA_ORDER, supported_isas
from autocomp_compile.workload import make_workload
from tests.helpers import SMALL, small


def _dummy(n):
    return [MenuItem(f"m{i}", f"t{i}", "d", lambda k: True, lambda k, r: k) for i in range(n)]


def test_dropout_is_reproducible_with_a_seeded_rng():
    items = _dummy(50)
    a = [m.id for m in apply_dropout(items, 0.7, random.Random(123))]
    b = [m.id for m in apply_dropout(items, 0.7, random.Random(123))]
    c = [m.id for m in apply_dropout(items, 0.7, random.Random(124))]
    assert a == b
    assert a != c
    assert a == [m.id for m in items if m.id in a]  # order preserved, a subset


@pytest.mark.parametrize("dropout", [0.0, 0.3, 0.7, 0.95])
def test_dropout_drops_roughly_the_configured_fraction(dropout):
    items = _dummy(4000)
    kept = len(apply_dropout(items, dropout, random.Random(1)))
    expected = 4000 * (1 - dropout)
    assert abs(kept - expected) <= max(4 * (4000 * dropout * (1 - dropout)) ** 0.5, 0.5)
    if dropout == 0.0:
        assert kept == 4000


@pytest.mark.parametrize("dropout", [1.0, 1.5, -0.01])
def test_dropout_out_of_range_raises(dropout):
    with pytest.raises(ValueError, match="dropout"):
        apply_dropout(_dummy(3), dropout, random.Random(0))


def _start_states(w, isas):
    """Knob states from which different menu items apply: naive, vectorised + threaded, fully tuned."""
    naive = codegen.legalize(w, codegen.naive_knobs(w), isas)
    vec = codegen.legalize(w, {**naive, "isa": "avx2" if "avx2" in isas else isas[-1], "threads": "static"}, isas)
    tuned = codegen.legalize(
        w, {**vec, "online": True, "gqa_share": True, "fuse": True, "bf16_split": True, "rows": 4, "unroll": 2,
            "prefetch": 512, "threads": "dynamic", "chunk": 4, "q_block": 2, "kv_block": 32, "spans": 2}, isas)
    tiled = codegen.legalize(w, {**vec, "m_tile": 3, "rows": 2, "bf16_split": True}, isas)  # M > 1 only
    packed = codegen.legalize(w, {**vec, "pack": 1, "pack_rows": 4}, isas)  # M > 1 and a vector ISA only
    return [naive, vec, tuned, tiled, packed]


ISA_SETS = {"host": supported_isas(), "scalar_only": ["scalar"], "all": list(ISA_ORDER)}


@pytest.mark.parametrize("isa_set", sorted(ISA_SETS))
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("wname", sorted(SMALL))
def test_every_applicable_item_makes_a_change_legalize_keeps(wname, dtype, isa_set):
    isas = ISA_SETS[isa_set]
    w = small(wname, dtype)
    items = cpu_menu(w, isas)
    assert len({m.id for m in items}) == len(items)  # ids are unique
    applied_any = set()
    for knobs in _start_states(w, isas):
        for item in items:
            if not item.applies(knobs):
                continue
            applied_any.add(item.id)
            for seed in range(4):
                proposed = item.apply(dict(knobs), random.Random(seed))
                assert set(proposed) == set(knobs), f"{item.id} added or removed knobs"
                new = codegen.legalize(w, proposed, isas)
                assert new != knobs, f"{item.id} made no change from {knobs}"
                for key, value in proposed.items():
                    if value != knobs[key]:
                        assert new[key] == value, f"{item.id}: legalize undid {key}={value!r} (-> {new[key]!r})"
    assert applied_any  # the test exercised something


def test_menu_contents_depend_on_kind_dtype_and_isas():
    ids = lambda w, isas: {m.id for m in cpu_menu(w, isas)}  # noqa: E731
    all_isas = list(ISA_ORDER)
    gemm_bf16 = ids(small("gemm", "bf16"), all_isas)
    assert {"vectorize", "wider_vectors", "parallelize", "dynamic_schedule", "block_rows", "unroll_k", "prefetch",
            "bf16_split", "bf16_dot", "stream_spans"} <= gemm_bf16
    assert "register_tile" not in gemm_bf16 and "register_tile" in ids(small("gemm_m3_odd"), all_isas)
    assert "fuse_epilogue" not in gemm_bf16 and "online_softmax" not in gemm_bf16
    assert "fuse_epilogue" in ids(small("mlp"), all_isas)
    gemm_fp32 = ids(small("gemm", "fp32"), all_isas)
    assert "bf16_split" not in gemm_fp32 and "bf16_dot" not in gemm_fp32
    assert "vectorize" not in ids(small("gemm"), ["scalar"])
    assert "wider_vectors" not in ids(small("gemm"), ["scalar", "avx2"])
    decode, prefill = ids(small("decode"), all_isas), ids(small("prefill"), all_isas)
    assert {"online_softmax", "kv_block", "gqa_share", "vec_softmax", "prefetch"} <= decode and "q_block" not in decode
    assert {"q_block", "vec_softmax"} <= prefill and "vec_softmax" not in ids(small("decode"), ["scalar"])
    assert "mm_tiles" in prefill and "mm_tiles" not in decode and "mm_tiles" not in ids(small("prefill"), ["scalar"])
    assert ids(small("rmsnorm"), ["scalar", "avx2"]) == {"vectorize", "parallelize", "dynamic_schedule", "unroll_k"}


def test_applicability_tracks_knobs():
    w = small("gemm")
    items = {m.id: m for m in cpu_menu(w, ["scalar", "avx2"])}
    naive = codegen.legalize(w, {}, ["scalar", "avx2"])
    assert items["vectorize"].applies(naive) and not items["prefetch"].applies(naive)
    vec = {**naive, "isa": "avx2"}
    assert not items["vectorize"].applies(vec) and items["prefetch"].applies(vec) and items["bf16_split"].applies(vec)
    assert not items["bf16_split"].applies({**vec, "bf16_split": True})
    assert not items["parallelize"].applies({**vec, "threads": "static"})


def _stream_spans(w):
    return next(m for m in cpu_menu(w, list(ISA_ORDER)) if m.id == "stream_spans")


def test_stream_spans_keeps_the_accumulators_within_the_registers():
    w = make_workload("gemm", "bf16", m=1, n=2048, k=2048)
    knobs = codegen.legalize(w, {"isa": "avx512bf16", "rows": 8, "threads": "dynamic", "chunk": 16}, list(ISA_ORDER))
    assert not _stream_spans(w).applies({**knobs, "isa": "scalar"})
    for seed in range(20):
        new = _stream_spans(w).apply(dict(knobs), random.Random(seed))
        assert new["spans"] != 1 and new["spans"] * new["rows"] * new["unroll"] <= codegen.MAX_ACCUMULATORS
        assert new["rows"] == min(8, codegen.MAX_ACCUMULATORS // new["spans"])  # as many rows as still fit
        assert codegen.legalize(w, new, list(ISA_ORDER)) == new
    few = make_workload("gemm", "bf16", m=1, n=3, k=64)  # 3 output rows: 2 spans of one row at most
    few_knobs = codegen.legalize(few, {"isa": "avx512bf16"}, list(ISA_ORDER))
    assert {_stream_spans(few).apply(dict(few_knobs), random.Random(s))["spans"] for s in range(20)} == {2}


def test_register_tile_fits_the_activation_rows_and_the_registers():
    w = make_workload("gemm", "bf16", m=64, n=2048, k=2048)
    item = next(m for m in cpu_menu(w, list(ISA_ORDER)) if m.id == "register_tile")
    knobs = codegen.legalize(w, {"isa": "avx2", "rows": 8, "unroll": 2, "spans": 2, "threads": "static"},
                             list(ISA_ORDER))
    assert knobs["spans"] == 1 and knobs["m_tile"] == 1  # 8 rows x 2 spans x 2 unrolled: 32 accumulators
    drawn = set()
    for seed in range(30):
        new = item.apply(dict(knobs), random.Random(seed))
        drawn.add(new["m_tile"])
        assert new["m_tile"] * new["rows"] * new["unroll"] <= codegen.MAX_ACCUMULATORS and new["spans"] == 1
        assert new["rows"] == max(r for r in (1, 2, 4, 8) if r * new["m_tile"] * new["unroll"] <= 16)
        assert codegen.legalize(w, new, list(ISA_ORDER)) == new
    assert drawn == {2, 3, 4, 6, 8}
    three = make_workload("gemm", "bf16", m=3, n=64, k=64)  # no tile higher than the 3 activation rows
    item3 = next(m for m in cpu_menu(three, list(ISA_ORDER)) if m.id == "register_tile")
    assert {item3.apply(dict(knobs), random.Random(s))["m_tile"] for s in range(20)} == {2, 3}
    spans = next(m for m in cpu_menu(w, list(ISA_ORDER)) if m.id == "stream_spans")
    assert spans.apply({**knobs, "m_tile": 4, "rows": 4}, random.Random(0))["m_tile"] == 1


def test_pack_panels_fits_the_registers_and_ends_the_dot_product_items():
    w = make_workload("gemm", "bf16", m=64, n=2048, k=2048)
    isas = list(ISA_ORDER)
    items = {m.id: m for m in cpu_menu(w, isas)}
    knobs = codegen.legalize(w, {"isa": "avx2", "threads": "dynamic", "chunk": 4, "m_tile": 3, "rows": 2}, isas)
    dot_items = ("block_rows", "unroll_k", "stream_spans", "prefetch", "register_tile", "bf16_split", "bf16_dot")
    assert all(items[i].applies(knobs) for i in dot_items) and not items["panel_shape"].applies(knobs)
    drawn = set()
    for seed in range(60):
        new = codegen.legalize(w, items["pack_panels"].apply(dict(knobs), random.Random(seed)), isas)
        # the most FMAs per load with a register spare (12 for 8 loads), whatever the draw
        assert (new["pack"], new["pack_rows"]) == (2, 6)
        assert (new["m_tile"], new["rows"], new["isa"]) == (1, 1, "avx2")
        assert not any(items[i].applies(new) for i in (*dot_items, "pack_panels"))
        assert items["panel_shape"].applies(new)
        reshaped = codegen.legalize(w, items["panel_shape"].apply(dict(new), random.Random(seed)), isas)
        assert (reshaped["pack"], reshaped["pack_rows"]) != (new["pack"], new["pack_rows"]) and reshaped["pack"]
        drawn.add((reshaped["pack"], reshaped["pack_rows"]))
        assert reshaped["pack"] * reshaped["pack_rows"] + reshaped["pack"] + 1 <= 16  # AVX2's 16 vector registers
    assert (3, 4) in drawn and (4, 2) in drawn and (4, 3) not in drawn and (2, 8) not in drawn
    three = make_workload("gemm", "bf16", m=3, n=5, k=64)  # one vector holds the 3 rows; 5 weight rows at most
    item3 = next(m for m in cpu_menu(three, isas) if m.id == "pack_panels")
    opts = {tuple(item3.apply(dict(knobs), random.Random(s))[n] for n in ("pack", "pack_rows")) for s in range(40)}
    assert opts == {(1, 4)}
    # AVX-512's 32 registers: 4 x 6 (24 FMAs for 10 loads), where the activation rows fill 4 vectors
    wide = codegen.legalize(w, {"isa": "avx512", "threads": "static"}, isas)
    assert tuple(items["pack_panels"].apply(dict(wide), random.Random(0))[n] for n in ("pack", "pack_rows")) == (4, 6)
    assert "pack_panels" not in {m.id for m in cpu_menu(small("gemm"), isas)}  # one activation row
    assert "pack_panels" not in {m.id for m in cpu_menu(small("gemm_m3_odd"), ["scalar"])}


def test_vectorize_draws_from_host_simd_isas():
    w = small("gemm", "fp32")
    item = next(m for m in cpu_menu(w, list(ISA_ORDER)) if m.id == "vectorize")
    naive = codegen.legalize(w, {}, list(ISA_ORDER))
    drawn = {item.apply(dict(naive), random.Random(s))["isa"] for s in range(40)}
    assert drawn == {"avx2", "avx512"}  # never scalar, never avx512bf16 for fp32


@pytest.mark.parametrize("kind, bf16_dot", [("gemm", True), ("mlp", True), ("decode", False), ("rmsnorm", False)])
def test_avx512bf16_is_offered_only_where_it_changes_the_kernel(kind, bf16_dot):
    """AVX512-BF16 adds bf16 dot products, which only the GEMV family calls: elsewhere it would be the
    AVX-512 kernel under another name, searched twice."""
    w = small(kind, "bf16")
    items = {m.id: m for m in cpu_menu(w, list(ISA_ORDER))}
    naive = codegen.legalize(w, {}, list(ISA_ORDER))
    drawn = {items["vectorize"].apply(dict(naive), random.Random(s))["isa"] for s in range(60)}
    widened = {items["wider_vectors"].apply({**naive, "isa": "avx2"}, random.Random(s))["isa"] for s in range(30)}
    assert ("avx512bf16" in drawn) == ("avx512bf16" in widened) == bf16_dot
    assert codegen.legalize(w, {"isa": "avx512bf16"}, list(ISA_ORDER))["isa"] == ("avx512bf16" if bf16_dot else "avx512")


def test_menu_text_lists_every_item():
    items = cpu_menu(small("mlp"), supported_isas())
    text = menu_text(items)
    assert len(text.splitlines()) == len(items)
    for m in items:
        assert f"[{m.id}] {m.title}:" in text


def test_mm_tiles_follows_the_vectorised_softmax_and_ends_kv_prefetch():
    w = small("prefill")
    isas = supported_isas()
    items = {m.id: m for m in cpu_menu(w, isas)}
    if "mm_tiles" not in items:
        pytest.skip("no SIMD ISA on this host")
    vec = codegen.legalize(w, {"isa": isas[-1], "vec_softmax": True, "prefetch": 1024}, isas)
    assert items["mm_tiles"].applies(vec) and items["prefetch"].applies(vec)
    assert not items["mm_tiles"].applies({**vec, "vec_softmax": False})
    tiled = codegen.legalize(w, items["mm_tiles"].apply(dict(vec), random.Random(0)), isas)
    assert tiled["mm_tiles"] and tiled["q_block"] >= 4 and tiled["prefetch"] == 0
    assert not items["mm_tiles"].applies(tiled) and not items["prefetch"].applies(tiled)


def test_amx_tiles_are_offered_for_a_bf16_prefill_on_an_amx_host_only():
    def ids(w, isas):
        return {m.id for m in cpu_menu(w, isas)}

    pre = make_workload("attention", "bf16", phase="prefill", heads=4, kv_heads=2, head_dim=64, seq_len=40)
    full = list(ISA_ORDER)
    items = {m.id: m for m in cpu_menu(pre, full)}
    assert "amx_tiles" in items and "amx_tiles" not in ids(pre, full[:-1])
    assert "amx_tiles" not in ids(make_workload("attention", "fp32", phase="prefill", heads=4, kv_heads=2,
                                                head_dim=64, seq_len=40), full)
    amx = codegen.legalize(pre, items["amx_tiles"].apply(codegen.legalize(pre, {}, full), random.Random(0)), full)
    assert amx["isa"] == "amx"
    # what the AMX kernel fixes is not offered again (each would be a draw that changes nothing)
    assert [m.id for m in items.values() if m.applies(amx) and codegen.legalize(pre, m.apply(dict(amx), random.Random(1)),
                                                                                  full) == amx] == []
