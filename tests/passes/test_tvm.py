"""The TVM Relax pass: patterns on Before/Expected modules, regions it must leave alone, cache misses,
and the tiny Llama's decode step through both frontends (outputs equal before and after the pass)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")
pytest.importorskip("onnx")
from tvm import relax  # noqa: E402

from autocomp_compile.models import build_llama  # noqa: E402
from autocomp_compile.models.export import (  # noqa: E402
    PastKVDecodeStep, decode_step_inputs, export_decode_step, export_decode_step_onnx)
from autocomp_compile.passes.tvm import (  # noqa: E402
    KERNEL_PREFIX, AutocompPartition, PartitionError, find_regions, kernel_keys)
from autocomp_compile.passes.tvm_import import from_onnx, from_torch  # noqa: E402
from tests.helpers import SwiGLU  # noqa: E402

ALL = ("attention", "mlp", "lm_head", "gemm", "rmsnorm")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One kernel cache for the module: each tiny workload is searched once (budget 2)."""
    return str(tmp_path_factory.mktemp("tvm_cache"))


def partition(cache_dir, mode="search", **kw):
    # timing_ms 20: no test here needs a precise ranking, and the default 1000 ms per candidate adds up
    return AutocompPartition(target="cpu", mode=mode, budget=2, min_speedup=0.0, cache_dir=cache_dir,
                             output_dir=str(cache_dir) + "/runs", verbose=False, timing_ms=20, **kw)


def tvm_tensor(t: torch.Tensor):
    return tvm.runtime.tensor(t.numpy())


def run(mod, inputs):
    ex = relax.build(mod, target=tvm.target.Target({"kind": "llvm"}))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*inputs)
    return [o.numpy() for o in out] if isinstance(out, (list, tuple)) or hasattr(out, "__len__") else [out.numpy()]


def linear_module(with_weight_param: bool = True, axes=(1, 0), n: int = 32, dataflow: bool = True):
    """x [1, 64] @ permute_dims(W[n, 64], axes), W a parameter after num_input (a weight) or a second input
    (an activation); in a dataflow block or a plain binding block."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 64), "float32"))
    w = relax.Var("w", relax.TensorType((n, 64), "float32"))
    attrs = {"num_input": 1} if with_weight_param else {"num_input": 2}
    with bb.function("main", [x, w], attrs=attrs):
        if dataflow:
            with bb.dataflow():
                wt = bb.emit(relax.op.permute_dims(w, list(axes)))
                y = bb.emit(relax.op.matmul(x, wt))
                out = bb.emit_output(y)
        else:
            out = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w, list(axes)))))
        bb.emit_func_output(out)
    return bb.get()


def test_options_are_checked():
    with pytest.raises(PartitionError, match="mode"):
        AutocompPartition(mode="fast")
    with pytest.raises(PartitionError, match="kinds"):
        AutocompPartition(kinds=("conv",))
    with pytest.raises(PartitionError, match="target"):
        AutocompPartition(target="nki")
    with pytest.raises(PartitionError, match="budget must be an int, got '8'"):
        AutocompPartition(budget="8")
    with pytest.raises(PartitionError, match="min_speedup must be a finite number >= 0"):
        AutocompPartition(min_speedup=float("nan"))
    with pytest.raises(PartitionError, match="timing_ms must be a finite number > 0"):
        AutocompPartition(timing_ms=-5)


def test_linear_becomes_kernel_call(cache_dir):
    before = linear_module()
    p = partition(cache_dir)
    after = p(before)
    [decision] = p.report.decisions
    assert decision.replaced and decision.workload == "gemm_fp32_k64_m1_n32"
    configs = [json.loads(c.read_text()) for c in Path(cache_dir, "runs").glob("*/config.json")]
    assert configs or decision.source == "cache"
    assert all(c["eval"]["timing_budget_ms"] == 20 for c in configs)  # the pass's timing_ms reached the search
    # Expected: the weight goes to the kernel as stored ([n, k]); no transpose remains.
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 64), "float32"))
    w = relax.Var("w", relax.TensorType((32, 64), "float32"))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            y = bb.emit(relax.call_dps_packed(KERNEL_PREFIX + decision.key, [x, w],
                                              relax.TensorType([1, 32], "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())
    xs, ws = torch.randn(1, 64), torch.randn(32, 64)
    np.testing.assert_allclose(run(after, [tvm_tensor(xs), tvm_tensor(ws)])[0], (xs @ ws.T).numpy(), rtol=1e-5, atol=1e-5)


def test_a_region_in_a_plain_binding_block_is_replaced(cache_dir):
    """Functions without R.dataflow() (hand-written, or after ToNonDataflow): the crash was 'EmitOutput has to
    be called inside dataflow block'."""
    p = partition(cache_dir)
    after = p(linear_module(dataflow=False))
    assert [d.replaced for d in p.report.decisions] == [True]
    xs, ws = torch.randn(1, 64), torch.randn(32, 64)
    np.testing.assert_allclose(run(after, [tvm_tensor(xs), tvm_tensor(ws)])[0], (xs @ ws.T).numpy(), rtol=1e-5, atol=1e-5)


