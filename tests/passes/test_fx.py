"""Subgraph recognition on the aten graphs torch.compile produces, for the compact model, a
Hugging Face LlamaForCausalLM and hand-written variants (what must and must not match)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.backends.common import aot_autograd

from autocomp_compile.models import build_llama
from autocomp_compile.passes.fx import find_subgraphs


def trace(fn, *args, rewrite=False, **kwargs):
    """All matches of every graph torch.compile produces for fn(*args); with `rewrite`, also the
    output of the graphs after every replaceable match became an autocomp op (with no kernel
    registered, so the ops compute with PyTorch: the rewiring itself is what is tested)."""
    matches = []

    def collect(gm, example_inputs):
        found = find_subgraphs(gm)
        matches.extend(found)
        if rewrite:
            replaced = {}
            for m in found:
                if m.workload is not None:
                    m.replace(gm.graph, "no-kernel", replaced)
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=collect), dynamic=False)
    with torch.no_grad():
        out = compiled(*args, **kwargs)
    torch._dynamo.reset()
    return (matches, out) if rewrite else matches


def kinds(matches, replaceable=True):
    return Counter(m.kind for m in matches if (m.workload is not None) == replaceable)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compact_llama_decode(dtype):
    model = build_llama("tiny-llama", dtype)
    model.setup_caches(1)
    found = trace(model, torch.tensor([[3]]), torch.tensor([5]))
    # 2 layers: q, k, v, o projections, one MLP, attention and two norms each; a final norm and the LM head.
    assert kinds(found) == {"gemm": 8, "mlp": 2, "attention": 2, "rmsnorm": 5, "lm_head": 1}
    attn = next(m for m in found if m.kind == "attention").workload
    assert attn.params["phase"] == "decode" and attn.params["max_kv_len"] == 128 and attn.params["kv_heads"] == 2
    mlp = next(m for m in found if m.kind == "mlp")
    assert mlp.workload.params == {"batch": 1, "hidden": 64, "intermediate": 128}


def test_rewritten_compact_llama_computes_the_same_logits():
    model = build_llama("tiny-llama", "fp32", seed=2)
    tokens = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    model.setup_caches(1)
    found, out = trace(model, tokens, torch.arange(5), rewrite=True)
    assert len(found) == 18
    model.setup_caches(1)
    with torch.no_grad():
        torch.testing.assert_close(out, model(tokens, torch.arange(5)), rtol=1e-5, atol=1e-5)


def test_compact_llama_prefill_is_causal_attention():
    model = build_llama("tiny-llama", "fp32")
    model.setup_caches(2)
    found = trace(model, torch.zeros(2, 6, dtype=torch.long), torch.arange(6))
    attn = [m for m in found if m.kind == "attention"]
    assert len(attn) == 2 and attn[0].workload.params["phase"] == "prefill"
    assert attn[0].workload.params["seq_len"] == 6 and attn[0].workload.params["batch"] == 2


def test_hugging_face_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(cfg).eval()
    found = trace(hf, torch.zeros(1, 8, dtype=torch.long))
    assert kinds(found) == {"gemm": 8, "mlp": 2, "attention": 2, "rmsnorm": 5, "lm_head": 1}
    assert {m.workload.params["kv_heads"] for m in found if m.kind == "attention"} == {2}


class Gated(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act
        self.gate = nn.Linear(32, 64, bias=False)
        self.up = nn.Linear(32, 64, bias=False)
        self.down = nn.Linear(64, 32, bias=False)

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


def test_swiglu_is_recognised_and_other_gated_units_are_not():
    x = torch.randn(1, 32)
    assert kinds(trace(Gated(F.silu), x)) == {"mlp": 1}
    assert kinds(trace(Gated(nn.SiLU()), x)) == {"mlp": 1}
    assert kinds(trace(Gated(lambda t: t * torch.sigmoid(t)), x)) == {"mlp": 1}
    assert kinds(trace(Gated(F.gelu), x)) == {"gemm": 3}  # GeGLU is not SwiGLU: three plain linears
    assert kinds(trace(Gated(torch.relu), x)) == {"gemm": 3}


@pytest.mark.parametrize("change", [lambda h: h * 1.01, lambda h: h + 1e-3])
def test_a_scaled_or_shifted_swiglu_is_not_taken_for_swiglu_in_bf16(change):
    """bf16's rounding hides a 1% scale of the product; the float64 probe of the region's arithmetic does not."""
    class Changed(Gated):
        def forward(self, x):
            return self.down(change(F.silu(self.gate(x)) * self.up(x)))

    m = Changed(F.silu).bfloat16()
    assert kinds(trace(m, torch.randn(4, 32).bfloat16())) == {"gemm": 3}
    assert kinds(trace(Gated(F.silu).bfloat16(), torch.randn(4, 32).bfloat16())) == {"mlp": 1}


def test_a_swiglu_with_a_float32_down_projection_is_listed_with_its_mixed_dtypes():
    class Mixed(Gated):
        def forward(self, x):
            return self.down((F.silu(self.gate(x)) * self.up(x)).float())

    m = Mixed(F.silu)
    m.gate.bfloat16(), m.up.bfloat16()
    x = torch.randn(4, 32).bfloat16()
    found, out = trace(m, x, rewrite=True)
    (mlp,) = [f for f in found if f.kind == "mlp"]
    assert mlp.workload is None and "mixed dtypes" in mlp.reason
    with torch.no_grad():
        torch.testing.assert_close(out, m(x))


class Clamped(Gated):
    """SwiGLU whose product is clamped (or thresholded) before the down projection."""

    def __init__(self, limit: float, where: bool = False):
        super().__init__(F.silu)
        self.limit, self.where = limit, where

    def forward(self, x):
        h = F.silu(self.gate(x)) * self.up(x)
        h = torch.where(h.abs() > self.limit, 0.0, h) if self.where else h.clamp(-self.limit, self.limit)
        return self.down(h)


@pytest.mark.parametrize("limit,where", [(50.0, False), (1e7, False), (1e7, True)])
def test_a_thresholded_swiglu_is_not_taken_for_swiglu(limit, where):
    """A match would drop the clamp: with inputs large enough to reach it, the outputs differ."""
    assert kinds(trace(Clamped(limit, where), torch.randn(1, 32))) == {"gemm": 3}


def test_swiglu_with_up_computed_first_keeps_gate_and_up_apart():
    class UpFirst(Gated):
        def forward(self, x):
            u = self.up(x)
            return self.down(u * F.silu(self.gate(x)))

    m, x = UpFirst(F.silu), torch.randn(1, 32)
    (match,), out = trace(m, x, rewrite=True)
    assert match.kind == "mlp"
    with torch.no_grad():
        torch.testing.assert_close(out, m(x))  # gate and up swapped would give silu(up) * gate


class NormThenProject(nn.Module):
    """RMSNorm whose output feeds a projection directly (2-D activations: no view in between)."""

    def __init__(self, h: int = 64):
        super().__init__()
        self.w, self.proj = nn.Parameter(torch.randn(h)), nn.Linear(h, 96, bias=False)

    def forward(self, x):
        xf = x.float()
        return self.proj(self.w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype))


def test_an_rmsnorm_rounded_to_another_dtype_than_its_input_is_not_matched():
    """fp32 in, normalised, rounded to bf16, scaled by an fp32 weight: the op would round to fp32 (x's dtype)."""
    class RoundedToBf16(NormThenProject):
        def forward(self, x):
            return self.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)

    assert "rmsnorm" not in kinds(trace(RoundedToBf16(), torch.randn(2, 64)))
    assert kinds(trace(NormThenProject().bfloat16(), torch.randn(2, 64).bfloat16()))["rmsnorm"] == 1


