"""CPU code generation (targets/cpu/codegen.py, isa.py, compiler.py, runtime.py).

Every kind x dtype x host ISA x schedule variant is compiled once (in parallel, by a session
fixture) and run in-process through CpuKernel against the float reference.
"""
from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from autocomp_compile.evaluation.checks import compare
from autocomp_compile.references import InputFactory, get_kind
from autocomp_compile.targets.cpu import codegen
from autocomp_compile.targets.cpu import compiler as compiler_mod
from autocomp_compile.targets.cpu.compiler import build
from autocomp_compile.targets.cpu.isa import (
    ISA_ORDER, VECTOR_EXP, VECTOR_WIDTH, best_isa, cpu_flags, prelude, supported_isas,
)
from autocomp_compile.targets.cpu.runtime import CpuKernel, KernelLoadError
from autocomp_compile.targets.cpu.target import CpuTarget
from autocomp_compile.workload import make_workload
from tests.helpers import build_ok, check_against_reference, run_kernel, small

HOST_ISAS = supported_isas()

# Schedule variants per family. Prefetch is only combined with vector ISAs: the menu never
# proposes it for scalar code (legalize drops it for scalar code).
VARIANTS: dict[str, dict[str, dict]] = {
    "gemv": {
        "naive": {},
        "rows4_unroll2_prefetch_static": dict(rows=4, unroll=2, prefetch=256, threads="static"),
        "rows8_unroll4_dynamic4": dict(rows=8, unroll=4, prefetch=1024, threads="dynamic", chunk=4),
        "rows2_split": dict(rows=2, unroll=2, bf16_split=True),
        "fused_rows4_static": dict(fuse=True, rows=4, threads="static"),
        "fused_split_unroll4_dynamic": dict(fuse=True, bf16_split=True, unroll=4, threads="dynamic", chunk=1),
        "spans4_rows2_prefetch_dynamic": dict(spans=4, rows=2, prefetch=512, threads="dynamic", chunk=1),
        "spans8_unroll2_split_static": dict(spans=8, unroll=2, bf16_split=True, threads="static"),
        "fused_spans2_rows4_serial": dict(fuse=True, spans=2, rows=4),
        "mtile2_rows4_unroll2_prefetch_static": dict(m_tile=2, rows=4, unroll=2, prefetch=256, threads="static"),
        "mtile3_rows2_split_dynamic": dict(m_tile=3, rows=2, bf16_split=True, threads="dynamic", chunk=1),
        "fused_mtile2_rows8_serial": dict(fuse=True, m_tile=2, rows=8),
        "pack1_rows6_dynamic": dict(pack=1, pack_rows=6, threads="dynamic", chunk=1),
        "pack2_rows3_static": dict(pack=2, pack_rows=3, threads="static"),
        "pack1_rows12_serial": dict(pack=1, pack_rows=12),
        "fused_pack2_rows4_dynamic": dict(fuse=True, pack=2, pack_rows=4, threads="dynamic", chunk=4),
    },
    "rmsnorm": {
        "naive": {},
        "unroll2_static": dict(unroll=2, threads="static"),
        "unroll4_dynamic": dict(unroll=4, threads="dynamic", chunk=1),
    },
    "attention": {
        "two_pass": {},
        "online_kv16": dict(online=True, kv_block=16),
        "online_kv32_gqa_static": dict(online=True, kv_block=32, gqa_share=True, threads="static"),
        "two_pass_gqa_qblock4_dynamic": dict(gqa_share=True, q_block=4, threads="dynamic", chunk=2),
        "online_kv16_qblock8_gqa": dict(online=True, kv_block=16, q_block=8, gqa_share=True),
        "online_kv256_noshare_qblock2": dict(online=True, kv_block=256, q_block=2, threads="static", chunk=1),
        "vec_softmax_kv16_gqa_static": dict(vec_softmax=True, kv_block=16, gqa_share=True, threads="static"),
        "vec_softmax_kv32_prefetch": dict(vec_softmax=True, kv_block=32, prefetch=1024, threads="dynamic", chunk=1),
        "vec_softmax_kv16_qblock4_gqa": dict(vec_softmax=True, kv_block=16, q_block=4, gqa_share=True, threads="static"),
        "vec_softmax_kv64_qblock8": dict(vec_softmax=True, q_block=8),
        "vec_softmax_kv256_noshare": dict(vec_softmax=True, kv_block=256),
        "mm_tiles_kv16_qblock4_gqa": dict(vec_softmax=True, mm_tiles=True, kv_block=16, q_block=4, gqa_share=True,
                                          threads="static"),
        "mm_tiles_kv32_qblock8_dynamic": dict(vec_softmax=True, mm_tiles=True, kv_block=32, q_block=8,
                                              threads="dynamic", chunk=1),
        "mm_tiles_kv256_qblock2": dict(vec_softmax=True, mm_tiles=True, kv_block=256, q_block=2),
    },
}
WORKLOADS = ["gemm", "gemm_m3_odd", "gemm_m19_odd", "lm_head_small", "mlp", "mlp_b2_odd", "mlp_b11_odd", "rmsnorm",
             "decode", "prefill"]