def test_registering_with_the_right_cache_after_a_miss_runs_the_kernel(cache_dir, tmp_path):
    from autocomp_compile.passes.kernels import REGISTRY
    from autocomp_compile.passes.tvm import register_kernels

    after = partition(cache_dir)(linear_module(n=48))
    xs, ws = torch.randn(1, 64), torch.randn(48, 64)
    [key] = kernel_keys(after)
    REGISTRY._kernels.pop(key)  # as in a fresh process: the search loaded it into this one
    register_kernels(after, str(tmp_path / "empty"))  # the wrong cache first
    with pytest.raises(Exception, match="not in the kernel cache \\(kernel cache .*empty\\)"):
        run(after, [tvm_tensor(xs), tvm_tensor(ws)])
    register_kernels(after, cache_dir)  # used to keep the first function, and the miss for the process
    np.testing.assert_allclose(run(after, [tvm_tensor(xs), tvm_tensor(ws)])[0], (xs @ ws.T).numpy(), rtol=1e-5, atol=1e-5)


def test_activation_matmul_is_left_alone(cache_dir):
    before = linear_module(with_weight_param=False)  # w is a runtime input: q @ k^T, not a layer
    assert find_regions(before["main"]) == []
    after = partition(cache_dir)(before)
    tvm.ir.assert_structural_equal(after, before)


def test_cache_miss_in_cache_only_mode_leaves_region_to_tvm(tmp_path):
    before = linear_module()
    p = partition(str(tmp_path / "empty"), mode="cache-only")
    after = p(before)
    tvm.ir.assert_structural_equal(after, before)
    [decision] = p.report.decisions
    assert not decision.replaced and "not in the kernel cache" in decision.reason


def test_the_pass_leaves_its_input_module_unchanged(cache_dir):
    before = linear_module()
    p = partition(cache_dir)
    after = p(before)
    assert p.report.replaced == 1 and kernel_keys(after)
    assert kernel_keys(before) == []
    tvm.ir.assert_structural_equal(before, linear_module())


def test_identity_permute_is_not_a_transposed_weight():
    """matmul(x, permute_dims(W, [0, 1])) is x @ W, not x @ W^T: never a linear with W as [n, k]."""
    [region] = find_regions(linear_module(axes=(0, 1), n=64)["main"])
    assert region.workload is None and "not a transpose" in region.reason
    [region] = find_regions(linear_module(n=64)["main"])  # control: a true transpose
    assert region.workload is not None


