"""benchmarks/peer_llama_cpp.py: the GGUF export llama.cpp reads, and llama.cpp computing the same model."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from autocomp_compile.models import build_llama, generate, get_config
from autocomp_compile.models.llama import rope_frequencies, rotate_half

_path = Path(__file__).parents[2] / "benchmarks" / "peer_llama_cpp.py"
_spec = importlib.util.spec_from_file_location("peer_llama_cpp", _path)
peer = importlib.util.module_from_spec(_spec)
sys.modules["peer_llama_cpp"] = peer
_spec.loader.exec_module(peer)


def _interleaved_rope(x: torch.Tensor, freqs: torch.Tensor, pos: int) -> torch.Tensor:
    """llama.cpp's "normal" RoPE: adjacent pairs (2i, 2i+1) rotated by pos * freqs[i]."""
    angle = pos * freqs
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * angle.cos() - x1 * angle.sin()
    out[..., 1::2] = x0 * angle.sin() + x1 * angle.cos()
    return out


def test_every_parameter_of_the_model_has_a_gguf_name():
    model = build_llama("tiny-llama", "fp32", seed=0)
    names = {peer.gguf_name(n) for n, _ in model.named_parameters()}
    assert "blk.1.ffn_down.weight" in names and "token_embd.weight" in names and "output.weight" in names
    assert len(names) == len(list(model.named_parameters()))  # no two parameters share a name
    with pytest.raises(KeyError):
        peer.gguf_name("model.layers.0.self_attn.rotary.weight")


def test_interleaved_rows_give_llama_cpp_rope_the_rotate_half_result():
    heads, head_dim, hidden = 3, 8, 5
    w = torch.randn(heads * head_dim, hidden, dtype=torch.float64)
    x = torch.randn(hidden, dtype=torch.float64)
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    pos = 7
    q = (w @ x).view(heads, head_dim)
    cos = torch.cat([(pos * inv).cos()] * 2)
    sin = torch.cat([(pos * inv).sin()] * 2)
    expected = q * cos + rotate_half(q) * sin  # the compact Llama's (Hugging Face's) RoPE
    moved = (peer.interleave_rope_rows(w, heads) @ x).view(heads, head_dim)
    got = _interleaved_rope(moved, inv, pos)
    # the same values, each head's pairs stored adjacently: element 2i + j is rotate-half's j * head_dim/2 + i
    adjacent = torch.arange(head_dim).view(2, -1).t().reshape(-1)
    torch.testing.assert_close(got, expected[:, adjacent])


def test_rope_factors_divide_the_plain_frequencies_into_the_scaled_ones():
    scaled = dataclasses.replace(get_config("tiny-llama"), head_dim=64, hidden=256, rope_theta=500000.0,
                                 rope_scaling=(32.0, 1.0, 4.0, 8192))
    factors = peer.rope_factors(scaled).double()
    plain = rope_frequencies(dataclasses.replace(scaled, rope_scaling=None)).double()
    torch.testing.assert_close(plain / factors, rope_frequencies(scaled).double(), rtol=1e-6, atol=0)
    assert factors.min() == 1.0 and factors.max() == 32.0  # high frequencies unscaled, low ones by the factor
    assert peer.rope_factors(get_config("tiny-llama")) is None


needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf not installed (pip install gguf)")


