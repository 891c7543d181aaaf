"""Workloads (autocomp_compile/workload.py) and their references (autocomp_compile/references.py)."""
from __future__ import annotations

import math
import pickle

import pytest
import torch

from autocomp_compile import references
from autocomp_compile.evaluation.checks import compare
from autocomp_compile.references import KINDS, InputFactory, empty_outputs, get_kind, llama_decode_workloads
from autocomp_compile.workload import WorkloadError, make_workload
from tests.helpers import SMALL, small


# ---------------------------------------------------------------- defaults


def test_llama_3_2_1b_defaults():
    mlp = make_workload("mlp")
    assert mlp.params["hidden"] == 2048 and mlp.params["intermediate"] == 8192
    assert mlp.dtype == "bf16"
    attn = make_workload("attention")
    assert (attn.params["heads"], attn.params["kv_heads"], attn.params["head_dim"]) == (32, 8, 64)
    assert attn.params["phase"] == "decode"
    lm = make_workload("lm_head")
    assert lm.params["vocab"] == 128256 and lm.params["hidden"] == 2048
    assert lm.outputs[0].shape == (1, 128256)
    norm = make_workload("rmsnorm")
    assert norm.params["hidden"] == 2048 and norm.params["eps"] == pytest.approx(1e-5)


def test_llama_decode_workloads_cover_four_kinds():
    ws = llama_decode_workloads("fp32", batch=2, kv_len=4096)
    assert [w.kind for w in ws] == ["attention", "mlp", "lm_head", "rmsnorm"]
    assert all(w.dtype == "fp32" for w in ws)
    attn = ws[0]
    assert attn.params["max_kv_len"] >= 4096 and attn.runtime_dims == {"kv_len": 4096}


def test_tensor_specs_and_runtime_dims():
    w = small("decode")
    assert [t.name for t in w.inputs] == ["q", "k_cache", "v_cache"]
    assert [t.name for t in w.outputs] == ["out"]
    assert w.inputs[1].shape == (1, 2, 64, 16)  # max_kv_len, not kv_len
    assert w.runtime_dims == {"kv_len": 37}
    assert w.inputs[0].nbytes == 4 * 16 * 2
    # decode reads only kv_len of max_kv_len cache rows
    full = sum(t.nbytes for t in w.tensors)
    assert w.bytes_moved() < full
    cache = w.inputs[1].nbytes + w.inputs[2].nbytes
    assert w.bytes_moved() == pytest.approx(full - cache + cache * 37 / 64, abs=2)
    p = small("prefill")
    assert p.runtime_dims == {} and p.inputs[0].shape == (1, 4, 19, 16)


# ---------------------------------------------------------------- signature


def test_signature_is_stable_and_pickles():
    a = make_workload("gemm", "bf16", m=1, n=64, k=96)
    b = make_workload("gemm", "bf16", k=96, n=64, m=1)
    assert a.signature() == b.signature()
    assert len(a.signature()) == 16
    int(a.signature(), 16)  # hex
    c = pickle.loads(pickle.dumps(a))
    assert c == a and c.signature() == a.signature()


@pytest.mark.parametrize(
    "other",
    [
        dict(kind="gemm", dtype="fp32", m=1, n=64, k=96),
        dict(kind="gemm", dtype="bf16", m=2, n=64, k=96),
        dict(kind="gemm", dtype="bf16", m=1, n=65, k=96),
        dict(kind="gemm", dtype="bf16", m=1, n=64, k=97),
        dict(kind="lm_head", dtype="bf16", batch=1, vocab=64, hidden=96),
    ],
)
def test_signature_changes_with_shape_dtype_kind(other):
    base = make_workload("gemm", "bf16", m=1, n=64, k=96)
    kw = dict(other)
    kind, dtype = kw.pop("kind"), kw.pop("dtype")
    assert make_workload(kind, dtype, **kw).signature() != base.signature()