def rmsnorm_module(numerator=None, keepdims=True, rows=4):
    """w * (x * rsqrt(mean(x^2) + eps)), or `numerator / sqrt(...)` as the ONNX frontend writes it; `rows` may
    be a symbolic size (a tir.Var)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((rows, 64), "float32"))
    w = relax.Var("w", relax.TensorType((64,), "float32"))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            sq = bb.emit(relax.op.power(x, relax.const(2.0, "float32")))
            ms = bb.emit(relax.op.mean(sq, axis=[-1], keepdims=keepdims))
            ve = bb.emit(relax.op.add(ms, relax.const(1e-5, "float32")))
            if numerator is None:
                inv = bb.emit(relax.op.rsqrt(ve))
            else:
                inv = bb.emit(relax.op.divide(relax.const(numerator, "float32"), bb.emit(relax.op.sqrt(ve))))
            normed = bb.emit(relax.op.multiply(x, inv))
            out = bb.emit_output(bb.emit(relax.op.multiply(w, normed)))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("numerator", [None, 1.0])
def test_rmsnorm_forms_are_regions(numerator):
    [region] = find_regions(rmsnorm_module(numerator)["main"])
    assert region.kind == "rmsnorm" and region.workload is not None, region.reason


def test_rmsnorm_numerator_must_be_one():
    """w * (x * (2 / sqrt(...))) is twice an RMSNorm."""
    [region] = find_regions(rmsnorm_module(2.0)["main"])
    assert region.workload is None and "numerator" in region.reason


def test_rmsnorm_mean_must_keep_its_axis():
    """Without keepdims a square input's [64] mean scales columns, not rows."""
    [region] = find_regions(rmsnorm_module(keepdims=False, rows=64)["main"])
    assert region.workload is None and "keep" in region.reason


def test_rmsnorm_with_symbolic_rows_says_so():
    [region] = find_regions(rmsnorm_module(rows=tvm.tirx.Var("n", "int64"))["main"])
    assert region.workload is None and "symbolic" in region.reason


class _RepeatedKVAttention(torch.nn.Module):
    """Decode attention over KV repeated to 4 heads from 2: per group (HF repeat_kv) or tiled (head i % 2)."""

    def __init__(self, tiled: bool):
        super().__init__()
        self.tiled = tiled

    def forward(self, q, k, v):
        if self.tiled:
            k, v = (t[:, None].expand(1, 2, 2, 8, 16).reshape(1, 4, 8, 16) for t in (k, v))
        else:
            k, v = (t[:, :, None].expand(1, 2, 2, 8, 16).reshape(1, 4, 8, 16) for t in (k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("tiled", [False, True])
def test_only_a_per_group_kv_repeat_is_gqa(tiled):
    example = (torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16))
    mod = from_torch(torch.export.export(_RepeatedKVAttention(tiled).eval(), example))
    [region] = find_regions(mod["main"])
    assert region.kind == "attention"
    if tiled:
        assert region.workload is None and "repeated per query group" in region.reason
    else:
        assert region.workload is not None and region.workload.params["kv_heads"] == 2, region.reason


def _attention_with_reshaped_scores(view, axis):
    """q k^T / sqrt(d), reshaped to `view`, softmax over `axis`, reshaped back, times v (Relax, decode shapes)."""
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((1, 4, 1, 16), "float32"))
    k, v = (relax.Var(n, relax.TensorType((1, 4, 8, 16), "float32")) for n in ("k", "v"))
    with bb.function("main", [q, k, v], attrs={"num_input": 3}):
        with bb.dataflow():
            kt = bb.emit(relax.op.permute_dims(k, [0, 1, 3, 2]))
            scores = bb.emit(relax.op.matmul(bb.emit(relax.op.multiply(q, relax.const(0.25, "float32"))), kt))
            probs = bb.emit(relax.op.nn.softmax(bb.emit(relax.op.reshape(scores, view)), axis=axis))
            out = bb.emit_output(bb.emit(relax.op.matmul(bb.emit(relax.op.reshape(probs, (1, 4, 1, 8))), v)))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("view, axis, replaced", [
    ((1, 4, 1, 8), -1, True),
    ((1, 4, 1, 8), 3, True),
    ((1, 4, 2, 4), -1, False),  # a softmax over each half of the keys
    ((1, 4, 1, 1, 8), 3, False),  # over a size-1 axis: every probability 1
])
def test_attention_softmax_must_run_over_all_keys_of_a_row(view, axis, replaced):
    [region] = find_regions(_attention_with_reshaped_scores(view, axis)["main"])
    assert (region.workload is not None) == replaced, region.reason
    if not replaced:
        assert "is not over the 8 keys" in region.reason