def test_a_match_whose_input_is_another_match_reads_the_replacement():
    """Replaced in graph order, the projection's argument is the norm's old output: unless it is remapped, the
    old norm stays alive and the norm's op is dead code (reported as replaced, never run)."""
    from autocomp_compile.passes import ops

    m, x = NormThenProject(), torch.randn(2, 64)
    targets = []

    def collect(gm, example_inputs):
        replaced = {}
        for match in find_subgraphs(gm):
            if match.workload is not None:
                match.replace(gm.graph, "no-kernel", replaced)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(m, backend=aot_autograd(fw_compiler=collect), dynamic=False)(x)
        torch.testing.assert_close(out, m(x))
    torch._dynamo.reset()
    assert ops.RMSNORM in targets and ops.LINEAR in targets
    assert torch.ops.aten.rsqrt.default not in targets  # the old norm is gone


def test_bias_linears_and_dynamic_shapes_are_not_replaced():
    lin = nn.Linear(16, 8)  # with bias: addmm, not a plain linear
    assert kinds(trace(lin, torch.randn(2, 16))) == {}


def test_dynamic_shapes_leave_linears_to_pytorch_with_a_reason():
    matches = []

    def collect(gm, example_inputs):
        matches.extend(find_subgraphs(gm))
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(NormThenProject(), backend=aot_autograd(fw_compiler=collect), dynamic=True)(torch.randn(3, 64))
    torch._dynamo.reset()
    assert kinds(matches) == {} and kinds(matches, replaceable=False) == {"gemm": 1, "rmsnorm": 1}
    assert all(m.reason.startswith("symbolic shape") for m in matches)