# Workloads with more activation rows than one vector: only the schedules that tile activation rows run on them.
MANY_ROWS = ("gemm_m19_odd", "mlp_b11_odd")


def _skip_variant(wname: str, variant: str, isa: str) -> bool:
    if "pack" in variant and isa == "scalar":
        return True  # packed panels are vector code (legalize drops them for scalar code)
    if "fused" in variant and small(wname).kind != "mlp":
        return True  # fuse is an MLP-only knob (legalize drops it elsewhere: same code as another variant)
    if ("qblock" in variant or "mm_tiles" in variant) and wname == "decode":
        return True  # decode forces q_block=1; mm_tiles is a prefill schedule
    if ("mtile" in variant or "pack" in variant) and codegen.activation_rows(small(wname)) == 1:
        return True  # register tiles and packed panels need several activation rows (legalize drops them)
    if wname in MANY_ROWS and not ("mtile" in variant or "pack" in variant or variant == "naive"):
        return True
    return False


def _knobs(wname: str, dtype: str, isa: str, variant: str) -> dict:
    w = small(wname, dtype)
    v = dict(VARIANTS[codegen.family(w.kind)][variant])
    if isa == "scalar":
        v.pop("prefetch", None)
    return codegen.legalize(w, {**v, "isa": isa}, HOST_ISAS)


CASES = [
    pytest.param(wname, dtype, isa, variant, id=f"{wname}-{dtype}-{isa}-{variant}")
    for wname in WORKLOADS
    for dtype in ("bf16", "fp32")
    for isa in HOST_ISAS
    for variant in VARIANTS[codegen.family(small(wname).kind)]
    if not _skip_variant(wname, variant, isa) and isa != "amx"  # AMX: its own tests (head_dim a multiple of 32)
]


@pytest.fixture(scope="session")
def built_matrix(tmp_path_factory):
    """All matrix kernels, compiled two at a time.

    Slow by necessity (~30 s on 2 cores, charged to the first matrix test's setup): ~150 gcc -O3
    builds, one per kind x dtype x host ISA x schedule variant. Each test then only loads and runs.
    """
    build_dir = tmp_path_factory.mktemp("codegen_build")
    keys = [tuple(p.values) for p in CASES]

    def one(key):
        wname, dtype, isa, variant = key
        w = small(wname, dtype)
        knobs = _knobs(wname, dtype, isa, variant)
        code = codegen.generate(w, knobs)
        return key, (w, knobs, code, build(code, knobs["isa"], build_dir))

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, keys))


@pytest.mark.parametrize("wname, dtype, isa, variant", CASES)
def test_generated_kernel_matches_reference(built_matrix, wname, dtype, isa, variant):
    w, knobs, code, res = built_matrix[(wname, dtype, isa, variant)]
    assert res.ok, res.log
    # vdpbf16ps needs bf16 operands and serves only the GEMV family: other kernels on an AVX512-BF16 host
    # are the plain AVX-512 ones.
    # Packed panels multiply fp32 panels: on an AVX512-BF16 host they are the AVX-512 kernel.
    assert knobs["isa"] == (isa if codegen.isa_applies(isa, w) and not (isa == "avx512bf16" and knobs["pack"]) else "avx512")
    assert (knobs["isa"] == "avx512bf16") == (isa == "avx512bf16" and dtype == "bf16" and codegen.family(w.kind) == "gemv"
                                              and not knobs["pack"])
    check_against_reference(res.so_path, w, seed=11, sets=2)


@pytest.mark.parametrize("wname", WORKLOADS)
@pytest.mark.parametrize("isa", HOST_ISAS)
def test_variants_generate_distinct_code(wname, isa):
    """Each schedule variant must really change the kernel (otherwise the matrix tests nothing)."""
    codes = {}
    for variant in VARIANTS[codegen.family(small(wname).kind)]:
        if _skip_variant(wname, variant, isa):
            continue
        code = codegen.generate(small(wname), _knobs(wname, "bf16", isa, variant))
        codes.setdefault(code, []).append(variant)
    dupes = [v for v in codes.values() if len(v) > 1]
    assert not dupes


def test_generated_code_reflects_knobs():
    w = small("gemm")
    naive = codegen.generate(w, codegen.legalize(w, {}, HOST_ISAS))
    assert "#pragma omp" not in naive and "immintrin" not in naive
    assert "void autocomp_kernel(void **t, const int64_t *dims)" in naive
    dyn = codegen.generate(w, codegen.legalize(w, dict(threads="dynamic", chunk=16), HOST_ISAS))
    assert "schedule(dynamic, 16)" in dyn and "#pragma omp parallel" in dyn
    static = codegen.generate(w, codegen.legalize(w, dict(threads="static"), HOST_ISAS))
    assert "schedule(static)" in static
    if "avx2" in HOST_ISAS:
        v = codegen.generate(w, codegen.legalize(w, dict(isa="avx2", rows=4, unroll=2, prefetch=512), HOST_ISAS))
        assert "_mm256_fmadd_ps" in v and "#define ROWS 4" in v and v.count("_mm_prefetch") >= 4
        assert "+ 512, _MM_HINT_T0" in v
    attn = small("prefill")
    online = codegen.generate(attn, codegen.legalize(attn, dict(online=True, kv_block=32, q_block=4), HOST_ISAS))
    assert "#define KV_BLOCK 32" in online and "#define QB 4" in online and "expf(m[r] - mn)" in online
    two = codegen.generate(attn, codegen.legalize(attn, dict(gqa_share=True), HOST_ISAS))
    assert "#define HPT 2" in two and "malloc" in two