@needs_gguf
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_gguf_file_holds_every_weight_bit_for_bit(tmp_path, dtype):
    import gguf

    model = build_llama("tiny-llama", dtype, seed=0)
    path = peer.write_gguf(model, tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    c = model.config
    assert len(tensors) == 2 + 1 + 9 * c.layers  # embedding, final norm, untied output, 9 per layer
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.attention.head_count_kv"].contents() == c.kv_heads
    assert fields["llama.rope.freq_base"].contents() == pytest.approx(c.rope_theta)
    assert len(fields["tokenizer.ggml.tokens"].contents()) == c.vocab
    for name, value in model.state_dict().items():
        try:
            t = tensors[peer.gguf_name(name)]
        except KeyError:
            continue
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            value = peer.interleave_rope_rows(value, c.heads if "attn_q" in t.name else c.kv_heads)
        if t.name.endswith("norm.weight"):
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            value = value.float()
        else:
            want = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.F32
            assert t.tensor_type == want, t.name
        assert [int(d) for d in reversed(t.shape)] == list(value.shape), t.name  # GGML lists dimensions innermost first
        expect = value.view(torch.int16).numpy().view(np.uint16) if value.dtype == torch.bfloat16 else value.numpy()
        stored = np.ascontiguousarray(t.data).reshape(-1).view(expect.dtype).reshape(expect.shape)  # bf16 comes as bytes
        np.testing.assert_array_equal(stored, expect, err_msg=t.name)


@needs_gguf
def test_q8_0_stores_8_bit_blocks_of_the_same_weights(tmp_path):
    import gguf
    import gguf.quants

    model = build_llama("tiny-llama", "bf16", seed=0)
    reader = gguf.GGUFReader(str(peer.write_gguf(model, tmp_path / "q8.gguf", "q8_0")))
    tensors = {t.name: t for t in reader.tensors}
    down = tensors["blk.0.ffn_down.weight"]
    assert down.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    got = gguf.quants.dequantize(np.asarray(down.data), gguf.GGMLQuantizationType.Q8_0)
    want = model.state_dict()["model.layers.0.mlp.down_proj.weight"].float().numpy()
    scale = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True) / 127  # one scale per block of 32
    assert np.all(np.abs(got.reshape(-1, 32) - want.reshape(-1, 32)) <= scale * 0.6)  # half a step, fp16 scale
    with pytest.raises(ValueError, match="weights 'q4'"):
        peer.write_gguf(model, tmp_path / "x.gguf", "q4")


@needs_gguf
def test_q8_0_refuses_rows_that_are_not_whole_blocks(tmp_path):
    config = dataclasses.replace(get_config("tiny-llama"), hidden=48, heads=3, kv_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="blocks of 32 weights: model.embed_tokens.weight has rows of 48"):
        peer.write_gguf(build_llama(config, "fp32", seed=0), tmp_path / "q8.gguf", "q8_0")


def test_a_model_llama_cpp_cannot_express_is_refused(tmp_path):
    model = build_llama(dataclasses.replace(get_config("tiny-llama"), head_dim=8), "fp32", seed=0)
    with pytest.raises(ValueError, match="heads x head_dim"):
        peer.write_gguf(model, tmp_path / "x.gguf")


@needs_gguf
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python not installed: it builds llama.cpp from source (about 10 min on 2 cores), "
                           "so only the benchmark machine has it (pip install llama-cpp-python)")
@pytest.mark.parametrize("scaled", [False, True], ids=["plain-rope", "llama3-rope-scaling"])
def test_llama_cpp_computes_the_same_model(tmp_path, scaled):
    config = get_config("tiny-llama")
    if scaled:  # a short original context, so that a 100-token prompt reaches the scaled frequencies
        config = dataclasses.replace(config, rope_theta=500000.0, rope_scaling=(32.0, 1.0, 4.0, 16))
    model = build_llama(config, "fp32", seed=0)
    path = peer.write_gguf(model, tmp_path / "tiny.gguf")
    prompt = torch.randint(0, config.vocab, (1, 100 if scaled else 12), generator=torch.Generator().manual_seed(3))
    ours = generate(model, prompt, 6, keep_logits=True)
    run = peer.time_llama_cpp(path, prompt[0].tolist(), 6, threads=1)
    # fp32 on both sides: 4e-5 apart here; without the rope_freqs tensor, 2e-3
    torch.testing.assert_close(torch.from_numpy(run.first_logits), ours.logits[0][0], rtol=0, atol=3e-4)
    assert run.tokens == ours.tokens[0].tolist()
    assert len(run.decode_s) == 5 and run.prefill_s > 0
    q8 = peer.time_llama_cpp(peer.write_gguf(model, tmp_path / "q8.gguf", "q8_0"), prompt[0].tolist(), 2, threads=1,
                             extra_buffers=False)  # llama.cpp's AMX 8-bit kernels fault on AMX hosts (the module says)
    err = (torch.from_numpy(q8.first_logits) - ours.logits[0][0]).abs().max() / ours.logits[0][0].abs().max()
    assert 1e-4 < err < 0.05  # 8-bit weights: close, but not the fp32 result
