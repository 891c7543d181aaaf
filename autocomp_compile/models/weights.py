"""Weights for the compact Llama: a local Hugging Face directory or safetensors files (nothing is
downloaded), or random weights (`build_llama`)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open

from autocomp_compile.models.llama import Llama, LlamaConfig
from autocomp_compile.workload import WorkloadError, torch_dtype


REQUIRED_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
LLAMA3_ROPE_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _check_llama(hf: dict[str, Any]) -> None:
    """Refuse configs of other models or of a Llama this implementation would compute differently."""
    if "model_type" in hf:
        if hf["model_type"] != "llama":
            raise WorkloadError(f"not a Llama checkpoint: model_type {hf['model_type']!r}")
    elif hf.get("architectures") not in (None, ["LlamaForCausalLM"]):
        raise WorkloadError(f"not a Llama checkpoint: architectures {hf['architectures']!r}")
    act = hf.get("hidden_act") or "silu"
    if act not in ("silu", "swish"):  # transformers maps both names to SiLU
        raise WorkloadError(f"hidden_act {act!r} is not supported (silu is)")
    biased = [k for k in ("attention_bias", "mlp_bias") if hf.get(k)]
    if biased:
        raise WorkloadError(f"{' and '.join(biased)}: projections with biases are not supported")


def _rope_scaling(scaling: dict[str, Any] | None) -> tuple[float, float, float, int] | None:
    """Llama-3 RoPE scaling parameters from `rope_scaling`/`rope_parameters`; None for plain RoPE."""
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind is None and set(scaling) - {"rope_theta"}:
        raise WorkloadError(f"RoPE scaling {scaling!r} names no rope_type (or type)")
    kind = kind or "default"
    if kind not in ("llama3", "default"):
        raise WorkloadError(f"RoPE scaling {kind!r} is not supported (llama3 and default are)")
    if kind == "default":
        return None
    missing = [k for k in LLAMA3_ROPE_FIELDS if scaling.get(k) is None]
    if missing:
        raise WorkloadError(f"llama3 RoPE scaling lacks {missing}")
    return (float(scaling["factor"]), float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))


def _field(hf: dict[str, Any], name: str, default: Any) -> Any:
    """`hf[name]`, or transformers' `LlamaConfig` default where the field is absent or null."""
    return default if hf.get(name) is None else hf[name]


def config_from_hf(hf: dict[str, Any], max_seq_len: int | None = None) -> LlamaConfig:
    """A LlamaConfig from a Hugging Face `config.json` dict (Llama 2/3/3.1/3.2 layouts)."""
    _check_llama(hf)
    # transformers < 5 writes rope_theta and rope_scaling; transformers 5 writes both into rope_parameters.
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or None
    rope_theta = hf.get("rope_theta") or (scaling or {}).get("rope_theta") or 10000.0
    rope_scaling = _rope_scaling(scaling)
    missing = [k for k in REQUIRED_FIELDS if hf.get(k) is None]
    if missing:
        raise WorkloadError(f"config.json lacks {missing}")
    heads = hf["num_attention_heads"]
    return LlamaConfig(
        hidden=hf["hidden_size"], intermediate=hf["intermediate_size"], heads=heads,
        kv_heads=_field(hf, "num_key_value_heads", heads), head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab=hf["vocab_size"], layers=hf["num_hidden_layers"], eps=_field(hf, "rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta), rope_scaling=rope_scaling,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        max_seq_len=min(_field(hf, "max_position_embeddings", 2048), 2048) if max_seq_len is None else max_seq_len,
    )


def _index_tensors(files: Sequence[str | Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Where each tensor of `files` is and its shape, read from the headers (no tensor data); a tensor name
    found in two files is an error, not a silent override."""
    where: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in map(Path, files):
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                if name in where:
                    raise WorkloadError(f"tensor {name!r} is in both {where[name][0].name} and {f.name}")
                where[name] = (f, tuple(handle.get_slice(name).get_shape()))
    return where


def load_safetensors(config: LlamaConfig, files: Sequence[str | Path], dtype: str = "bf16") -> Llama:
    """The compact Llama with weights from safetensors files named like Hugging Face's checkpoints.

    Everything is checked against the headers first; then the tensors are copied in one at a time, so that
    the peak memory is the model plus one tensor, not the model plus the checkpoint."""
    model_dtype = torch_dtype(dtype)
    where = _index_tensors(files)
    if config.tie_embeddings:
        where.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Llama(config).to(model_dtype)
    params = dict(model.named_parameters())
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(where)), sorted(k for k in set(where) - expected
                                                                 if not k.endswith("rotary_emb.inv_freq"))
    if config.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise WorkloadError(f"checkpoint does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, (_, shape) in where.items():
        if name in params and shape != tuple(params[name].shape):
            raise WorkloadError(f"{name}: checkpoint shape {shape} != {tuple(params[name].shape)}")
    model = model.to_empty(device="cpu")
    model.tie_weights()
    model.init_buffers()
    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for name, (f, _) in where.items():
        if name in params:
            by_file.setdefault(f, []).append(name)
    with torch.no_grad():
        for f, names in by_file.items():
            with safe_open(str(f), framework="pt") as handle:
                for name in names:
                    params[name].copy_(handle.get_tensor(name))
    return model


def load_pretrained(path: str | Path, dtype: str = "bf16", max_seq_len: int | None = None) -> Llama:
    """Load a local Hugging Face Llama directory (config.json + *.safetensors). The KV cache holds
    `max_seq_len` positions: by default the checkpoint's `max_position_embeddings`, capped at 2048 (the static
    cache and causal mask are allocated whole); pass a larger value for longer contexts."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise WorkloadError(f"{root}: no config.json; pass a local Hugging Face model directory "
                            "(nothing is downloaded), or use random weights")
    config = config_from_hf(json.loads((root / "config.json").read_text()), max_seq_len)
    return load_safetensors(config, checkpoint_files(root), dtype)


def checkpoint_files(root: Path) -> list[Path]:
    """The safetensors files of a model directory: those its index's weight_map names, else all of them."""
    index = root / "model.safetensors.index.json"
    if not index.is_file():
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise WorkloadError(f"{root}: no *.safetensors files")
        return files
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise WorkloadError(f"{index}: not a safetensors index with a weight_map ({e})") from None
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise WorkloadError(f"{root}: shards listed in {index.name} are missing: {missing}")
    return [root / n for n in names]


def with_max_seq_len(config: LlamaConfig, max_seq_len: int) -> LlamaConfig:
    return dataclasses.replace(config, max_seq_len=max_seq_len)