def test_decode_kernel_uses_runtime_kv_len(tmp_path):
    """dims[0] is the KV length: a kernel built for kv_len=37 must be right for kv_len=20 too."""
    w37 = small("decode", "fp32")
    knobs = codegen.legalize(w37, dict(online=True, kv_block=16, isa=best_isa()), HOST_ISAS)
    res = build_ok(codegen.generate(w37, knobs), knobs["isa"], tmp_path)
    w20 = make_workload("attention", "fp32", heads=4, kv_heads=2, head_dim=16, kv_len=20, max_kv_len=64)
    assert codegen.generate(w20, knobs).replace("kv_len20", "kv_len37") == codegen.generate(w37, knobs)
    kernel = CpuKernel(res.so_path, len(w37.tensors))
    inputs = InputFactory(5).inputs(w20)
    out = run_kernel(kernel, w20, inputs)["out"]
    spec = get_kind("attention")
    ref20 = spec.reference(inputs, w20.params, w20.runtime_dims)["out"]
    ref37 = spec.reference(inputs, w37.params, w37.runtime_dims)["out"]
    assert compare("out", out, ref20).ok
    assert not compare("out", out, ref37).ok


# ---------------------------------------------------------------- AVX-512: compile only


def _avx512_cases():
    out = []
    for wname in ["gemm", "lm_head_small", "mlp_b2_odd", "rmsnorm", "decode", "prefill"]:
        fam = codegen.family(small(wname).kind)
        for dtype in ("bf16", "fp32"):
            for isa in ("avx512", "avx512bf16"):
                if isa == "avx512bf16" and (dtype == "fp32" or fam != "gemv"):
                    continue  # legalize makes it avx512 (tests/agents/test_menu.py)
                variant = {
                    "gemv": dict(rows=4, unroll=2, prefetch=512, threads="static", fuse=True,
                                 bf16_split=(isa == "avx512" and dtype == "bf16")),
                    "rmsnorm": dict(unroll=4, threads="dynamic", chunk=1),
                    "attention": dict(online=True, kv_block=32, gqa_share=True, q_block=2),
                }[fam]
                out.append(pytest.param(wname, dtype, isa, variant, id=f"{wname}-{dtype}-{isa}"))
    for dtype in ("bf16", "fp32"):  # a packed-panel tile of 2 x 12 accumulators: AVX-512's 32 registers
        out.append(pytest.param("mlp_b11_odd", dtype, "avx512", dict(pack=2, pack_rows=12, fuse=True, threads="static"),
                                id=f"mlp_b11_odd-{dtype}-avx512-pack2_rows12"))
    return out


@pytest.mark.parametrize("wname, dtype, isa, variant", _avx512_cases())
def test_avx512_variants_compile(tmp_path, wname, dtype, isa, variant):
    """AVX-512 kernels cannot run on an AVX2-only host, but they must compile (ISA flags are forced)."""
    w = small(wname, dtype)
    knobs = codegen.legalize(w, {**variant, "isa": isa}, list(ISA_ORDER))
    assert knobs["isa"] == isa
    code = codegen.generate(w, knobs)
    assert "_mm512_" in code
    if isa == "avx512bf16" and codegen.family(w.kind) == "gemv":
        assert "_mm512_dpbf16_ps" in code
    res = build(code, isa, tmp_path)
    assert res.ok, res.log
    assert res.so_path.exists()
    if set(["avx512f", "avx512bw", "avx512vl"]) | ({"avx512_bf16"} if isa == "avx512bf16" else set()) <= cpu_flags():
        check_against_reference(res.so_path, w, sets=1)  # only on hosts that can run it


# ---------------------------------------------------------------- legalize


def test_legalize_fills_missing_and_drops_unknown_knobs():
    w = small("gemm")
    k = codegen.legalize(w, {"rows": 4, "bogus": 1}, HOST_ISAS)
    assert "bogus" not in k
    assert set(k) == set(codegen.NAIVE_KNOBS["gemv"])
    assert k["rows"] == 4 and k["unroll"] == 1 and k["threads"] == "serial"
    a = small("decode")
    ka = codegen.legalize(a, {}, HOST_ISAS)
    assert set(ka) == set(codegen.NAIVE_KNOBS["attention"]) and ka["isa"] == "scalar"