def test_signature_changes_with_runtime_dims_and_eps():
    a = small("decode")
    b = make_workload("attention", "bf16", heads=4, kv_heads=2, head_dim=16, kv_len=38, max_kv_len=64)
    assert a.signature() != b.signature()
    assert make_workload("rmsnorm", eps=1e-5).signature() != make_workload("rmsnorm", eps=1e-6).signature()


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kind, dtype, params, match",
    [
        ("conv2d", "bf16", {}, "unknown workload"),
        ("gemm", "fp16", {}, "unknown dtype"),
        ("gemm", "int8", {}, "unknown dtype"),
        ("gemm", "bf16", dict(m=0), "positive"),
        ("gemm", "bf16", dict(n=-3), "positive"),
        ("gemm", "bf16", dict(k=2.5), "positive"),
        ("gemm", "bf16", dict(k="8"), "positive"),
        ("mlp", "bf16", dict(hidden=0), "positive"),
        ("rmsnorm", "bf16", dict(rows=-1), "positive"),
        ("attention", "bf16", dict(kv_heads=0), "positive"),
        ("attention", "bf16", dict(heads=6, kv_heads=4), "multiple"),
        ("attention", "bf16", dict(heads=4, kv_heads=8), "multiple"),
        ("attention", "bf16", dict(kv_len=65, max_kv_len=64), "exceeds"),
        ("attention", "bf16", dict(phase="train"), "phase"),
        ("gemm", "bf16", dict(batch=2), "unknown parameter"),
        ("rmsnorm", "bf16", dict(eps=-1.0), "eps must be a finite positive number"),
        ("rmsnorm", "bf16", dict(eps=0.0), "eps must be a finite positive number"),
        ("rmsnorm", "bf16", dict(eps=float("nan")), "eps must be a finite positive number"),
        ("rmsnorm", "bf16", dict(eps=float("inf")), "eps must be a finite positive number"),
        ("rmsnorm", "bf16", dict(eps="1e-5"), "eps must be a finite positive number"),
        ("rmsnorm", "bf16", dict(eps=True), "eps must be a finite positive number"),
    ],
)
def test_workload_errors(kind, dtype, params, match):
    with pytest.raises(WorkloadError, match=match):
        make_workload(kind, dtype, **params)


def test_workload_error_is_value_error_and_prefill_ignores_kv_len():
    assert issubclass(WorkloadError, ValueError)
    # a parameter the phase does not use keeps its default: same computation, same cache key
    w = make_workload("attention", "bf16", phase="prefill", kv_len=10, max_kv_len=4, seq_len=8, heads=4, kv_heads=2)
    assert w.signature() == make_workload("attention", "bf16", phase="prefill", seq_len=8, heads=4, kv_heads=2).signature()
    d = make_workload("attention", "bf16", phase="decode", seq_len=8, kv_len=10)
    assert d.signature() == make_workload("attention", "bf16", phase="decode", kv_len=10).signature()
    # None means "use the default"
    assert make_workload("gemm", m=None).params["m"] == 1


# ---------------------------------------------------------------- references vs eager


@pytest.mark.parametrize("name", sorted(SMALL))
def test_reference_matches_eager_fp32(name):
    w = small(name, "fp32")
    spec = get_kind(w.kind)
    factory = InputFactory(3)
    for _ in range(2):
        inputs = factory.inputs(w)
        ref = spec.reference(inputs, w.params, w.runtime_dims)
        outs = empty_outputs(w)
        spec.eager(inputs, outs, w.params, w.runtime_dims)
        for key, out in outs.items():
            assert ref[key].shape == out.shape
            m = compare(key, out, ref[key])
            assert m.ok, m.message
            assert m.max_abs_error < 1e-3


@pytest.mark.parametrize("name", ["gemm", "mlp", "rmsnorm", "decode", "prefill"])
def test_reference_matches_eager_bf16(name):
    w = small(name, "bf16")
    spec = get_kind(w.kind)
    inputs = InputFactory(4).inputs(w)
    outs = empty_outputs(w)
    spec.eager(inputs, outs, w.params, w.runtime_dims)
    m = compare("out", outs["out"], spec.reference(inputs, w.params, w.runtime_dims)["out"])
    assert m.ok, m.message


def test_reference_detects_a_wrong_result():
    """The reference is not trivially equal to anything: a perturbed eager output fails."""
    w = small("gemm", "fp32")
    spec = get_kind(w.kind)
    inputs = InputFactory(0).inputs(w)
    outs = empty_outputs(w)
    spec.eager(inputs, outs, w.params, w.runtime_dims)
    outs["out"][0, 5] += 1.0
    assert not compare("out", outs["out"], spec.reference(inputs, w.params, w.runtime_dims)["out"]).ok


def test_decode_reference_ignores_cache_beyond_kv_len():
    w = small("decode", "fp32")
    spec = get_kind(w.kind)
    inputs = InputFactory(0).inputs(w)
    ref = spec.reference(inputs, w.params, w.runtime_dims)["out"]
    inputs["k_cache"][:, :, 37:] = 1e6
    inputs["v_cache"][:, :, 37:] = float("nan")
    assert torch.equal(spec.reference(inputs, w.params, w.runtime_dims)["out"], ref)


