"""The NXDI helper's wiring, with stand-in NXDI modules and our NKI kernel run on the emulator
(the real substitution is UNVERIFIED until run on a trn1)."""
from __future__ import annotations

import torch

from autocomp_compile import make_workload
from autocomp_compile.targets.nki import codegen, nxdi
from autocomp_compile.targets.nki.emulator import load_source, run_kernel
from autocomp_compile.targets.nki.evaluate import to_numpy, to_torch


def emulator_runner(code, inputs, dims):
    return to_torch(run_kernel(load_source(code), [to_numpy(t.detach()) for t in inputs], dims).outputs[0])


class NeuronLlamaMLP(torch.nn.Module):  # the NXDI class name the helper looks for
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False, dtype=torch.bfloat16)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False, dtype=torch.bfloat16)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False, dtype=torch.bfloat16)

    def forward(self, x, rmsnorm=None, residual=None, adapter_ids=None):  # NXDI returns (output, residual)
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)), None


def test_mlp_substitution_matches_the_module_and_falls_back_on_other_shapes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(NeuronLlamaMLP(256, 512), torch.nn.Identity(), NeuronLlamaMLP(256, 512))
    w = make_workload("mlp", hidden=256, intermediate=512)
    code = codegen.generate(w, codegen.legalize(w, {"loop": "affine", "psum_acc": True, "fuse": True}))
    x = torch.randn(1, 1, 256, dtype=torch.bfloat16)
    expected = [m(x)[0].float() for m in (model[0], model[2])]
    calls = []

    def runner(c, inputs, dims):
        calls.append([tuple(t.shape) for t in inputs])
        return emulator_runner(c, inputs, dims)

    assert nxdi.substitute_kernels(model, mlp_code=code, run=runner) == 2
    assert nxdi.UNVERIFIED
    for m, ref in zip((model[0], model[2]), expected):
        out, residual = m(x, rmsnorm=None, adapter_ids=None)  # as NeuronLlamaDecoderLayer calls it
        assert out.shape == (1, 1, 256) and residual is None
        torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    assert calls == [[(1, 256), (512, 256), (512, 256), (256, 512)]] * 2
    model[0](torch.randn(2, 7, 256, dtype=torch.bfloat16))  # prefill-shaped: NXDI's own forward
    assert len(calls) == 2


class NeuronLlamaAttention(torch.nn.Module):
    def perform_prefill(self, Q, K, V, q_len, bsz, attention_mask):  # NXDI returns (attn_output, flash strategy)
        return torch.nn.functional.scaled_dot_product_attention(Q, K, V, is_causal=True, enable_gqa=True), "NONE"


def test_attention_prefill_substitution():
    torch.manual_seed(1)
    w = make_workload("attention", phase="prefill", heads=4, kv_heads=2, head_dim=64, seq_len=128)
    code = codegen.generate(w, codegen.legalize(w, {"loop": "affine", "exp_fused": True, "psum_acc": True}))
    attn = NeuronLlamaAttention()
    q = torch.randn(1, 4, 128, 64, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 128, 64, dtype=torch.bfloat16) for _ in range(2))
    ref = attn.perform_prefill(q, k, v, 128, 1, None)[0].float()
    assert nxdi.substitute_kernels(torch.nn.Sequential(attn), attention_prefill_code=code, prefill_seq_len=128,
                                   run=emulator_runner) == 1
    out, strategy = attn.perform_prefill(q, k, v, 128, 1, None)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    assert strategy is None  # FlashAttentionStrategy.NONE where NXDI is installed: the output is BHSD
    short, strategy = attn.perform_prefill(q[:, :, :16], k[:, :, :16], v[:, :, :16], 16, 1, None)  # NXDI's own
    assert short.shape == (1, 4, 16, 64) and strategy == "NONE"


def test_attention_prefill_falls_back_for_another_batch_or_head_count():
    w = make_workload("attention", phase="prefill", batch=1, heads=2, kv_heads=1, head_dim=64, seq_len=128)
    code = codegen.generate(w, codegen.legalize(w, {}))
    assert nxdi.prefill_shape(code) == (1, 2, 1, 128)
    attn = NeuronLlamaAttention()
    calls = []
    nxdi.substitute_kernels(torch.nn.Sequential(attn), attention_prefill_code=code, prefill_seq_len=128,
                            run=lambda *a: calls.append(a))
    for b, hq, hk in ((2, 2, 1), (1, 4, 1), (1, 2, 2)):
        q = torch.randn(b, hq, 128, 64, dtype=torch.bfloat16)
        k, v = (torch.randn(b, hk, 128, 64, dtype=torch.bfloat16) for _ in range(2))
        out, strategy = attn.perform_prefill(q, k, v, 128, b, None)
        assert out.shape == (b, hq, 128, 64) and strategy == "NONE"
    assert calls == []


def test_mlps_our_kernel_cannot_stand_in_for_keep_nxdis_forward():
    """NXDI's MLP kernel transposes the weights to [in, out]; sequence parallelism gathers and reduce-scatters;
    our kernel has no bias: those modules are left alone (it computed with transposed weights before)."""
    w = make_workload("mlp", hidden=256, intermediate=512)
    code = codegen.generate(w, codegen.legalize(w, {}))
    flagged = [NeuronLlamaMLP(256, 512) for _ in range(4)]
    flagged[0].mlp_kernel_enabled = True
    flagged[1].quantized_mlp_kernel_enabled = True
    flagged[2].sequence_parallel_enabled = True
    flagged[3].up_proj = torch.nn.Linear(256, 512, bias=True, dtype=torch.bfloat16)
    plain = NeuronLlamaMLP(256, 512)
    plain.mlp_kernel_enabled = False
    calls = []
    assert nxdi.substitute_kernels(torch.nn.Sequential(*flagged, plain), mlp_code=code,
                                   run=lambda *a: calls.append(a)) == 1
    assert [nxdi.mlp_unsupported(m) != "" for m in flagged + [plain]] == [True] * 4 + [False]
    for m in flagged:
        m(torch.randn(1, 1, 256, dtype=torch.bfloat16))
    assert calls == []


def test_left_padded_batches_keep_nxdis_attention():
    w = make_workload("attention", phase="prefill", batch=2, heads=2, kv_heads=1, head_dim=64, seq_len=128)
    code = codegen.generate(w, codegen.legalize(w, {}))
    attn = NeuronLlamaAttention()
    attn.padding_side = "left"
    calls = []
    nxdi.substitute_kernels(torch.nn.Sequential(attn), attention_prefill_code=code, prefill_seq_len=128,
                            run=lambda *a: calls.append(a))
    q = torch.randn(2, 2, 128, 64, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 1, 128, 64, dtype=torch.bfloat16) for _ in range(2))
    out, strategy = attn.perform_prefill(q, k, v, 128, 2, None)
    assert strategy == "NONE" and calls == []
    attn.padding_side = "right"
    attn.perform_prefill(q, k, v, 128, 2, None)
    assert len(calls) == 1


def test_the_neuron_runner_compiles_a_kernel_from_a_file_and_calls_it_as_defined(tmp_path):
    """NKI's front end reads a kernel's source, so it is compiled from a file; the source's `kernel` is already
    an `@nki.jit` kernel and is not wrapped again."""
    code = "def kernel(*args):\n    return ('called', args)\n"
    fn = nxdi._kernel_of(code)
    import inspect

    assert inspect.getsource(fn).startswith("def kernel(*args):")
    assert nxdi.neuron_runner(code, [1, 2], [3]) == ("called", (1, 2, 3))