@pytest.mark.parametrize(
    "knob, value, expected",
    [
        ("rows", 3, 2), ("rows", 100, 8), ("rows", 0, 1), ("rows", -4, 1),
        ("unroll", 3, 2), ("unroll", 99, 4),
        ("prefetch", -5, 0), ("prefetch", 300, 256), ("prefetch", 10**6, 8192), ("prefetch_hint", "l3", "t0"),
        ("chunk", 1000, 64), ("chunk", 3, 4),
        ("threads", "many", "serial"), ("threads", None, "serial"),
    ],
)
def test_legalize_clamps_gemv_knobs(knob, value, expected):
    w = small("gemm")
    isa = HOST_ISAS[-1]
    if knob == "prefetch" and isa == "scalar":
        expected = 0  # scalar kernels never prefetch
    knobs = {"isa": isa, "threads": "dynamic", "prefetch": 256, knob: value}  # where chunk and the hint matter
    assert codegen.legalize(w, knobs, HOST_ISAS)[knob] == expected


def test_knobs_a_kernel_does_not_read_are_reset_so_one_kernel_has_one_source():
    w = small("gemm")
    isa = HOST_ISAS[-1]
    serial = codegen.legalize(w, {"isa": isa, "threads": "serial", "chunk": 16}, HOST_ISAS)
    assert serial["chunk"] == 0
    assert codegen.generate(w, serial) == codegen.generate(w, codegen.legalize(w, {"isa": isa}, HOST_ISAS))
    no_prefetch = codegen.legalize(w, {"isa": isa, "prefetch": 0, "prefetch_hint": "nta"}, HOST_ISAS)
    assert no_prefetch["prefetch_hint"] == "t0"
    prefill = make_workload("attention", "bf16", phase="prefill", batch=1, heads=4, kv_heads=2, head_dim=64,
                            seq_len=32)
    amx = codegen.legalize(prefill, {"isa": "amx", "vec_softmax": True, "prefetch": 4096}, ["scalar", "amx"])
    assert amx["isa"] == "amx" and amx["prefetch"] == 0  # the AMX kernel never prefetches


def test_legalize_clamps_rows_to_output_rows():
    w = make_workload("gemm", "bf16", m=1, n=3, k=32)
    assert codegen.legalize(w, {"rows": 8}, HOST_ISAS)["rows"] == 2
    w1 = make_workload("gemm", "bf16", m=1, n=1, k=32)
    assert codegen.legalize(w1, {"rows": 4}, HOST_ISAS)["rows"] == 1


def test_legalize_keeps_spans_within_the_registers_and_the_output_rows():
    big = make_workload("gemm", "bf16", m=1, n=2048, k=2048)
    assert codegen.legalize(big, {"spans": 8, "rows": 2}, HOST_ISAS)["spans"] == 8
    assert codegen.legalize(big, {"spans": 8, "rows": 8}, HOST_ISAS)["spans"] == 2  # 16 accumulators at most
    assert codegen.legalize(big, {"spans": 4, "rows": 8, "unroll": 2}, HOST_ISAS)["spans"] == 1
    assert codegen.legalize(big, {"spans": 3}, HOST_ISAS)["spans"] == 2  # snapped to a choice
    few = make_workload("gemm", "bf16", m=1, n=12, k=32)
    assert codegen.legalize(few, {"spans": 16, "rows": 2}, HOST_ISAS)["spans"] == 4  # a block of rows in each span


def test_legalize_keeps_the_register_tile_within_the_activation_rows_and_the_registers():
    prompt = make_workload("gemm", "bf16", m=64, n=2048, k=2048)
    assert codegen.legalize(prompt, {"m_tile": 6, "rows": 2}, HOST_ISAS)["m_tile"] == 6
    assert codegen.legalize(prompt, {"m_tile": 8, "rows": 4}, HOST_ISAS)["m_tile"] == 4  # 16 accumulators at most
    assert codegen.legalize(prompt, {"m_tile": 5, "rows": 2}, HOST_ISAS)["m_tile"] == 4  # snapped to a choice
    assert codegen.legalize(prompt, {"m_tile": 2, "rows": 8, "unroll": 4}, HOST_ISAS)["m_tile"] == 1
    tiled = codegen.legalize(prompt, {"m_tile": 2, "spans": 4, "rows": 2}, HOST_ISAS)
    assert (tiled["m_tile"], tiled["spans"]) == (2, 1)  # a tile reads its weight rows once for all its rows
    assert codegen.legalize(make_workload("gemm", "bf16", m=3, n=64, k=64), {"m_tile": 8}, HOST_ISAS)["m_tile"] == 3
    assert codegen.legalize(small("lm_head_small"), {"m_tile": 4}, HOST_ISAS)["m_tile"] == 1  # one activation row
    assert codegen.legalize(small("mlp_b2_odd"), {"m_tile": 4}, HOST_ISAS)["m_tile"] == 2


