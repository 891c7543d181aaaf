"""Hugging Face `LlamaForCausalLM` for `benchmarks/e2e.py --hf`: the model users run, with the compact model's
weights, decoding greedily over a `StaticCache` (its KV length is fixed, so decode attention has static shapes
and the backend can replace it; over a `DynamicCache` it stays with PyTorch), timed per step as
`autocomp_compile.models.generate` times the compact model.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch

from autocomp_compile.models.generate import Generation, timed_greedy
from autocomp_compile.models.llama import Llama, LlamaConfig


def hf_config(cfg: LlamaConfig, torch_dtype: torch.dtype) -> Any:
    """The `transformers.LlamaConfig` of a compact config (what `config_from_hf` reads back)."""
    import transformers

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        factor, low, high, original = cfg.rope_scaling
        rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                    original_max_position_embeddings=original)
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
        num_hidden_layers=cfg.layers, rms_norm_eps=cfg.eps, rope_parameters=rope,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa", dtype=torch_dtype)


def hf_llama(model: Llama) -> torch.nn.Module:
    """A `LlamaForCausalLM` holding `model`'s weights (the same tensors: nothing is copied), in eval mode."""
    import transformers

    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_config(model.config, dtype)).to(dtype)
    names = {name for name, _ in hf.named_parameters()}
    params = {k: v for k, v in model.state_dict().items() if k in names}
    missing = names - set(params)
    if missing - {"lm_head.weight"} or (missing and not model.config.tie_embeddings):
        raise ValueError(f"the compact model lacks Hugging Face parameters {sorted(missing)[:5]}")
    hf.load_state_dict(params, strict=False, assign=True)
    if model.config.tie_embeddings:
        hf.tie_weights()
    # buffers (RoPE's inv_freq) are not in the compact model's state dict: computed again, off the meta device
    with torch.device(next(model.parameters()).device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config)
    return hf.eval()


def _cache(hf: torch.nn.Module, batch: int) -> Any:
    """The model's `StaticCache` for `batch` sequences (one per model and batch size, made on first use)."""
    import transformers

    caches = hf.__dict__.setdefault("_benchmark_caches", {})
    if batch not in caches:
        caches[batch] = transformers.StaticCache(config=hf.config, max_cache_len=hf.config.max_position_embeddings)
    return caches[batch]


@functools.cache
def _takes_cache(model_type: type) -> bool:
    """Whether this transformers version's forward takes `cache=` (5.x) rather than `past_key_values=` (read once
    per class: the signature costs ~40 us, which every timed step would pay)."""
    return "cache" in inspect.signature(model_type.forward).parameters


def cache_kwargs(hf: torch.nn.Module, cache: Any, positions: torch.Tensor) -> dict[str, Any]:
    """How this transformers version takes a cache: `cache=` (5.x: the cache counts its own positions) or
    `past_key_values=` with `cache_position=` (4.x)."""
    if _takes_cache(type(hf)):
        return {"cache": cache}
    return {"past_key_values": cache, "cache_position": positions}


def _forward(fn: Callable, hf: torch.nn.Module, cache: Any, ids: torch.Tensor, positions: torch.Tensor
             ) -> torch.Tensor:
    """`fn` (the model `hf` or a compiled one) on `ids` at cache `positions`: the last position's logits."""
    return fn(input_ids=ids, position_ids=positions[None].expand(ids.shape[0], -1), use_cache=True, logits_to_keep=1,
              **cache_kwargs(hf, cache, positions)).logits[:, -1]


def decode_step(hf: torch.nn.Module) -> Callable[[Callable, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A `(fn, tokens, positions) -> logits` call over the model's cache for `tokens`' batch, for e2e's breakdowns,
    which time single decode steps: the cache goes on from where the last generation left it (transformers 5
    caches count their own positions), so each call attends over a few more keys than `positions` says."""
    return lambda fn, tokens, positions: _forward(fn, hf, _cache(hf, tokens.shape[0]), tokens, positions)


@torch.no_grad()
def generate_hf(hf: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int, forward: Callable | None = None,
                keep_logits: bool = False, prefill_forward: Callable | None = None) -> Generation:
    """Greedy decoding of `max_new_tokens` (>= 1) tokens after `prompt` [batch, length], as `generate` does for the
    compact model: one `StaticCache` of `max_position_embeddings` positions per model and batch size, reset
    first; only the last position's logits are computed (`logits_to_keep=1`)."""
    batch, length = prompt.shape
    if max_new_tokens < 1 or length + max_new_tokens - 1 > hf.config.max_position_embeddings:
        raise ValueError(f"{max_new_tokens} new tokens after {length} do not fit the cache "
                         f"({hf.config.max_position_embeddings} positions)")
    forward = hf if forward is None else forward
    prefill_forward = forward if prefill_forward is None else prefill_forward
    cache = _cache(hf, batch)
    cache.reset()
    return timed_greedy(lambda ids, pos: _forward(prefill_forward, hf, cache, ids, pos),
                        lambda ids, pos: _forward(forward, hf, cache, ids, pos), prompt, max_new_tokens, keep_logits)
