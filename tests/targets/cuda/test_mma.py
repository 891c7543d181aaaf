"""Tensor-core (mma.sync) GEMM schedules: legal for every shape, and correct when the generated CUDA runs on
the CPU emulator (no GPU needed; on a GPU, test_cuda_target.py runs the same schedules for real)."""
from __future__ import annotations

import random
import shutil

import pytest

from autocomp_compile import get_target, make_workload
from autocomp_compile.targets.cuda import codegen, mma
from autocomp_compile.targets.cuda.runtime import launch_spec

from . import emulator

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator compiles with g++")

PREFILL = [
    make_workload("gemm", "bf16", m=40, n=96, k=96),
    make_workload("gemm", "bf16", m=512, n=2048, k=2048),
    make_workload("lm_head", "bf16", batch=64, vocab=128256, hidden=2048),
    make_workload("mlp", "bf16", batch=20, hidden=64, intermediate=96),
    make_workload("mlp", "bf16", batch=512, hidden=2048, intermediate=8192),
]


def _emulate(w, knobs, tmp_path, seed=0, source=None):
    return emulator.check(w, source or codegen.generate(w, knobs), tmp_path / "emu", seed)


def test_random_schedules_legalize_to_legal_canonical_tiles():
    rng = random.Random(0)
    for _ in range(1500):
        w = rng.choice(PREFILL)
        asked = {name: rng.choice(choices) for name, choices in codegen.KNOB_CHOICES["gemv"].items()}
        asked.update(naive=False, mma=True, vec=rng.random() < 0.5, fuse_down=rng.random() < 0.5,
                     ldmatrix=rng.random() < 0.5)
        k = codegen.legalize(w, asked)
        assert k["mma"] and codegen.legalize(w, k) == k  # idempotent
        nw = 2 if w.kind == "mlp" else 1
        _, wn, tm, tn = mma.warp_grid(k)
        assert nw * tm * tn * 4 <= mma.MAX_ACCUMULATORS and k["stages"] >= 1
        assert k["stages"] == 1 or mma.smem_bytes(k, nw) <= mma.SMEM_CAP
        m, n, kk = codegen._gemv_shape(w)
        assert n % k["tile_n"] == 0 and (w.kind != "mlp" or w.params["hidden"] % k["tile_n"] == 0)
        # everything the GEMV kernels use is back at its naive value: one schedule, one source
        tile_knobs = ("warps", "tile_m", "tile_n", "stages", "ldmatrix")
        rest = {key: v for key, v in k.items() if key not in tile_knobs}
        assert rest == {key: v for key, v in codegen.NAIVE_KNOBS["gemv"].items() if key not in tile_knobs} | {
            "naive": False, "mma": True}


def test_tensor_cores_need_bf16_and_aligned_shapes():
    assert not codegen.legalize(make_workload("gemm", "fp32", m=64, n=64, k=64), dict(naive=False, mma=True))["mma"]
    assert not codegen.legalize(make_workload("gemm", "bf16", m=64, n=64, k=72), dict(naive=False, mma=True))["mma"]
    assert not codegen.legalize(make_workload("gemm", "bf16", m=64, n=40, k=64), dict(naive=False, mma=True))["mma"]
    assert not codegen.legalize(PREFILL[0], dict(naive=True, mma=True))["mma"]
    off = codegen.legalize(PREFILL[0], dict(naive=False, mma=False, tile_m=16, stages=4))
    assert (off["tile_m"], off["stages"]) == (64, 2)  # tile knobs of a GEMV schedule stay canonical


def test_menu_offers_tensor_cores_for_prefill_only():
    target = get_target("cuda")
    decode = make_workload("gemm", "bf16", m=1, n=2048, k=2048)
    assert "tensor_cores" not in [i.id for i in target.menu(decode)]
    w = PREFILL[1]
    items = {i.id: i for i in target.menu(w)}
    gemv = codegen.legalize(w, dict(naive=False))
    assert items["tensor_cores"].applies(gemv)
    tc = target.legalize(w, items["tensor_cores"].apply(dict(gemv), random.Random(0)))
    assert tc["mma"] and not items["tensor_cores"].applies(tc)
    offered = {i.id for i in items.values() if i.applies(tc)}
    assert {"mma_tile_m", "mma_tile_n", "mma_stages", "ldmatrix", "block_size"} <= offered
    assert not offered & {"vector_loads", "split_k", "block_rows", "stream_loads"}  # GEMV-only items