def test_legalize_fits_packed_panels_to_the_registers_and_resets_the_dot_product_knobs():
    prompt, avx2, every = make_workload("gemm", "bf16", m=64, n=2048, k=2048), ["scalar", "avx2"], list(ISA_ORDER)
    k = codegen.legalize(prompt, {"isa": "avx2", "pack": 2, "pack_rows": 6, "rows": 4, "unroll": 2, "m_tile": 3,
                                  "prefetch": 512, "prefetch_hint": "nta", "bf16_split": True, "spans": 2}, avx2)
    assert (k["pack"], k["pack_rows"], k["prefetch_hint"]) == (2, 6, "t0")
    assert all(k[name] == value for name, value in codegen.PACKED_RESETS.items())
    fit = lambda isa, pack, rows: codegen.legalize(  # noqa: E731
        prompt, {"isa": isa, "pack": pack, "pack_rows": rows}, every)
    assert (fit("avx2", 4, 12)["pack"], fit("avx2", 4, 12)["pack_rows"]) == (4, 2)  # 4 x 2 + 4 + 1 <= 16
    assert (fit("avx512", 4, 12)["pack"], fit("avx512", 4, 12)["pack_rows"]) == (4, 6)  # 4 x 6 + 4 + 1 <= 32
    assert fit("avx512bf16", 2, 12)["isa"] == "avx512"  # fp32 panels: vdpbf16ps has nothing to do
    assert codegen.legalize(prompt, {"pack": 2, "pack_rows": 6}, avx2) == codegen.legalize(prompt, {}, avx2)
    assert codegen.legalize(prompt, {"isa": "avx2", "pack": 0, "pack_rows": 6}, avx2)["pack_rows"] == 1
    assert codegen.legalize(small("gemm"), {"isa": "avx2", "pack": 1}, avx2)["pack"] == 0  # one activation row
    few = make_workload("gemm", "bf16", m=8, n=5, k=32)
    assert codegen.legalize(few, {"isa": "avx2", "pack": 1, "pack_rows": 12}, avx2)["pack_rows"] == 4


def test_packed_panels_broadcast_weights_against_blocks_of_activation_rows():
    w = make_workload("gemm", "bf16", m=19, n=29, k=70)
    code = codegen.generate(w, codegen.legalize(w, {"isa": "avx2", "pack": 2, "pack_rows": 3}, ["scalar", "avx2"]))
    assert "#define NR 3" in code and "#define MTW (2 * VW)" in code
    assert "{ const vf b = v_set1(panel[2 * K + k]); a2_0 = v_fma(b, x0, a2_0); a2_1 = v_fma(b, x1, a2_1); }" in code
    assert "float *xv = (float *)calloc(PADDED(M) * K, sizeof(float));" in code  # 19 rows: 2 blocks of 16, zeroed
    assert "panel_tile(p_w, xv + m0 * K, K, res);" in code and "pack_panel(w, K, n0, N, p_w);" in code
    assert "dot_rows" not in code and "block_tile" not in code


def test_register_tile_loads_each_weight_vector_once_for_the_tile_and_leaves_a_tail():
    w = make_workload("gemm", "bf16", m=7, n=37, k=83)
    code = codegen.generate(w, codegen.legalize(w, {"m_tile": 3, "rows": 2, "isa": HOST_ISAS[-1]}, HOST_ISAS))
    assert "#define MT 3" in code and "block_tile(w, K, xv + m0 * K, n0, N, res);" in code
    assert code.count("w_load(w + 1 * ldw + k + 0 * VK)") == 2  # row 1, once in the unrolled and the tail loop
    assert "a1_2_0 = w_dot(a1_2_0, w1, x + 2 * ldx + k + 0 * VK);" in code  # row 1 x activation row 2
    assert "for (int64_t m = M / MT * MT; m < M; ++m)" in code  # 7 = 2 tiles of 3 + 1 row
    plain = codegen.generate(w, codegen.legalize(w, {"rows": 2, "isa": HOST_ISAS[-1]}, HOST_ISAS))
    assert "block_tile" not in plain and "MT" not in plain


def test_spans_take_rows_from_distant_parts_of_the_matrix_and_leave_a_tail():
    w = make_workload("gemm", "bf16", m=1, n=1000, k=64)
    code = codegen.generate(w, codegen.legalize(w, {"spans": 4, "rows": 2, "isa": HOST_ISAS[-1]}, HOST_ISAS))
    assert "#define SPANS 4" in code and "(3 * span + 1) * ldw" in code  # row 1 of the 4th span
    assert "const int64_t span_w = N / (SPANS * ROWS) * ROWS;" in code  # 124 rows per span, 4 left for the tail
    assert "for (int64_t nb = SPANS * span_w / ROWS;" in code
    plain = codegen.generate(w, codegen.legalize(w, {"rows": 2, "isa": HOST_ISAS[-1]}, HOST_ISAS))
    assert "dot_spans" not in plain and "SPANS" not in plain


