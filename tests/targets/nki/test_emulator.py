"""The NKI emulator: each hardware rule rejects a kernel that breaks it (naming the rule), new buffers are
NaN, bf16 is rounded, masks guard out-of-bounds accesses, and the trace feeds the cost model."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from autocomp_compile.targets.nki.cost_model import estimate
from autocomp_compile.targets.nki.cost_model import op_seconds
from autocomp_compile.targets.nki.emulator import NkiRuleError, NkiUnsupported, load_source, run_kernel

HEADER = "import neuronxcc.nki as nki\nimport neuronxcc.nki.language as nl\nimport neuronxcc.nki.isa as nisa\n\n"


def run(body: str, *inputs: np.ndarray):
    return run_kernel(load_source(HEADER + "@nki.jit\ndef kernel(a):\n" + body), list(inputs))


def bf16(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(ml_dtypes.bfloat16)


COPY_OUT = "    nl.store(out, value=t)\n    return out\n"

BROKEN = {
    "partition-dim": (
        "    out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)\n"
        "    t = nl.load(a)  # 256 rows on partitions\n" + COPY_OUT, (256, 8)),
    "psum-tile-size": (
        "    acc = nl.zeros((128, 1024), nl.float32, buffer=nl.psum)  # 4 KiB per partition\n"
        "    return a\n", (128, 8)),
    "psum-banks": (
        "    tiles = [nl.zeros((128, 512), nl.float32, buffer=nl.psum) for _ in range(9)]\n"
        "    return a\n", (128, 8)),
    "sbuf-capacity": (
        "    tiles = [nl.ndarray((128, 32768), nl.float32, buffer=nl.sbuf) for _ in range(2)]  # 2 x 128 KiB\n"
        "    return a\n", (128, 8)),
    "matmul-operands": (
        "    t = nl.load(a)\n"
        "    p = nisa.nc_matmul(nl.zeros((128, 128), nl.float32, buffer=nl.psum), t)  # stationary in PSUM\n"
        "    return a\n", (128, 8)),
    "matmul-shape": (
        "    t = nl.load(a)\n"
        "    p = nisa.nc_matmul(t, t)  # stationary free size 256 > 128\n"
        "    return a\n", (128, 256)),
    "matmul-result": (
        "    t = nl.load(a)\n"
        "    s = nl.ndarray((8, 8), nl.float32, buffer=nl.sbuf)\n"
        "    s[...] = nisa.nc_matmul(t, t)  # TensorE cannot write SBUF\n"
        "    return a\n", (128, 8)),
    "hbm-operand": (
        "    out = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)\n"
        "    t = nl.exp(a)  # compute on an HBM tensor\n" + COPY_OUT, (128, 8)),
    "out-of-bounds": (
        "    out = nl.ndarray((128, 8), dtype=a.dtype, buffer=nl.shared_hbm)\n"
        "    i_p = nl.arange(128)[:, None]\n"
        "    i_f = nl.arange(8)[None, :]\n"
        "    t = nl.load(a[i_p + 64, i_f])  # rows 128..191 do not exist\n" + COPY_OUT, (128, 8)),
    "partition-access": (
        "    out = nl.ndarray((128, 128), dtype=a.dtype, buffer=nl.shared_hbm)\n"
        "    i_p = nl.arange(128)[:, None]\n"
        "    i_f = nl.arange(128)[None, :]\n"
        "    t = nl.load(a)\n"
        "    t = nl.copy(t[i_f, i_p])  # an SBUF transpose for the price of a copy\n" + COPY_OUT, (128, 128)),
    "gpsimd-psum": (
        "    t = nl.load(a)\n"
        "    s = nisa.affine_select(pred=nl.arange(8)[None, :] < 4, on_true_tile=nisa.nc_matmul(t, t),\n"
        "                           on_false_value=0.0)  # GpSimd reading PSUM\n"
        "    return a\n", (128, 8)),
    "shape-mismatch": (
        "    t = nl.load(a)\n"
        "    acc = nl.zeros((8, 512), nl.float32, buffer=nl.psum)\n"
        "    acc += nisa.nc_matmul(t, t)  # [8, 8] into [8, 512]: no broadcasting\n"
        "    return a\n", (128, 8)),
    "psum-operands": (
        "    t = nl.load(a)\n"
        "    p1 = nisa.nc_matmul(t, t)\n"
        "    p2 = nisa.nc_matmul(t, t)\n"
        "    s = nisa.tensor_tensor(p1, p2, op=nl.add)  # both in PSUM\n"
        "    return a\n", (128, 8)),
    "affine-select-pred": (
        "    t = nl.load(a)\n"
        "    i_p = nl.arange(128)[:, None]\n"
        "    i_f = nl.arange(8)[None, :]\n"
        "    s = nisa.affine_select(pred=(i_f <= i_p) & (i_f < 4), on_true_tile=t, on_false_value=0.0)\n"
        "    return a\n", (128, 8)),
    "reduce-axes": (
        "    t = nl.load(a)\n"
        "    s = nl.sum(t, axis=1)  # [128, 4, 8]: not the trailing free axes\n"
        "    return a\n", (128, 4, 8)),
}


@pytest.mark.parametrize("rule", sorted(BROKEN))
def test_each_rule_rejects_a_kernel_that_breaks_it(rule):
    body, shape = BROKEN[rule]
    with pytest.raises(NkiRuleError) as info:
        run(body, bf16(*shape))
    assert info.value.rule == rule
    assert f"NKI rule '{rule}'" in str(info.value)


def test_rules_allow_the_limits_themselves():
    body = (
        "    out = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.shared_hbm)\n"
        "    t = nl.load(a)\n"  # [128, 128]: stationary at its limit
        "    m = nl.load(a)\n"
        "    acc = nl.zeros((128, 512), nl.float32, buffer=nl.psum)  # exactly one bank\n"
        "    for j in nl.affine_range(4):\n"
        "        acc[:, j * 128:(j + 1) * 128] = nisa.nc_matmul(t, m)\n"
        "    nl.store(out, value=nl.copy(acc))\n"
        "    return out\n")
    a = bf16(128, 128)
    res = run(body, a)
    ref = a.astype(np.float32).T @ a.astype(np.float32)
    np.testing.assert_allclose(res.outputs[0], np.tile(ref, (1, 4)), rtol=1e-5, atol=1e-4)


def test_masked_access_past_the_end_is_allowed_and_writes_nothing_outside_the_mask():
    body = (
        "    out = nl.ndarray((100, 8), dtype=a.dtype, buffer=nl.shared_hbm)\n"
        "    i_p = nl.arange(128)[:, None]\n"
        "    i_f = nl.arange(8)[None, :]\n"
        "    t = nl.load(a[i_p, i_f], mask=i_p < 100)\n"
        "    nl.store(out[i_p, i_f], value=t, mask=i_p < 100)\n"
        "    return out\n")
    a = bf16(100, 8)
    np.testing.assert_array_equal(run(body, a).outputs[0].view(np.uint16), a.view(np.uint16))


def test_new_buffers_are_nan_so_unwritten_output_shows():
    body = (
        "    out = nl.ndarray((128, 8), dtype=a.dtype, buffer=nl.shared_hbm)\n"
        "    t = nl.load(a[0:64, :])\n"
        "    nl.store(out[0:64, :], value=t)  # rows 64.. never written\n"
        "    return out\n")
    out = run(body, bf16(128, 8)).outputs[0].astype(np.float32)
    assert np.isfinite(out[:64]).all() and np.isnan(out[64:]).all()


def test_bf16_results_are_rounded():
    body = (
        "    out = nl.ndarray((1, 4), dtype=nl.bfloat16, buffer=nl.shared_hbm)\n"
        "    t = nl.load(a)\n"
        "    y = nl.add(t, 2.0 ** -10, dtype=nl.bfloat16)  # below bf16's resolution at 1.0\n"
        "    nl.store(out, value=y)\n"
        "    return out\n")
    a = np.ones((1, 4), dtype=np.float32)
    out = run(body, a).outputs[0]
    assert out.dtype == ml_dtypes.bfloat16 and (out.astype(np.float32) == 1.0).all()


def test_sequential_loops_serialise_and_affine_loops_overlap():
    def body(loop: str) -> str:
        return (
            "    out = nl.ndarray((128, 2048), dtype=a.dtype, buffer=nl.shared_hbm)\n"
            "    i_p = nl.arange(128)[:, None]\n"
            "    i_f = nl.arange(512)[None, :]\n"
            f"    for j in nl.{loop}(4):\n"
            "        t = nl.load(a[i_p, j * 512 + i_f])\n"
            "        y = nl.exp(t)\n"
            "        nl.store(out[i_p, j * 512 + i_f], value=y)\n"
            "    return out\n")
    a = bf16(128, 2048)
    seq = estimate(run(body("sequential_range"), a).ops)
    aff = estimate(run(body("affine_range"), a).ops)
    assert seq.busy_us == aff.busy_us and seq.dma_bytes == aff.dma_bytes == 2 * a.nbytes
    assert aff.latency_us < 0.6 * seq.latency_us
    assert seq.simulated and aff.simulated
    # neuronx-cc turns a bare `range` into a sequential_range; static_range is unrolled (straight-line code)
    bare = estimate(run(body("sequential_range").replace("nl.sequential_range(4)", "range(4)"), a).ops)
    assert bare.latency_us == seq.latency_us
    assert estimate(run(body("static_range"), a).ops).latency_us == aff.latency_us


def test_a_masked_compute_instruction_writes_only_where_its_mask_holds():
    """On Trainium a masked instruction leaves the other elements of the tile it writes alone, and
    `mask=False` skips the instruction."""
    body = (
        "    out = nl.ndarray((128, 8), dtype=nl.float32, buffer=nl.shared_hbm)\n"
        "    i_p = nl.arange(128)[:, None]\n"
        "    t = nl.load(a)\n"
        "    acc = nl.zeros((128, 8), nl.float32, buffer=nl.sbuf)\n"
        "    acc[...] = nl.add(t, 1.0, mask=(i_p < 64))\n"
        "    acc[...] = nl.exp(t, mask=False)\n"
        "    loose = nl.multiply(t, 2.0, mask=(i_p < 1))\n"
        "    acc[...] = nisa.tensor_scalar(acc, op0=nl.add, operand0=loose[0:1, 0:1] * 0.0, mask=(i_p >= 120))\n"
        "    nl.store(out, value=acc)\n"
        "    return out\n")
    a = np.full((128, 8), 2.0, dtype=np.float32)
    got = run(body, a).outputs[0]
    assert (got[:64] == 3.0).all() and (got[64:] == 0.0).all()


def test_matmuls_refuse_masks_the_emulator_does_not_model():
    body = "    t = nl.load(a)\n    p = nisa.nc_matmul(t, t, mask=True)\n    return a\n"
    with pytest.raises(NkiUnsupported, match="nisa.nc_matmul with mask="):
        run(body, bf16(128, 8))


def test_activation_reduce_sums_every_free_axis():
    body = (
        "    out = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.shared_hbm)\n"
        "    t = nl.load(a)\n"
        "    rs = nl.ndarray((128, 1), nl.float32, buffer=nl.sbuf)\n"
        "    e = nisa.activation_reduce(op=nl.copy, data=t, reduce_op=nl.add, reduce_res=rs)\n"
        "    nl.store(out, value=rs)\n"
        "    return out\n")
    a = np.random.default_rng(0).standard_normal((128, 4, 8)).astype(np.float32)
    np.testing.assert_allclose(run(body, a).outputs[0][:, 0], a.reshape(128, -1).sum(axis=1), rtol=1e-5)


def test_dma_descriptor_size_is_recorded():
    body = (
        "    out = nl.ndarray((128, 64), dtype=a.dtype, buffer=nl.shared_hbm)\n"
        "    i_p = nl.arange(128)[:, None]\n"
        "    i_f = nl.arange(64)[None, :]\n"
        "    rows = nl.load(a[i_p, i_f])  # 64 contiguous elements per partition\n"
        "    cols = nl.load(a[i_f, i_p])  # transposed: one element per descriptor\n"
        "    nl.store(out, value=rows)\n"
        "    return out\n")
    ops = [op for op in run(body, bf16(128, 128)).ops if op.engine == "dma"]
    assert [op.chunk_bytes for op in ops] == [128, 2, 128]


def test_psum_slice_accumulation_stays_on_the_tensor_engine():
    body = (
        "    out = nl.ndarray((128, 256), dtype=nl.float32, buffer=nl.shared_hbm)\n"
        "    acc = nl.zeros((128, 256), nl.float32, buffer=nl.psum)\n"
        "    for k in nl.affine_range(2):\n"
        "        s = nl.load(a[k * 128:(k + 1) * 128, 0:128])\n"
        "        m = nl.load(a[k * 128:(k + 1) * 128, 0:128])\n"
        "        acc[:, 0:128] += nisa.nc_matmul(s, m)\n"
        "        acc[:, 128:256] += nisa.nc_matmul(s, m)\n"
        "    nl.store(out, value=nl.copy(acc))\n"
        "    return out\n")
    a = bf16(256, 128)
    res = run(body, a)
    f = a.astype(np.float32)
    ref = f[:128].T @ f[:128] + f[128:].T @ f[128:]
    np.testing.assert_allclose(res.outputs[0], np.concatenate([ref, ref], axis=1), rtol=1e-4, atol=1e-3)
    assert [op.engine for op in res.ops if op.engine != "dma"] == ["tensor"] * 4 + ["vector"]


def test_assigning_to_hbm_needs_a_store():
    body = (
        "    out = nl.ndarray((128, 8), dtype=a.dtype, buffer=nl.shared_hbm)\n"
        "    out[...] = nl.exp(nl.load(a))  # no DMA\n"
        "    return out\n")
    with pytest.raises(NkiUnsupported, match="nl.store"):
        run(body, bf16(128, 8))


@pytest.mark.parametrize("reduce", ["nl.sum(t, axis=1, keepdims=True)",
                                    "nisa.tensor_reduce(op=nl.maximum, data=t, axis=1, keepdims=True)"])
def test_reductions_cost_what_they_read(reduce):
    body = (
        "    out = nl.ndarray((128, 1), dtype=a.dtype, buffer=nl.shared_hbm)\n"
        "    t = nl.load(a)\n"
        f"    nl.store(out, value={reduce})\n"
        "    return out\n")
    a = bf16(128, 4096)
    res = run(body, a)
    np.testing.assert_allclose(res.outputs[0][:, 0].astype(np.float32),
                               a.astype(np.float32).sum(1) if "sum" in reduce else a.astype(np.float32).max(1),
                               rtol=2e-2, atol=2e-2)
    [op] = [op for op in res.ops if op.engine == "vector"]
    assert op.free == 4096 and op_seconds(op)[0] == pytest.approx((64 + 4096) / 1.4e9)


@pytest.mark.parametrize("axis", ["-2", "(-2, -1)", "0"])
def test_reductions_over_partitions_are_refused_with_negative_axes_too(axis):
    body = (
        "    t = nl.load(a)\n"
        f"    s = nl.sum(t, axis={axis}, keepdims=True)\n"
        "    return a\n")
    with pytest.raises(NkiUnsupported, match="partition axis"):
        run(body, bf16(128, 8))


def test_tensor_scalar_reverse_operands():
    body = (
        "    out = nl.ndarray((128, 8), dtype=nl.float32, buffer=nl.shared_hbm)\n"
        "    t = nl.load(a)\n"
        "    y = nisa.tensor_scalar(t, nl.subtract, 3.0, reverse0=True, op1=nl.subtract, operand1=1.0, reverse1=True)\n"
        "    nl.store(out, value=y)\n"
        "    return out\n")
    a = np.random.default_rng(0).standard_normal((128, 8)).astype(np.float32)
    np.testing.assert_allclose(run(body, a).outputs[0], 1.0 - (3.0 - a), rtol=1e-6)


def test_tensor_tensor_needs_equal_partitions_and_elements_per_partition():
    body = (
        "    out = nl.ndarray((128, 8), dtype=nl.float32, buffer=nl.shared_hbm)\n"
        "    t = nl.load(a)\n"
        "    u = nl.full((128, 2, 4), 2.0, nl.float32)  # same elements per partition, another shape\n"
        "    nl.store(out, value=nisa.tensor_tensor(t, u, op=nl.multiply))\n"
        "    return out\n")
    a = np.random.default_rng(0).standard_normal((128, 8)).astype(np.float32)
    np.testing.assert_allclose(run(body, a).outputs[0], a * 2.0, rtol=1e-6)
    scalar_tile = body.replace("nl.full((128, 2, 4), 2.0, nl.float32)", "nl.load(a[0:1, 0:1])")
    with pytest.raises(NkiRuleError) as info:
        run(scalar_tile, a)
    assert info.value.rule == "shape-mismatch"


def test_onchip_tiles_keep_their_partitions_but_hbm_may_be_read_transposed():
    body = (
        "    out = nl.ndarray((128, 128), dtype=a.dtype, buffer=nl.shared_hbm)\n"
        "    i_p = nl.arange(128)[:, None]\n"
        "    i_f = nl.arange(128)[None, :]\n"
        "    t = nl.load(a[i_f, i_p])  # the DMA transposes\n"
        "    u = nl.ndarray((128, 128), a.dtype, buffer=nl.sbuf)\n"
        "    u[i_p, i_f] = nl.copy(t[i_p, i_f])\n"
        "    nl.store(out, value=u)\n"
        "    return out\n")
    a = bf16(128, 128)
    np.testing.assert_array_equal(run(body, a).outputs[0].view(np.uint16), a.T.view(np.uint16))
    for bad in ("u[i_f, i_p] = nl.copy(t)", "u[i_p, i_f] = nl.copy(t[0, i_p])"):
        with pytest.raises(NkiRuleError) as info:
            run(body.replace("u[i_p, i_f] = nl.copy(t[i_p, i_f])", bad), a)
        assert info.value.rule == "partition-access"


@pytest.mark.parametrize("value", ["nisa.nc_matmul(t, t)", "acc"])
def test_storing_a_psum_tile_costs_a_vector_copy(value):
    body = (
        "    out = nl.ndarray((8, 8), dtype=nl.float32, buffer=nl.shared_hbm)\n"
        "    t = nl.load(a)\n"
        "    acc = nl.zeros((8, 8), nl.float32, buffer=nl.psum)\n"
        "    acc += nisa.nc_matmul(t, t)\n"
        f"    nl.store(out, value={value})\n"
        "    return out\n")
    a = bf16(128, 8)
    res = run(body, a)
    f = a.astype(np.float32)
    np.testing.assert_allclose(res.outputs[0], f.T @ f, rtol=1e-4, atol=1e-3)
    assert [op.engine for op in res.ops][-2:] == ["vector", "dma"]


def test_a_compound_affine_select_predicate_built_first_is_refused_too():
    body = (
        "    t = nl.load(a)\n"
        "    i_p = nl.arange(128)[:, None]\n"
        "    i_f = nl.arange(8)[None, :]\n"
        "    keep = (i_f <= i_p) & (i_f < 4)\n"
        "    s = nisa.affine_select(keep, t, 0.0)\n"
        "    return a\n")
    with pytest.raises(NkiRuleError) as info:
        run(body, bf16(128, 8))
    assert info.value.rule == "affine-select-pred" and "keep" in str(info.value)