def test_from_onnx_leaves_the_callers_model_unchanged():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from autocomp_compile.passes.tvm_import import fix_scalar_unsqueeze_axes

    axes = numpy_helper.from_array(np.array(1, dtype=np.int64), "axes")  # 0-d, as torch's exporter writes it
    graph = helper.make_graph([helper.make_node("Unsqueeze", ["x", "axes"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1, 3])], [axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    before = model.SerializeToString()
    mod = from_onnx(model)
    assert model.SerializeToString() == before  # the fix went to a copy
    assert [int(d) for d in mod["main"].ret_ty.shape] == [2, 1, 3]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    assert fix_scalar_unsqueeze_axes(copy) == 1  # there was something to fix


def tiny(dtype="fp32"):
    model = build_llama("tiny-llama", dtype=dtype).eval()
    return model, decode_step_inputs(model, batch=1, past_len=7)


@pytest.fixture(scope="module")
def tiny_modules(tmp_path_factory):
    model, example = tiny()
    onnx_path = export_decode_step_onnx(model, example, tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    return model, example, {"torch": from_torch(export_decode_step(model, example)), "onnx": from_onnx(onnx_path)}


@pytest.mark.parametrize("frontend", ["torch", "onnx"])
def test_patterns_find_every_region_of_the_tiny_llama(tiny_modules, frontend):
    *_, mods = tiny_modules
    regions = find_regions(mods[frontend]["main"])
    counts: dict[str, int] = {}
    for r in regions:
        assert r.workload is not None, r.reason
        counts[r.kind] = counts.get(r.kind, 0) + 1
    # 2 layers: attention core, q/k/v/o, SwiGLU MLP and 2 norms each; final norm and the LM head.
    assert counts == {"attention": 2, "gemm": 8, "mlp": 2, "rmsnorm": 5, "lm_head": 1}
    names = {r.workload.name for r in regions}
    assert "attention_fp32_decode_batch1_head_dim16_heads4_kv_heads2_kv_len4_max_kv_len8" in names
    assert "mlp_fp32_batch1_hidden64_intermediate128" in names and "lm_head_fp32_batch1_hidden64_vocab256" in names


@pytest.mark.parametrize("frontend", ["torch", "onnx"])
def test_partitioned_decode_step_matches_the_original(tiny_modules, cache_dir, frontend):
    model, example, mods = tiny_modules
    p = partition(cache_dir, kinds=ALL)
    after = p(mods[frontend])
    assert p.report.replaced == p.report.total == 18, p.report.summary()
    assert len(kernel_keys(after)) == 6 and kernel_keys(mods[frontend]) == []  # TVM's own result to compare
    inputs = [tvm_tensor(t) for t in example]
    got, original = run(after, inputs), run(mods[frontend], inputs)
    with torch.no_grad():
        eager = [t.numpy() for t in PastKVDecodeStep(model)(*example)]
    assert len(got) == len(eager) == 5
    for g, o, e in zip(got, original, eager):
        np.testing.assert_allclose(g, o, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_bf16_regions_include_their_casts(cache_dir):
    model, example = tiny("bf16")
    mod = from_torch(export_decode_step(model, example))
    regions = find_regions(mod["main"])
    attention = [r for r in regions if r.kind == "attention"]
    # torch's decomposition attends in float32 between casts; the region takes the casts in: a bf16 kernel.
    assert len(attention) == 2 and all(r.workload.dtype == "bf16" for r in attention)
    assert sum(r.kind == "mlp" for r in regions) == 2
    p = partition(cache_dir, kinds=("attention", "mlp"))
    after = p(mod)
    assert p.report.replaced == 4, p.report.summary()
    assert kernel_keys(after) and kernel_keys(mod) == []  # `original` below is TVM's own result
    import ml_dtypes

    inputs = [tvm.runtime.tensor(t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16
                                 else t.numpy()) for t in example]
    got, original = run(after, inputs), run(mod, inputs)
    for g, o in zip(got, original):
        g, o = g.astype(np.float32), o.astype(np.float32)
        assert np.linalg.norm(g - o) <= 2e-2 * np.linalg.norm(o)


def test_geglu_mlp_is_not_a_swiglu_region(cache_dir):
    """An MLP with GELU instead of SiLU: its projections are linears, never one SwiGLU kernel."""

    class GeGLU(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(64, 128, bias=False)
            self.up = torch.nn.Linear(64, 128, bias=False)
            self.down = torch.nn.Linear(128, 64, bias=False)

        def forward(self, x):
            return self.down(torch.nn.functional.gelu(self.gate(x)) * self.up(x))

    ep = torch.export.export(GeGLU().eval(), (torch.randn(1, 64),))
    kinds = [r.kind for r in find_regions(from_torch(ep)["main"])]
    assert "mlp" not in kinds and kinds.count("gemm") == 3


def swiglu_module():
    return from_torch(torch.export.export(SwiGLU().eval(), (torch.randn(1, 64),)))


def test_projections_of_an_mlp_outside_kinds_are_linear_regions():
    func = swiglu_module()["main"]
    assert [r.kind for r in find_regions(func)] == ["mlp"]
    kinds = sorted(r.kind for r in find_regions(func, kinds=("gemm",)))
    assert kinds == ["gemm", "gemm", "gemm", "mlp"]  # the MLP is listed (its decision says why not)


def test_an_mlp_left_to_tvm_releases_its_projections(tmp_path):
    """cache-only, the MLP kernel missing but the projections' gemm kernels cached: the gemms are used."""
    mod = swiglu_module()
    warm = partition(str(tmp_path), kinds=("gemm",))
    warm(mod)
    assert warm.report.replaced == 3, warm.report.summary()
    p = partition(str(tmp_path), mode="cache-only", kinds=("mlp", "gemm"))
    after = p(mod)
    by_kind = {d.kind: d for d in p.report.decisions}
    assert not by_kind["mlp"].replaced and "not in the kernel cache" in by_kind["mlp"].reason
    assert p.report.replaced == 3 and len(kernel_keys(after)) == 2, p.report.summary()
    x = torch.randn(1, 64)
    np.testing.assert_allclose(run(after, [tvm_tensor(x)])[0], run(mod, [tvm_tensor(x)])[0], rtol=1e-5, atol=1e-5)


def test_metaschedule_build_function_builds_without_tensor_intrinsics():
    """The tuning helper's build function (MetaSchedule's default minus a 74 s import) makes a runnable module."""
    from tvm import te

    from autocomp_compile.passes.tvm_tuning import build_without_tensor_intrinsics

    a, b = te.placeholder((1, 64), name="a"), te.placeholder((32, 64), name="b")
    k = te.reduce_axis((0, 64), name="k")
    c = te.compute((1, 32), lambda i, j: te.sum(a[i, k] * b[j, k], axis=k), name="c")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b, c])})
    lib = build_without_tensor_intrinsics(mod, tvm.target.Target({"kind": "llvm"}), None)
    x, w = np.random.randn(1, 64).astype("float32"), np.random.randn(32, 64).astype("float32")
    out = tvm.runtime.tensor(np.zeros((1, 32), "float32"))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    np.testing.assert_allclose(out.numpy(), x @ w.T, rtol=1e-5, atol=1e-5)


def test_a_module_partitioned_with_a_cache_dir_runs_in_another_process(cache_dir, tmp_path):
    after = partition(cache_dir)(linear_module())
    library = tmp_path / "linear.so"
    relax.build(after, target=tvm.target.Target({"kind": "llvm"})).export_library(str(library))
    child = f"""
import numpy as np, torch, tvm
from tvm import relax
from autocomp_compile.passes.tvm import register_kernel_function
register_kernel_function({kernel_keys(after)[0]!r}, {cache_dir!r})
x, w = torch.randn(1, 64), torch.randn(32, 64)
vm = relax.VirtualMachine(tvm.runtime.load_module({str(library)!r}), tvm.cpu())
out = vm["main"](tvm.runtime.tensor(x.numpy()), tvm.runtime.tensor(w.numpy())).numpy()
np.testing.assert_allclose(out, (x @ w.T).numpy(), rtol=1e-5, atol=1e-5)
"""
    env = {**os.environ, "AUTOCOMP_CACHE_DIR": str(tmp_path / "default_cache")}  # the user's cache lacks it
    done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