def test_legalize_kind_specific_knobs():
    gemm, mlp = small("gemm"), small("mlp")
    assert codegen.legalize(gemm, {"fuse": True}, HOST_ISAS)["fuse"] is False
    assert codegen.legalize(mlp, {"fuse": 1}, HOST_ISAS)["fuse"] is True
    fp32 = small("gemm", "fp32")
    assert codegen.legalize(fp32, {"bf16_split": True, "isa": "avx2"}, ["scalar", "avx2"])["bf16_split"] is False
    assert codegen.legalize(gemm, {"bf16_split": True, "isa": "scalar"}, ["scalar", "avx2"])["bf16_split"] is False
    assert codegen.legalize(gemm, {"bf16_split": True, "isa": "avx2"}, ["scalar", "avx2"])["bf16_split"] is True
    full = list(ISA_ORDER)
    assert codegen.legalize(gemm, {"bf16_split": True, "isa": "avx512bf16"}, full)["bf16_split"] is False
    dec, pre = small("decode"), small("prefill")
    assert codegen.legalize(dec, {"q_block": 8}, HOST_ISAS)["q_block"] == 1
    assert codegen.legalize(pre, {"q_block": 8}, HOST_ISAS)["q_block"] == 8
    assert codegen.legalize(pre, {"q_block": 5}, HOST_ISAS)["q_block"] == 4
    assert codegen.legalize(pre, {"kv_block": 1000}, HOST_ISAS)["kv_block"] == 256
    assert codegen.legalize(pre, {"online": 1, "gqa_share": 0}, HOST_ISAS) == {
        **codegen.legalize(pre, {}, HOST_ISAS), "online": True, "gqa_share": False,
    }


def test_legalize_vec_softmax_only_for_rows_of_whole_vectors():
    dec, pre = small("decode"), small("prefill")
    on = codegen.legalize(dec, {"vec_softmax": 1, "online": False}, HOST_ISAS)
    assert on["vec_softmax"] is True and on["online"] is True  # an online softmax, whatever the knob said
    assert codegen.legalize(pre, {"vec_softmax": True}, HOST_ISAS)["vec_softmax"] is True  # causal rows too
    assert codegen.legalize(dec, {"prefetch": 2048, "online": True}, HOST_ISAS)["prefetch"] == 0  # vec_softmax's only
    if "avx2" in HOST_ISAS:
        knobs = codegen.legalize(dec, {"prefetch": 2000, "vec_softmax": True, "isa": "avx2"}, HOST_ISAS)
        assert knobs["prefetch"] == 2048 and "+ 2048 + b, _MM_HINT_T0" in codegen.generate(dec, knobs)
    odd = make_workload("attention", "bf16", phase="decode", heads=4, kv_heads=2, head_dim=24, kv_len=5, max_kv_len=8)
    assert codegen.legalize(odd, {"vec_softmax": True, "isa": "avx2"}, ["scalar", "avx2"])["vec_softmax"] is True
    assert codegen.legalize(odd, {"vec_softmax": True, "isa": "avx512"}, list(ISA_ORDER))["vec_softmax"] is False


def test_legalize_mm_tiles_only_for_a_vectorised_prefill():
    dec, pre = small("decode"), small("prefill")
    assert codegen.legalize(pre, {"mm_tiles": True}, HOST_ISAS)["mm_tiles"] is False  # needs vec_softmax
    assert codegen.legalize(dec, {"mm_tiles": True, "vec_softmax": True}, HOST_ISAS)["mm_tiles"] is False
    tiled = codegen.legalize(pre, {"mm_tiles": 1, "vec_softmax": True, "prefetch": 1024}, HOST_ISAS)
    assert tiled["mm_tiles"] is True and tiled["prefetch"] == 0  # K is transposed up front: no KV prefetch
    code = codegen.generate(pre, tiled)
    assert "transpose_k(" in code and "free(kt);" in code


@pytest.mark.parametrize("isa", HOST_ISAS)
def test_vector_exp_matches_expf(tmp_path, isa):
    """`v_exp` (the vectorised softmax's exp): relative error ~1e-7 over float's range, 0 far below it and for
    -inf (a masked score), +inf above it, NaN stays NaN."""
    code = prelude(isa, "bf16") + VECTOR_EXP[isa] + r"""
void autocomp_kernel(void **t, const int64_t *dims) {
  const float *x = (const float *)t[0]; float *y = (float *)t[1];
  for (int64_t i = 0; i + VW <= dims[0]; i += VW) v_store_f32(y + i, v_exp(v_load_f32(x + i)));
}
"""
    res = build(code, isa, tmp_path)
    assert res.ok, res.log
    x = torch.cat([torch.linspace(-90, 88.7, 4096), torch.tensor([-1e4, -float("inf"), float("nan"), -104.5, 0.0,
                                                                   89.0, 100.0, float("inf")] + [0.0] * 8)])
    y = torch.empty_like(x)
    CpuKernel(res.so_path, 2)([x, y], [x.numel()])
    ref = torch.exp(x.double())
    torch.testing.assert_close(y[:4096].double(), ref[:4096], rtol=3e-7, atol=1e-37)
    assert y[4096:4098].tolist() == [0.0, 0.0] and y[4098].isnan() and y[4099] == 0 and y[4100] == 1.0
    assert y[4101:4104].tolist() == [float("inf")] * 3  # above float's range, as expf


