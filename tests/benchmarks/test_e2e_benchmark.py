"""benchmarks/e2e.py: which model every variant runs (random weights, or a local checkpoint of --model's shapes)."""
from __future__ import annotations

import argparse
import importlib.util
import re
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


@pytest.mark.parametrize("argv, message", [
    (["--prefill-buckets", "64", "--hf"], "not with --hf or --eager-prefill"),
    (["--prefill-buckets", "64", "--eager-prefill"], "not with --hf or --eager-prefill"),
    (["--prefill-buckets", "0"], r"--prefill-buckets must lie in \[1, 128\]"),
    (["--prefill-buckets", "129"], r"--prefill-buckets must lie in \[1, 128\]"),
])
def test_bad_prefill_buckets_are_refused_before_any_work(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sys, "argv", ["e2e.py", "--model", "tiny-llama", *argv])
    monkeypatch.setattr(e2e, "run", lambda args: pytest.fail("ran"))
    with pytest.raises(SystemExit) as exit_info:
        e2e.main()
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_warm_fills_the_buckets_the_prompt_runs_in(monkeypatch):
    warmed = []
    monkeypatch.setattr(sys, "argv", ["e2e.py", "--model", "tiny-llama", "--batch", "1", "--prompt-len", "21",
                                      "--prefill-buckets", "16", "8", "--warm", "4"])
    monkeypatch.setattr(e2e, "warm", lambda model, batch, lens, budget, target: warmed.append((batch, lens)))
    monkeypatch.setattr(e2e, "run", lambda args: (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit):
        e2e.main()
    assert warmed == [(1, [8, 16])]  # 21 tokens: a chunk of 16, then 5 padded to 8


def test_autocomp_runs_the_prompt_through_the_buckets(monkeypatch, tmp_path):
    """A tiny run (empty cache: autocomp falls back everywhere): the autocomp variant's prompt is padded, the others'
    is not, and its tokens are still eager's."""
    monkeypatch.setenv("AUTOCOMP_CACHE_DIR", str(tmp_path / "cache"))
    seen: dict[str, set] = {}
    real = e2e.generate

    def spy(model, prompt, steps, forward=None, prefill_forward=None, prefill_buckets=(), **kw):
        seen.setdefault(type(forward).__name__, set()).add(tuple(prefill_buckets))
        return real(model, prompt, steps, forward=forward, prefill_forward=prefill_forward,
                    prefill_buckets=prefill_buckets, **kw)

    monkeypatch.setattr(e2e, "generate", spy)
    torch._dynamo.reset()
    args = argparse.Namespace(model="tiny-llama", weights=None, dtype="fp32", device="cpu", batch=[1], prompt_len=5,
                              prompt_len_batched=4, decode_tokens=3, decode_tokens_batched=2, rounds=1,
                              rounds_batched=1, cudagraphs=False, eager_prefill=False, prefill_buckets=[8],
                              breakdown=False, verbose=False, llama_cpp=None, gguf_dir=None, hf=False, json_path=None)
    res = e2e.run(args)
    row = res["runs"][0]
    assert row["autocomp_prefill_chunks"] == [{"start": 0, "tokens": 5, "padded": 8}]
    assert row["autocomp"]["tokens_match_eager"] and res["autocomp_prefill_buckets"] == [8]
    # eager (the model) and one compiled variant (inductor) unpadded, the other (autocomp) padded
    assert seen == {"Llama": {()}, "OptimizedModule": {(), (8,)}}
    torch._dynamo.reset()
