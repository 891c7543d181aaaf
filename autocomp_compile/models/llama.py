"""A compact Llama (Llama-3 family) with a static, preallocated KV cache.

Decoding one token never changes a tensor shape: the KV cache holds `max_seq_len` positions and
attention reads all of them under a causal mask row picked by `input_pos` (the gpt-fast layout), so
torch.compile traces prefill and decode once each. Layers are written the way Hugging Face writes
them (RMSNorm in float32, SwiGLU MLP, rotate-half RoPE with Llama-3 frequency scaling), so that
weights load unchanged and the graph passes see the same patterns in both implementations.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autocomp_compile.workload import WorkloadError, torch_dtype


@dataclass(frozen=True)
class LlamaConfig:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int
    eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama-3 RoPE scaling (factor, low_freq_factor, high_freq_factor, original_max_position); None: plain RoPE.
    rope_scaling: tuple[float, float, float, int] | None = None
    tie_embeddings: bool = True
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if min(self.hidden, self.intermediate, self.heads, self.kv_heads, self.head_dim, self.vocab, self.layers,
               self.max_seq_len) < 1:
            raise WorkloadError(f"every size in a Llama config must be positive: {self}")
        if self.heads % self.kv_heads:
            raise WorkloadError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if not (self.eps > 0 and self.rope_theta > 0):
            raise WorkloadError(f"eps ({self.eps}) and rope_theta ({self.rope_theta}) must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CONFIGS: dict[str, LlamaConfig] = {
    "llama-3.2-1b": LlamaConfig(
        hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64, vocab=128256, layers=16,
        rope_scaling=(32.0, 1.0, 4.0, 8192),
    ),
    "tiny-llama": LlamaConfig(
        hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=256, layers=2,
        rope_theta=10000.0, tie_embeddings=False, max_seq_len=128,
    ),
}


def get_config(name: str) -> LlamaConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise WorkloadError(f"unknown model {name!r}; choose one of {sorted(CONFIGS)}") from None


def rope_frequencies(config: LlamaConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings, with Llama-3 scaling when the config has it (computed in
    float64, returned in `dtype`)."""
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim))
    if config.rope_scaling is None:
        return inv.to(dtype)
    factor, low, high, original = config.rope_scaling
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = original / low, original / high
    smooth = (original / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    scaled = torch.where(medium, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return scaled.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys and values, [batch, kv_heads, max_seq_len, head_dim]."""

    def __init__(self, batch: int, kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        super().__init__()
        shape = (batch, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden, c.heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.heads * c.head_dim, c.hidden, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        c = self.c
        q = self.q_proj(x).view(b, s, c.heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, c.kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, c.kv_heads, c.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.kv_cache is None:
            raise RuntimeError("call model.setup_caches(batch) before running the model")
        k, v = self.kv_cache.update(input_pos, k, v)
        if not torch.compiler.is_compiling() and input_pos.device.type == "cpu":
            # Eager runs at its best on the CPU: attend to the filled part of the cache only. (A compiled
            # graph keeps static shapes instead: one graph for every decode step. On a GPU, reading the
            # position back would stall the launch queue at every layer, so eager keeps the mask there.)
            n = int(input_pos[-1]) + 1
            k, v, mask = k[:, :, :n], v[:, :, :n], mask[..., :n]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, c.heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.up_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.down_proj = nn.Linear(c.intermediate, c.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden, c.eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden, c.eps)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return h + self.mlp(self.post_attention_layernorm(h))


class Llama(nn.Module):
    """`model(tokens [batch, seq], input_pos [seq]) -> logits [batch, seq, vocab]` over a static KV cache.

    Parameter names follow Hugging Face's LlamaForCausalLM (`model.layers.N.self_attn.q_proj.weight`, ...).
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab, config.hidden)
        self.model.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.layers))
        self.model.norm = RMSNorm(config.hidden, config.eps)
        self.lm_head = nn.Linear(config.hidden, config.vocab, bias=False)
        self.tie_weights()
        self.batch_size = 0
        n = config.max_seq_len
        self.register_buffer("rope_cos", torch.empty(n, config.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(n, config.head_dim), persistent=False)
        self.register_buffer("causal_mask", torch.empty(n, n, dtype=torch.bool), persistent=False)
        if self.rope_cos.device.type != "meta":
            self.init_buffers()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config says so (again after `to_empty`)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_buffers(self) -> None:
        """Compute the RoPE tables and the causal mask (after `to_empty`, which leaves buffers unset)."""
        c = self.config
        angles = torch.outer(torch.arange(c.max_seq_len, dtype=torch.float32), rope_frequencies(c))
        angles = torch.cat((angles, angles), dim=-1)
        with torch.no_grad():
            self.rope_cos.copy_(angles.cos())
            self.rope_sin.copy_(angles.sin())
            self.causal_mask.fill_(True).tril_()  # in place: no second max_seq_len^2 temporary

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def setup_caches(self, batch: int) -> None:
        """Allocate the KV caches for `batch` sequences of up to `config.max_seq_len` tokens, or zero the
        existing ones (same objects, so compiled graphs guarding on them stay valid)."""
        c = self.config
        device = self.lm_head.weight.device
        for layer in self.model.layers:
            cache = layer.self_attn.kv_cache
            if (cache is not None and cache.k.shape[0] == batch and cache.k.dtype == self.dtype
                    and cache.k.device == device):
                cache.k.zero_()
                cache.v.zero_()
            else:
                layer.self_attn.kv_cache = KVCache(batch, c.kv_heads, c.max_seq_len, c.head_dim, self.dtype, device)
        self.batch_size = batch

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, last_only: bool = False,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for every position, for the last one only (`last_only`, what generation needs), or for the
        sequence indices in `logits_at` (a 1-D int64 tensor on the tokens' device; [batch, len(logits_at), vocab]):
        the last real token of a prompt padded to a prefill bucket. An index tensor, not an int, so that one
        compiled graph serves every index."""
        if tokens.dim() != 2 or tokens.shape[0] != self.batch_size:
            raise ValueError(f"tokens must be [batch={self.batch_size}, seq], got {tuple(tokens.shape)}; "
                             "call setup_caches(batch) first")
        if last_only and logits_at is not None:
            raise ValueError("pass last_only or logits_at, not both")
        if not torch.compiler.is_compiling():
            self._check_positions(input_pos, tokens.shape[1])
            if logits_at is not None:
                self._check_logits_at(logits_at, tokens.shape[1])
        x = self.model.embed_tokens(tokens)
        cos = self.rope_cos[input_pos].to(x.dtype)
        sin = self.rope_sin[input_pos].to(x.dtype)
        mask = self.causal_mask[None, None, input_pos]
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, input_pos)
        if logits_at is not None:
            x = x.index_select(1, logits_at)
        elif last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    @staticmethod
    def _check_logits_at(logits_at: torch.Tensor, seq: int) -> None:
        """Refuse indices that are not sequence positions of this call (eager only; values on the CPU only)."""
        if logits_at.dim() != 1 or logits_at.numel() < 1 or logits_at.dtype != torch.int64:
            raise ValueError(f"logits_at must be a 1-D int64 tensor of sequence indices, got {logits_at.dtype} of "
                             f"shape {tuple(logits_at.shape)}")
        if logits_at.device.type == "cpu" and not (0 <= int(logits_at.min()) and int(logits_at.max()) < seq):
            raise ValueError(f"logits_at {logits_at.tolist()} must lie in [0, {seq}) (the call's sequence length)")

    def _check_positions(self, input_pos: torch.Tensor, seq: int) -> None:
        """Refuse positions the static cache cannot take; eager only (a compiled graph traces no checks).
        Values are checked on the CPU only: on a GPU that would stall the launch queue at every step."""
        if input_pos.dim() != 1 or input_pos.numel() != seq or input_pos.dtype != torch.int64:
            raise ValueError(f"input_pos must be a 1-D int64 tensor of {seq} positions (one per token), got "
                             f"{input_pos.dtype} of shape {tuple(input_pos.shape)}")
        if input_pos.device.type != "cpu":
            return
        limit = self.config.max_seq_len
        if int(input_pos.min()) < 0 or int(input_pos.max()) >= limit:
            raise ValueError(f"input_pos {input_pos.tolist()} must lie in [0, max_seq_len={limit})")
        if seq > 1 and not bool((input_pos[1:] > input_pos[:-1]).all()):
            raise ValueError(f"input_pos {input_pos.tolist()} must be strictly increasing")


def build_llama(config: LlamaConfig | str, dtype: str | torch.dtype = "bf16", seed: int = 0) -> Llama:
    """A Llama with random weights (std 0.02, RMSNorm weights near 1), deterministic in `seed`."""
    cfg = get_config(config) if isinstance(config, str) else config
    with torch.device("meta"):
        model = Llama(cfg).to(torch_dtype(dtype) if isinstance(dtype, str) else dtype)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                _fill_normal(p, 0.02, gen)
        model.init_buffers()
    return model


def _fill_normal(p: torch.Tensor, std: float, gen: torch.Generator, chunk: int = 1 << 24) -> None:
    flat = p.view(-1)
    for i in range(0, flat.numel(), chunk):
        piece = flat[i : i + chunk]
        piece.copy_(torch.randn(piece.numel(), generator=gen) * std)