def test_prefill_reference_is_causal():
    w = small("prefill", "fp32")
    spec = get_kind(w.kind)
    inputs = InputFactory(0).inputs(w)
    ref = spec.reference(inputs, w.params, w.runtime_dims)["out"]
    inputs["k"][:, :, -1] += 5.0  # the last key is visible only to the last query row
    changed = spec.reference(inputs, w.params, w.runtime_dims)["out"]
    assert torch.equal(changed[:, :, :-1], ref[:, :, :-1])
    assert not torch.equal(changed[:, :, -1], ref[:, :, -1])


# ---------------------------------------------------------------- inputs


def test_input_factory_signed_with_tails():
    w = make_workload("gemm", "bf16", m=8, n=16, k=512)
    x = InputFactory(0).inputs(w)["x"].float()
    assert x.dtype == torch.float32 and x.shape == (8, 512)
    assert bool((x < 0).any()) and bool((x > 0).any())
    assert float(x.abs().max()) > 4.0
    assert abs(float(x.mean())) < 0.2  # centred
    frac_tails = float((x.abs() > 4).float().mean())
    assert 0 < frac_tails < 0.02


def test_input_factory_dtypes_and_weight_scale():
    w = small("mlp", "bf16")
    inputs = InputFactory(0).inputs(w)
    assert all(inputs[t.name].dtype == torch.bfloat16 for t in w.inputs)
    assert all(tuple(inputs[t.name].shape) == t.shape for t in w.inputs)
    # weights are scaled by 1/sqrt(fan_in) so outputs stay O(1)
    assert float(inputs["w_gate"].float().std()) < 0.5 * float(inputs["x"].float().std())
    rms = InputFactory(0).inputs(small("rmsnorm", "fp32"))["weight"]
    assert float(rms.mean()) == pytest.approx(1.0, abs=0.15)


def test_input_factory_fresh_values_each_call_and_seeded():
    w = small("gemm", "fp32")
    f = InputFactory(7)
    a, b = f.inputs(w), f.inputs(w)
    for name in a:
        assert not torch.equal(a[name], b[name])
    again = InputFactory(7).inputs(w)
    for name in a:
        assert torch.equal(a[name], again[name])
    other = InputFactory(8).inputs(w)
    assert not torch.equal(a["x"], other["x"])


def test_input_factory_pooled_large_tensors(monkeypatch):
    """Tensors above POOL_THRESHOLD are copied from a pristine pool into a reused buffer."""
    monkeypatch.setattr(references, "POOL_THRESHOLD", 1000)
    w = small("gemm", "fp32")  # w: 64 x 96 = 6144 elements -> pooled; x: 96 -> fresh
    f = InputFactory(0)
    first = f.inputs(w)
    w1 = first["w"].clone()
    buf_ptr = first["w"].data_ptr()
    assert "w" in f.pristine and "x" not in f.pristine
    snap = f.snapshot(first)
    assert snap["w"] is f.pristine["w"]
    assert torch.equal(snap["w"], first["w"]) and torch.equal(snap["x"], first["x"])
    first["w"][0, 0] += 1.0  # a kernel scribbling on its input is visible against the pristine copy
    assert not torch.equal(snap["w"], first["w"])
    second = f.inputs(w)
    assert second["w"].data_ptr() == buf_ptr  # no new allocation
    assert not torch.equal(second["w"], w1)  # different offset into the pool
    assert bool((second["w"] < 0).any())


def test_empty_outputs_are_nan_poisoned():
    w = small("gemm", "bf16")
    outs = empty_outputs(w)
    assert set(outs) == {"out"}
    assert outs["out"].dtype == torch.bfloat16 and outs["out"].shape == (1, 64)
    assert bool(torch.isnan(outs["out"]).all())


def test_kind_registry():
    assert set(KINDS) == {"gemm", "lm_head", "mlp", "rmsnorm", "attention"}
    with pytest.raises(WorkloadError, match="unknown workload"):
        get_kind("softmax")


def test_names_tell_decode_from_prefill_and_omit_unused_parameters():
    decode, prefill = make_workload("attention"), make_workload("attention", phase="prefill")
    assert decode.name == "attention_bf16_decode_batch1_head_dim64_heads32_kv_heads8_kv_len1024_max_kv_len2048"
    assert prefill.name == "attention_bf16_prefill_batch1_head_dim64_heads32_kv_heads8_seq_len256"
    assert make_workload("mlp").name == "mlp_bf16_batch1_hidden2048_intermediate8192"


