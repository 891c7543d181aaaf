"""benchmarks/e2e.py: which model every variant runs (random weights, or a local checkpoint of --model's shapes)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from autocomp_compile.models import build_llama

_bench = Path(__file__).parents[2] / "benchmarks"


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, _bench / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# e2e.py imports its sibling as a script would (benchmarks/ first on sys.path); putting benchmarks/ on the path
# here would let benchmarks/tvm.py shadow the tvm package for every later test
_load("peer_llama_cpp", "peer_llama_cpp.py")
e2e = _load("e2e_benchmark", "e2e.py")


def _checkpoint(root: Path, seed: int) -> torch.nn.Module:
    model = build_llama("tiny-llama", "fp32", seed=seed)
    c = model.config
    root.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": c.hidden, "intermediate_size": c.intermediate,
        "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads, "num_hidden_layers": c.layers,
        "vocab_size": c.vocab, "rms_norm_eps": c.eps, "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_embeddings, "max_position_embeddings": c.max_seq_len}))
    return model


def test_weights_of_the_model_load_and_others_are_refused_before_any_work(tmp_path):
    saved = _checkpoint(tmp_path / "tiny", seed=5)
    assert e2e.weights_mismatch(str(tmp_path / "tiny"), "tiny-llama") is None
    assert "not a llama-3.2-1b: hidden 64 != 2048" in e2e.weights_mismatch(str(tmp_path / "tiny"), "llama-3.2-1b")
    assert "cannot read" in e2e.weights_mismatch(str(tmp_path / "none"), "tiny-llama")
    args = argparse.Namespace(model="tiny-llama", weights=str(tmp_path / "tiny"), dtype="fp32")
    loaded = e2e.load_model(args)
    assert torch.equal(loaded.lm_head.weight, saved.lm_head.weight)
    random = e2e.load_model(argparse.Namespace(model="tiny-llama", weights=None, dtype="fp32"))
    assert torch.equal(random.lm_head.weight, build_llama("tiny-llama", "fp32", seed=0).lm_head.weight)
