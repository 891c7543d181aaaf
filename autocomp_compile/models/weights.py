"""Weights for the compact Llama: a local Hugging Face directory or safetensors files (nothing is
downloaded), or random weights (`build_llama`)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file

from autocomp_compile.models.llama import Llama, LlamaConfig
from autocomp_compile.workload import DTYPES, WorkloadError


def config_from_hf(hf: dict[str, Any], max_seq_len: int | None = None) -> LlamaConfig:
    """A LlamaConfig from a Hugging Face `config.json` dict (Llama 2/3/3.1/3.2 layouts)."""
    if hf.get("model_type", "llama") != "llama":
        raise WorkloadError(f"not a Llama checkpoint: model_type {hf.get('model_type')!r}")
    # transformers < 5 writes rope_theta and rope_scaling; transformers 5 writes both into rope_parameters.
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or None
    rope_theta = hf.get("rope_theta") or (scaling or {}).get("rope_theta") or 10000.0
    rope_scaling = None
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("llama3", "default"):
            raise WorkloadError(f"RoPE scaling {kind!r} is not supported (llama3 and default are)")
        if kind == "llama3":
            rope_scaling = (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                            float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
    heads = hf["num_attention_heads"]
    return LlamaConfig(
        hidden=hf["hidden_size"], intermediate=hf["intermediate_size"], heads=heads,
        kv_heads=hf.get("num_key_value_heads", heads), head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab=hf["vocab_size"], layers=hf["num_hidden_layers"], eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope_theta), rope_scaling=rope_scaling,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        max_seq_len=max_seq_len or min(hf.get("max_position_embeddings", 2048), 2048),
    )


def load_safetensors(config: LlamaConfig, files: Sequence[str | Path], dtype: str = "bf16") -> Llama:
    """The compact Llama with weights from safetensors files named like Hugging Face's checkpoints."""
    torch_dtype = DTYPES[dtype]
    with torch.device("meta"):
        model = Llama(config).to(torch_dtype)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    model.init_buffers()
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(k for k in set(state) - expected
                                                                 if not k.endswith("rotary_emb.inv_freq"))
    if config.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise WorkloadError(f"checkpoint does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in state.items():
            if name in params:
                if tuple(value.shape) != tuple(params[name].shape):
                    raise WorkloadError(f"{name}: checkpoint shape {tuple(value.shape)} != {tuple(params[name].shape)}")
                params[name].copy_(value)
    return model


def load_pretrained(path: str | Path, dtype: str = "bf16", max_seq_len: int | None = None) -> Llama:
    """Load a local Hugging Face Llama directory (config.json + *.safetensors)."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise WorkloadError(f"{root}: no config.json; pass a local Hugging Face model directory "
                            "(nothing is downloaded), or use random weights")
    config = config_from_hf(json.loads((root / "config.json").read_text()), max_seq_len)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise WorkloadError(f"{root}: no *.safetensors files")
    return load_safetensors(config, files, dtype)


def with_max_seq_len(config: LlamaConfig, max_seq_len: int) -> LlamaConfig:
    return dataclasses.replace(config, max_seq_len=max_seq_len)