def test_legalize_drops_isas_the_host_lacks():
    w = small("gemm", "bf16")
    assert codegen.legalize(w, {"isa": "avx512"}, ["scalar", "avx2"])["isa"] == "avx2"
    assert codegen.legalize(w, {"isa": "avx512bf16"}, ["scalar", "avx2"])["isa"] == "avx2"
    assert codegen.legalize(w, {"isa": "avx2"}, ["scalar"])["isa"] == "scalar"
    assert codegen.legalize(w, {"isa": "neon"}, ["scalar", "avx2"])["isa"] == "avx2"
    # avx512bf16 needs bf16 operands even on a host that has it
    fp32 = small("gemm", "fp32")
    assert codegen.legalize(fp32, {"isa": "avx512bf16"}, list(ISA_ORDER))["isa"] == "avx512"
    assert codegen.legalize(w, {"isa": "avx512bf16"}, list(ISA_ORDER))["isa"] == "avx512bf16"
    # the real host: whatever legalize picks is something this host supports
    for isa in ISA_ORDER:
        assert codegen.legalize(w, {"isa": isa}, HOST_ISAS)["isa"] in HOST_ISAS


def test_legalize_is_idempotent():
    for wname in WORKLOADS:
        w = small(wname)
        for variant in VARIANTS[codegen.family(w.kind)].values():
            once = codegen.legalize(w, {**variant, "isa": "avx512", "rows": 3, "chunk": 7}, HOST_ISAS)
            assert codegen.legalize(w, once, HOST_ISAS) == once


def test_target_generate_legalizes(tmp_path):
    t = CpuTarget(["scalar"])
    w = small("gemm")
    code = t.generate(w, {"isa": "avx512", "rows": 3, "threads": "weird"})
    assert "immintrin" not in code and "#define ROWS 2" in code and "#pragma omp" not in code
    root = t.lower(w)
    assert root.id == "root" and root.knobs == codegen.legalize(w, codegen.naive_knobs(w), ["scalar"])
    assert root.code == codegen.generate(w, root.knobs)


def test_legalize_fallback_to_scalar_with_prefetch_compiles(tmp_path):
    w = small("gemm")
    knobs = codegen.legalize(w, {"isa": "avx2", "prefetch": 512}, ["scalar"])  # e.g. a reused schedule on a non-AVX host
    assert knobs["isa"] == "scalar"
    res = build(codegen.generate(w, knobs), knobs["isa"], tmp_path)
    assert res.ok, res.log


def test_legalize_normalises_float_knobs(tmp_path):
    w = small("gemm")
    knobs = codegen.legalize(w, {"rows": 2.0, "unroll": 2.0}, HOST_ISAS)
    build_ok(codegen.generate(w, knobs), knobs["isa"], tmp_path)


# ---------------------------------------------------------------- ISA helpers, prelude, runtime


def test_supported_isas_from_flags():
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("ISA detection is x86-only")
    assert supported_isas(frozenset()) == ["scalar"]
    assert supported_isas(frozenset({"avx2", "fma"})) == ["scalar", "avx2"]
    assert supported_isas(frozenset({"avx2"})) == ["scalar"]  # FMA is required too
    full = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16"})
    assert supported_isas(full) == list(ISA_ORDER[:-1])
    assert best_isa(full) == "avx512bf16"
    assert supported_isas(full | {"amx_tile", "amx_bf16"}) == list(ISA_ORDER)  # given flags: no OS question
    assert supported_isas(full | {"amx_tile"})[-1] == "avx512bf16"  # tiles without their bf16 products
    assert supported_isas(full - {"avx512_bf16"})[-1] == "avx512"
    host = supported_isas()
    assert host[0] == "scalar"
    if {"avx2", "fma"} <= cpu_flags():
        assert "avx2" in host
    if "avx512f" not in cpu_flags():
        assert "avx512" not in host and "avx512bf16" not in host


def test_prelude_rejects_bad_isa_and_dtype():
    with pytest.raises(ValueError, match="unknown ISA"):
        prelude("sse2", "bf16")
    with pytest.raises(ValueError, match="bf16"):
        prelude("avx512bf16", "fp32")
    assert "#define VW 8" in prelude("avx2", "fp32") and VECTOR_WIDTH["avx2"] == 8
    assert "#define VK 16" in prelude("avx2", "bf16", bf16_split=True)
    assert "#define VK 16" not in prelude("avx2", "fp32", bf16_split=True)  # split is bf16-only


def test_compile_error_is_reported(tmp_path):
    res = build("void autocomp_kernel(void **t, const int64_t *d) { undeclared_thing_42(); }", "scalar", tmp_path)
    assert not res.ok and res.so_path is None
    assert "int64_t" in res.log or "undeclared_thing_42" in res.log
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("*.tmp"))


def test_build_caches_identical_code(tmp_path):
    w = small("rmsnorm")
    code = codegen.generate(w, codegen.naive_knobs(w))
    first = build_ok(code, "scalar", tmp_path)
    assert first.seconds > 0
    second = build(code, "scalar", tmp_path)
    assert second.ok and second.so_path == first.so_path and second.seconds == 0.0
    other = build(code, best_isa(), tmp_path)  # different flags -> different object
    if best_isa() != "scalar":
        assert other.so_path != first.so_path