# ---------------------------------------------------------------- inputs that expose numerically wrong kernels


def _fails_in_some_set(w, wrong, sets=3):
    """Whether `wrong(inputs)` (a kernel's output) mismatches the reference in at least one of `sets` input sets."""
    from autocomp_compile.evaluation.checks import compare

    spec, factory = get_kind(w.kind), InputFactory(0)
    for s in range(sets):
        inputs = factory.inputs(w, variant=s)
        ref = spec.reference(inputs, w.params, w.runtime_dims)["out"]
        if not compare("out", wrong(inputs).to(w.outputs[0].torch_dtype), ref).ok:
            return True
    return False


def _rmsnorm_with_eps(eps):
    def kernel(t):
        x = t["x"].double()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * t["weight"].double()
    return kernel


@pytest.mark.parametrize("rows", [1, 4])
def test_rmsnorm_inputs_expose_a_wrong_eps(rows):
    w = make_workload("rmsnorm", "bf16", rows=rows, hidden=256, eps=1e-5)
    assert not _fails_in_some_set(w, _rmsnorm_with_eps(1e-5))
    assert _fails_in_some_set(w, _rmsnorm_with_eps(0.0))
    assert _fails_in_some_set(w, _rmsnorm_with_eps(1e-2))


def _attention_without_max_subtraction(p):
    def kernel(t):
        q, k, v = t["q"].float(), t["k_cache"].float(), t["v_cache"].float()
        n, group = p["kv_len"], p["heads"] // p["kv_heads"]
        k = k[:, :, :n].repeat_interleave(group, dim=1)
        v = v[:, :, :n].repeat_interleave(group, dim=1)
        e = torch.exp(q.unsqueeze(2) @ k.transpose(-1, -2) / p["head_dim"] ** 0.5)  # no max subtraction
        return ((e / e.sum(-1, keepdim=True)) @ v).squeeze(2)
    return kernel


def test_attention_inputs_expose_softmax_without_max_subtraction():
    w = make_workload("attention", "bf16", batch=2, heads=8, kv_heads=2, head_dim=64, kv_len=256, max_kv_len=512)
    assert _fails_in_some_set(w, _attention_without_max_subtraction(w.params), sets=1)
    ref_kernel = lambda t: get_kind("attention").reference(t, w.params, w.runtime_dims)["out"]  # noqa: E731
    assert not _fails_in_some_set(w, ref_kernel)


def test_fp32_attention_reference_is_exact_to_float32_rounding():
    """The sharpened query head gives logits of 100-200: a reference computed in float32 was 3.8e-5 off the true
    result there, enough to fail correct fp32 kernels (the naive one included) at the fp32 tolerance."""
    w = make_workload("attention", "fp32", phase="prefill", batch=1, heads=6, kv_heads=3, head_dim=80, seq_len=88)
    t = InputFactory(113).inputs(w)
    q, k, v = (t[n].double() for n in ("q", "k", "v"))
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(80)).masked_fill(torch.ones(88, 88, dtype=torch.bool).triu(1),
                                                                     float("-inf"))
    exact = torch.softmax(scores, dim=-1) @ v
    got = get_kind("attention").reference(t, w.params, w.runtime_dims)["out"]
    assert got.dtype == torch.float32
    assert (got.double() - exact).abs().max() < 1e-6


def test_flops_count_multiply_adds_twice():
    assert make_workload("gemm", "bf16", m=4, n=8, k=16).flops() == 2 * 4 * 8 * 16
    assert make_workload("lm_head", "bf16", batch=3, hidden=8, vocab=10).flops() == 2 * 3 * 8 * 10
    mlp = make_workload("mlp", "bf16", batch=2, hidden=64, intermediate=96)
    assert mlp.flops() == 2 * 2 * (2 * 64 * 96 + 96 * 64)
    assert make_workload("rmsnorm", "bf16", rows=1, hidden=64).flops() is None


def test_rows_param_names_what_a_prompt_length_changes():
    assert make_workload("gemm", m=64).rows_param() == "m"
    assert make_workload("mlp", batch=64).rows_param() == "batch"
    assert make_workload("lm_head").rows_param() == "batch"
    assert make_workload("rmsnorm").rows_param() == "rows"
    assert make_workload("attention", phase="prefill", seq_len=64).rows_param() == "seq_len"
    assert make_workload("attention").rows_param() is None  # decode: one token, a runtime KV length
