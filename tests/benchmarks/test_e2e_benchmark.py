"""benchmarks/e2e.py: which model every variant runs (random weights, or a local checkpoint of --model's shapes)."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from autocomp_compile.models import build_llama
from tests.helpers import hf_checkpoint, tiny_state

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
_load("hf_llama", "hf_llama.py")
e2e = _load("e2e_benchmark", "e2e.py")


def test_weights_of_the_model_load_and_others_are_refused_before_any_work(tmp_path):
    saved = tiny_state(5)
    hf_checkpoint(tmp_path / "tiny", saved)
    assert e2e.weights_mismatch(str(tmp_path / "tiny"), "tiny-llama") is None
    assert "not a llama-3.2-1b: hidden 64 != 2048" in e2e.weights_mismatch(str(tmp_path / "tiny"), "llama-3.2-1b")
    assert "cannot read" in e2e.weights_mismatch(str(tmp_path / "none"), "tiny-llama")
    args = argparse.Namespace(model="tiny-llama", weights=str(tmp_path / "tiny"), dtype="fp32")
    loaded = e2e.load_model(args)
    assert torch.equal(loaded.lm_head.weight, saved["lm_head.weight"])
    random = e2e.load_model(argparse.Namespace(model="tiny-llama", weights=None, dtype="fp32"))
    assert torch.equal(random.lm_head.weight, build_llama("tiny-llama", "fp32", seed=0).lm_head.weight)


def test_hf_with_llama_cpp_is_refused_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["e2e.py", "--model", "tiny-llama", "--hf", "--llama-cpp", "native"])
    with pytest.raises(SystemExit) as exit_info:
        e2e.main()
    assert exit_info.value.code == 2
    assert "--hf and --llama-cpp" in capsys.readouterr().err