def test_concurrent_builds_of_identical_code_in_one_process(tmp_path, monkeypatch):
    """Deterministic version of the race: both compiler runs finish before either renames its output."""
    compiler_mod.compiler_version()  # cached before patching
    compiler_mod.precompiled_prelude("scalar", tmp_path)  # built before patching: the kernels' builds race alone
    real_run = compiler_mod.subprocess.run
    barrier = threading.Barrier(2, timeout=30)

    def run_then_wait(*a, **kw):
        out = real_run(*a, **kw)
        barrier.wait()
        return out

    monkeypatch.setattr(compiler_mod.subprocess, "run", run_then_wait)
    w = small("gemm", "fp32")
    code = codegen.generate(w, codegen.naive_knobs(w))
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(build, code, "scalar", tmp_path) for _ in range(2)]
        results = [f.result() for f in futures]
    assert all(r.ok for r in results)


def test_cpu_kernel_validates_arguments(tmp_path):
    w = small("rmsnorm", "fp32")
    res = build_ok(codegen.generate(w, codegen.naive_knobs(w)), "scalar", tmp_path)
    kernel = CpuKernel(res.so_path, len(w.tensors))
    inputs = InputFactory(0).inputs(w)
    out = torch.empty(3, 40)
    with pytest.raises(ValueError, match="takes 3 tensors"):
        kernel([inputs["x"], out])
    with pytest.raises(ValueError, match="contiguous"):
        kernel([inputs["x"].t().contiguous().t(), inputs["weight"], out])
    nolib = build_ok("int not_the_entry_point(void) { return 0; }", "scalar", tmp_path)
    with pytest.raises(KernelLoadError, match="autocomp_kernel"):
        CpuKernel(nolib.so_path, 3)
    with pytest.raises(KernelLoadError):
        CpuKernel(tmp_path / "missing.so", 3)


def test_header_names_schedule():
    w = small("mlp")
    knobs = codegen.legalize(w, dict(fuse=True), HOST_ISAS)
    code = codegen.generate(w, knobs)
    assert code.startswith(f"/* autocomp-compile {codegen.CODEGEN_VERSION}: {w.name}")
    assert re.search(r"\('fuse', True\)", code)


AMX_CASES = [  # (batch, heads, kv_heads, head_dim, seq_len, kv_block, threads)
    (1, 4, 2, 64, 19, 32, "static"), (2, 2, 1, 32, 70, 64, "dynamic"), (1, 3, 1, 96, 33, 128, "serial"),
    (1, 2, 2, 128, 16, 256, "dynamic"), (1, 8, 2, 64, 1, 32, "static"),
]


@pytest.mark.parametrize("batch, heads, kv_heads, head_dim, seq_len, kv_block, threads", AMX_CASES)
def test_amx_prefill_attention_matches_reference(tmp_path, batch, heads, kv_heads, head_dim, seq_len, kv_block,
                                                 threads):
    w = make_workload("attention", "bf16", phase="prefill", batch=batch, heads=heads, kv_heads=kv_heads,
                      head_dim=head_dim, seq_len=seq_len)
    knobs = codegen.legalize(w, {"isa": "amx", "kv_block": kv_block, "threads": threads}, list(ISA_ORDER))
    assert knobs["isa"] == "amx" and knobs["q_block"] == 16 and not knobs["gqa_share"]
    res = build_ok(codegen.generate(w, knobs), "amx", tmp_path)  # compiles wherever gcc knows -mamx-tile
    if "amx" not in HOST_ISAS:
        pytest.skip("this host has no AMX (or Linux does not grant its tile state): compiled, not run")
    check_against_reference(res.so_path, w, seed=seq_len, sets=2)


def test_amx_is_legal_only_for_a_bf16_causal_prefill_with_head_dim_a_multiple_of_32():
    full = list(ISA_ORDER)
    pre = make_workload("attention", "bf16", phase="prefill", heads=4, kv_heads=2, head_dim=64, seq_len=40)
    others = [make_workload("attention", "fp32", phase="prefill", heads=4, kv_heads=2, head_dim=64, seq_len=40),
              make_workload("attention", "bf16", phase="decode", heads=4, kv_heads=2, head_dim=64, kv_len=9,
                            max_kv_len=16),
              make_workload("attention", "bf16", phase="prefill", heads=4, kv_heads=2, head_dim=48, seq_len=40),
              small("mlp"), small("gemm"), small("rmsnorm")]
    assert codegen.isa_applies("amx", pre) and not any(codegen.isa_applies("amx", w) for w in others)
    knobs = codegen.legalize(pre, {"isa": "amx", "kv_block": 16, "gqa_share": True, "q_block": 2}, full)
    assert (knobs["kv_block"], knobs["q_block"], knobs["gqa_share"], knobs["vec_softmax"]) == (32, 16, False, True)
    assert codegen.legalize(pre, {"isa": "amx"}, full[:-1])["isa"] == "avx512"  # no AMX here: the best other ISA
    for w in others:
        assert codegen.legalize(w, {"isa": "amx"}, full)["isa"] != "amx"