def test_launch_line_of_the_mlp():
    w = PREFILL[4]
    spec = launch_spec(codegen.generate(w, codegen.legalize(w, dict(naive=False, mma=True, tile_m=128, tile_n=128,
                                                                             warps=8, stages=3))))
    gate_up, down = spec["kernels"]
    assert gate_up["args"] == ["x", "w_gate", "w_up", "$h"] and down["args"] == ["$h", "w_down", "out"]
    assert spec["scratch"]["h"] == [512 * 8192, "bf16"] and spec["align"] == 16
    assert gate_up["grid"] == [8192 // 128, 4, 1] and down["grid"] == [2048 // 128, 4, 1]
    assert gate_up["smem"] == 3 * (128 + 2 * 128) * (mma.BK + mma.PAD) * 2 and gate_up["block"] == [256, 1, 1]


SCHEDULES = [  # beyond the tensor-core variants test_cuda_target.py runs on the emulator
    (0, dict(mma=True, stages=3, warps=1, tile_m=16, tile_n=16)),
    (0, dict(mma=True, stages=2, warps=8, tile_m=32, tile_n=64)),
    (3, dict(mma=True, stages=3, warps=2)),
    (0, dict(mma=True, ldmatrix=True, stages=2, warps=2, tile_m=16, tile_n=16)),  # one B fragment: ldmatrix x2
    (3, dict(mma=True, ldmatrix=True, stages=3, warps=4, tile_m=32, tile_n=32)),
]


@needs_gxx
@pytest.mark.parametrize("i", range(len(SCHEDULES)))
def test_generated_kernels_are_correct_on_the_emulator(i, tmp_path):
    which, asked = SCHEDULES[i]
    w = PREFILL[which]  # 40 rows: the last row tile is partly past M
    knobs = codegen.legalize(w, dict(naive=False, **asked))
    assert knobs["mma"]
    result = _emulate(w, knobs, tmp_path, seed=i)
    assert result.ok, f"{w.name} {knobs}: {result.message}"


@needs_gxx
def test_lm_head_with_few_rows_is_correct_on_the_emulator(tmp_path):
    w = make_workload("lm_head", "bf16", batch=3, vocab=160, hidden=64)  # 13 zero-filled rows in the tile
    knobs = codegen.legalize(w, dict(naive=False, mma=True))
    assert knobs["tile_m"] == 16
    assert _emulate(w, knobs, tmp_path).ok


@needs_gxx
@pytest.mark.parametrize("original,mutated", [
    ("a[i][1] = ld_pair(p + 320)", "a[i][1] = ld_pair(p + 8)"),  # A fragment rows and columns mixed up
    ("bf[b][j][1] = ld_pair(p + 8)", "bf[b][j][1] = ld_pair(p + 16)"),  # B's second k half from the wrong place
    ("if (kt + 1 < KT)", "if (kt + 1 < KT - 1)"),  # the pipeline drops the last K tile
    ("ldmatrix_x4(a[i], xa + (wm * 16 + i * 16 + (lane & 15))", "ldmatrix_x4(a[i], xa + (wm * 16 + i * 16 + (lane & 7))"),
    ("CP_ASYNC_WAIT(0);", "CP_ASYNC_WAIT(1);"),  # computes on a K tile whose copies have not landed
])
def test_the_emulator_catches_wrong_kernels(original, mutated, tmp_path):
    w = PREFILL[0]
    src = codegen.generate(w, codegen.legalize(w, dict(naive=False, mma=True, ldmatrix="ldmatrix" in original)))
    assert original in src
    assert not _emulate(w, None, tmp_path, source=src.replace(original, mutated)).ok


ATTENTION = [
    make_workload("attention", "bf16", phase="prefill", batch=2, heads=4, kv_heads=1, head_dim=32, seq_len=70),
    make_workload("attention", "bf16", phase="prefill", heads=2, kv_heads=2, head_dim=128, seq_len=100),
]


def test_tensor_core_attention_is_bf16_prefill_with_head_dim_a_multiple_of_16():
    on = dict(naive=False, mma=True, warps=16)
    assert codegen.legalize(ATTENTION[1], on) == {**codegen.NAIVE_KNOBS["attention"], "naive": False, "mma": True,
                                                  "warps": 8}
    assert codegen.legalize(make_workload("attention", "bf16", phase="prefill", seq_len=10), on)["warps"] == 1
    assert not codegen.legalize(make_workload("attention", "fp32", phase="prefill", seq_len=64), on)["mma"]
    assert not codegen.legalize(make_workload("attention", "bf16", kv_len=64, max_kv_len=128), on)["mma"]
    assert not codegen.legalize(make_workload("attention", "bf16", phase="prefill", head_dim=40, seq_len=64), on)["mma"]
    target = get_target("cuda")
    items = {i.id: i for i in target.menu(ATTENTION[0])}
    tc = target.legalize(ATTENTION[0], items["tensor_cores"].apply(codegen.legalize(ATTENTION[0], dict(naive=False)),
                                                                    random.Random(0)))
    assert tc["mma"] and {i.id for i in items.values() if i.applies(tc)} == {"block_size"}


@needs_gxx
@pytest.mark.parametrize("which,warps", [(0, 2), (1, 8)])
def test_tensor_core_attention_is_correct_on_the_emulator(which, warps, tmp_path):
    w = ATTENTION[which]  # GQA groups of 4 / none; 70 and 100 rows: partial tiles of queries and keys
    knobs = codegen.legalize(w, dict(naive=False, mma=True, warps=warps))
    assert knobs["mma"] and knobs["warps"] == warps
    result = _emulate(w, knobs, tmp_path, seed=which)
    assert result.ok, result.message


@needs_gxx
@pytest.mark.parametrize("original,mutated", [
    ("key <= row", "key < row"),  # the causal mask drops the diagonal
    ("(unsigned)v[576] | ((unsigned)v[648] << 16)", "(unsigned)v[144] | ((unsigned)v[216] << 16)"),  # V keys 8-15
])
def test_the_emulator_catches_wrong_attention(original, mutated, tmp_path):
    w = make_workload("attention", "bf16", phase="prefill", heads=4, kv_heads=2, head_dim=64, seq_len=19)
    src = codegen.generate(w, codegen.legalize(w, dict(naive=False, mma=True)))
    assert original in src
    assert not _emulate(w, None, tmp_path, source=src.replace(original, mutated)).ok


@needs_gxx
def test_the_emulator_faults_on_a_misaligned_ldmatrix(tmp_path):
    w = PREFILL[0]
    src = codegen.generate(w, codegen.legalize(w, dict(naive=False, mma=True, ldmatrix=True)))
    original = "+ kk + (lane >> 4) * 8);"
    assert original in src
    with pytest.raises(emulator.EmulatedFault, match="ldmatrix row address .* not 16-byte aligned"):
        _emulate(w, None, tmp_path, source=src.replace(original, "+ kk + (lane >> 4) * 8 + 1);"))
