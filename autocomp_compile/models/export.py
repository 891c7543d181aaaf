"""The compact Llama's decode step in an exportable form: past keys/values in, new keys/values out.

`Llama.forward` writes into a static KV cache in place, which `torch.export` turns into buffer mutations
and index_put ops that compiler frontends (TVM Relax, ONNX) do not all take. `PastKVDecodeStep` runs the
same weights and the same arithmetic as one decode step over explicit `past` tensors, the calling
convention of ONNX-exported LLMs: `step(tokens [b, 1], input_pos [1], k_0, v_0, k_1, v_1, ...) ->
(logits [b, 1, vocab], new_k_0, new_v_0, ...)`, each past tensor `[b, kv_heads, past_len, head_dim]` and
each new one `[b, kv_heads, 1, head_dim]`. The caller appends the new keys/values to its cache.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from autocomp_compile.models.llama import Llama, rotate_half


class PastKVDecodeStep(nn.Module):
    """One decode step of `model` over explicit past keys/values (see the module docstring)."""

    def __init__(self, model: Llama):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m, c = self.model, self.model.config
        if len(past) != 2 * c.layers:
            raise ValueError(f"expected {2 * c.layers} past tensors (k and v per layer), got {len(past)}")
        _check_step(tokens, input_pos, past[0].shape[2], c.max_seq_len)
        x = m.model.embed_tokens(tokens)
        b, s, _ = x.shape
        cos = m.rope_cos[input_pos].to(x.dtype)
        sin = m.rope_sin[input_pos].to(x.dtype)
        new_kv: list[torch.Tensor] = []
        for i, layer in enumerate(m.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, s, c.heads, c.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(b, s, c.kv_heads, c.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, s, c.kv_heads, c.head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            keys = torch.cat([past[2 * i], k], dim=2)
            values = torch.cat([past[2 * i + 1], v], dim=2)
            y = F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
            x = x + attn.o_proj(y.transpose(1, 2).reshape(b, s, c.heads * c.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            new_kv += [k, v]
        return (m.lm_head(m.model.norm(x)), *new_kv)


def _check_step(tokens: torch.Tensor, input_pos: torch.Tensor, past_len: int, max_seq_len: int) -> None:
    """One new token per sequence, at the position right after the past (no causal mask is applied)."""
    if tokens.dim() != 2 or tokens.shape[1] != 1:
        raise ValueError(f"tokens must be [batch, 1] (one decode step), got shape {tuple(tokens.shape)}")
    if input_pos.numel() != 1:
        raise ValueError(f"input_pos must hold one position, got shape {tuple(input_pos.shape)}")
    if past_len >= max_seq_len:
        raise ValueError(f"past length {past_len} leaves no room in max_seq_len ({max_seq_len})")
    # The position's value is data: checked when run eagerly, not while torch.export traces the step.
    if not torch.compiler.is_compiling() and int(input_pos.reshape(())) != past_len:
        raise ValueError(f"input_pos {int(input_pos.reshape(()))} must equal the past length {past_len}")


def decode_step_inputs(model: Llama, batch: int = 1, past_len: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Example inputs for `PastKVDecodeStep(model)`: a token per sequence, its position, random past keys/values,
    on the model's device (drawn on the CPU, so the same seed gives the same values everywhere)."""
    c = model.config
    if not 0 < past_len < c.max_seq_len:
        raise ValueError(f"past_len must be in [1, {c.max_seq_len - 1}], got {past_len}")
    gen = torch.Generator().manual_seed(seed)
    device = model.lm_head.weight.device
    tokens = torch.randint(0, c.vocab, (batch, 1), generator=gen)
    past = [torch.randn(batch, c.kv_heads, past_len, c.head_dim, generator=gen).to(model.dtype)
            for _ in range(2 * c.layers)]
    return tuple(t.to(device) for t in (tokens, torch.tensor([past_len]), *past))


def export_decode_step(model: Llama, example: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """`torch.export` of one decode step at the example's (static) shapes."""
    with torch.no_grad():
        return torch.export.export(PastKVDecodeStep(model).eval(), example)


def export_decode_step_onnx(model: Llama, example: tuple[torch.Tensor, ...], path: str | Path) -> Path:
    """ONNX file of one decode step (torch's dynamo-based exporter; needs `onnx` and `onnxscript`)."""
    path = Path(path)
    c = model.config
    names = ["tokens", "input_pos"] + [f"past_{kv}_{i}" for i in range(c.layers) for kv in ("k", "v")]
    outputs = ["logits"] + [f"new_{kv}_{i}" for i in range(c.layers) for kv in ("k", "v")]
    with torch.no_grad():
        torch.onnx.export(PastKVDecodeStep(model).eval(), example, str(path), input_names=names,
                          output_names=outputs, dynamo=True, external_data=False, verbose=False)
    return path