def test_rmsnorm_needs_the_scaling_weight():
    w = torch.randn(16)

    def norm(x):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    def no_weight(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    (m,) = trace(norm, torch.randn(3, 16))
    assert m.kind == "rmsnorm" and m.workload.params == {"rows": 3, "hidden": 16, "eps": 1e-6}
    assert trace(no_weight, torch.randn(3, 16)) == []


def test_attention_variants():
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)

    def gqa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def repeat_kv(q, k, v):  # the way Hugging Face expands KV heads
        k = k[:, :, None].expand(1, 2, 2, 10, 16).reshape(1, 4, 10, 16)
        v = v[:, :, None].expand(1, 2, 2, 10, 16).reshape(1, 4, 10, 16)
        return F.scaled_dot_product_attention(q, k, v)

    for fn in (gqa, repeat_kv):
        (m,) = trace(fn, q, k, v)
        assert m.workload is not None and m.workload.params["kv_heads"] == 2, fn.__name__
    (m,) = trace(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=0.3), q, k, v)
    assert m.workload is None and "scale" in m.reason
    (m,) = trace(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), q, k, v)
    assert m.workload is None and "is_causal" in m.reason
    qp, kp = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16)
    (m,) = trace(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), qp, kp, kp)
    assert m.workload is None and "non-causal" in m.reason


def test_keys_tiled_along_the_sequence_are_not_taken_for_repeated_heads():
    """expand + reshape that makes n copies of the keys along the sequence ([B, H, n*L, D]) is not repeat_kv: the
    attention sees n*L keys (the kernel was given L: wrong causal output, a crash with a decode mask)."""
    q, k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)

    def tiled(q, k, v):
        k = k[:, :, None].expand(1, 2, 2, 4, 16).reshape(1, 2, 8, 16)
        v = v[:, :, None].expand(1, 2, 2, 4, 16).reshape(1, 2, 8, 16)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    matches, out = trace(tiled, q, k, v, rewrite=True)
    (m,) = matches
    assert m.workload is not None and m.workload.params["seq_len"] == 8 and m.workload.params["kv_heads"] == 2
    torch.testing.assert_close(out, tiled(q, k, v))


def test_an_rmsnorm_whose_eps_is_scaled_by_alpha_is_not_matched():
    w = torch.randn(16)

    def norm(x, alpha):
        return w * (x * torch.rsqrt(torch.add(x.pow(2).mean(-1, keepdim=True), 1e-6, alpha=alpha)))

    assert trace(norm, torch.randn(3, 16), 4.0) == []
    (m,) = trace(norm, torch.randn(3, 16), 1)
    assert m.kind == "rmsnorm"


def test_cudnn_attention_of_hopper_gpus_is_recognised_with_its_boolean_mask():
    """On an H100, SDPA with a mask lowers to `_scaled_dot_product_cudnn_attention` with an additive bias
    `where(mask, 0, -inf)` and the 8 KV heads unrepeated (read off the backend's graph there). Traced on the
    meta device: the pass reads only shapes and dtypes."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from autocomp_compile.passes.fx import find_attention

    def decode(q, k, v, allowed):
        zero = torch.full((), 0.0, dtype=q.dtype, device=q.device)
        bias = torch.where(allowed, zero, torch.full((), float("-inf"), dtype=q.dtype, device=q.device))
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, False, 0.0, False, False)[0]

    q = torch.empty(1, 32, 1, 64, dtype=torch.bfloat16, device="meta")
    kv = torch.empty(1, 8, 2048, 64, dtype=torch.bfloat16, device="meta")
    mask = torch.empty(1, 1, 1, 2048, dtype=torch.bool, device="meta")
    gm = make_fx(decode)(q, kv, kv, mask)
    (match,) = find_attention(gm.graph)
    assert match.workload is not None, match.reason
    assert match.workload.params["heads"] == 32 and match.workload.params["kv_heads"] == 8
    assert match.workload.params["max_kv_len"] == 2048 and match.workload.params["phase"] == "decode"
    assert match.args[3].op == "placeholder"  # the boolean mask itself, not the additive bias
