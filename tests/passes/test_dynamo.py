"""The autocomp torch.compile backend, end to end on the tiny Llama (compact and Hugging Face):
kernels found by search replace the subgraphs, tokens stay those of eager, decoding never recompiles."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import autocomp_compile  # noqa: F401  (registers the backend)
from autocomp_compile.kernels_cache.store import KernelCache
from autocomp_compile.models import build_llama, generate
from autocomp_compile.passes.dynamo import BackendOptions, BackendOptionsError, reports
from autocomp_compile.passes.kernels import REGISTRY
from tests.helpers import SwiGLU


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("backend")
    return {"cache_dir": str(root / "cache"), "output_dir": str(root / "runs")}


def search_options(dirs, **extra):
    # min_speedup 0: at these tiny shapes PyTorch often wins; the test is about replacing and staying exact.
    # timing_ms 20: the tests need no precise ranking, and the default 1000 ms per candidate adds up.
    return {"mode": "search", "budget": 3, "min_speedup": 0.0, "timing_ms": 20, "verbose": False, **dirs, **extra}


def test_backend_is_registered_by_name():
    from torch._dynamo import list_backends

    assert "autocomp" in list_backends(exclude_tags=())


def test_option_errors_are_clear():
    with pytest.raises(BackendOptionsError, match="unknown autocomp option"):
        BackendOptions.parse({"budgett": 3})
    with pytest.raises(BackendOptionsError, match="mode"):
        BackendOptions.parse({"mode": "fast"})
    with pytest.raises(BackendOptionsError, match="kinds"):
        BackendOptions.parse({"kinds": ["conv"]})
    assert BackendOptions.parse(None).mode == "cache-only"
    assert BackendOptions.parse({"cudagraphs": True}).cudagraphs


@pytest.mark.parametrize("options, message", [
    ({"min_speedup": "x"}, "min_speedup must be a number, got 'x'"),
    ({"min_speedup": float("nan")}, "min_speedup must be a finite number >= 0"),
    ({"min_speedup": -1}, "min_speedup must be a finite number >= 0"),
    ({"budget": "3"}, "budget must be an int, got '3'"),
    ({"budget": 2.5}, "budget must be an int"),
    ({"budget": True}, "budget must be an int"),
    ({"seed": "x"}, "seed must be an int"),
    ({"verbose": "no"}, "verbose must be True or False, got 'no'"),
    ({"kinds": ["mlp", 3]}, "kinds must be kind names"),
    ({"models": [""]}, "an empty model name"),
    ({"deterministic": 1}, "deterministic must be True, False or None"),
    ({"target": 0}, "target must be a target name or None"),
    ({"kinds": 3}, "kinds must be a name or a list of names, got 3"),
    ({"timing_ms": "5"}, "timing_ms must be a number or None, got '5'"),
    ({"timing_ms": 0}, "timing_ms must be a finite number > 0"),
    ({"timing_ms": float("inf")}, "timing_ms must be a finite number > 0"),
])
def test_option_types_are_checked_before_any_work(options, message):
    with pytest.raises(BackendOptionsError, match=re.escape(message)):
        BackendOptions.parse(options)


def test_paths_and_numpy_numbers_are_taken(tmp_path):
    import numpy as np

    opts = BackendOptions.parse({"cache_dir": tmp_path / "c", "output_dir": tmp_path / "o", "min_speedup": 2,
                                 "budget": np.int64(4), "seed": np.int32(1), "kinds": {"mlp"},
                                 "timing_ms": np.float32(50)})
    assert (opts.cache_dir, opts.output_dir) == (str(tmp_path / "c"), str(tmp_path / "o"))
    assert (opts.budget, opts.seed, opts.min_speedup, opts.kinds, opts.timing_ms) == (4, 1, 2.0, ("mlp",), 50.0)
    assert type(opts.budget) is int and type(opts.min_speedup) is float and type(opts.timing_ms) is float
    assert BackendOptions.parse({"timing_ms": None}).timing_ms is None


def test_reduce_overhead_mode_is_accepted_and_other_torch_modes_are_refused(dirs):
    torch._dynamo.reset()
    model = build_llama("tiny-llama", "fp32", seed=0)
    prompt = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(0))
    # On the CPU inductor skips CUDA graphs: the result must simply be eager's.
    compiled = torch.compile(model, backend="autocomp", dynamic=False, mode="reduce-overhead")
    assert torch.equal(generate(model, prompt, 3, forward=compiled).tokens, generate(model, prompt, 3).tokens)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="autocomp", dynamic=False, mode="max-autotune")
    with pytest.raises(Exception, match="not supported"):
        generate(model, prompt, 2, forward=compiled)


def test_compact_llama_search_mode_matches_eager_and_never_recompiles_while_decoding(dirs):
    torch._dynamo.reset()
    model = build_llama("tiny-llama", "fp32", seed=0)
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    eager = generate(model, prompt, 32, keep_logits=True)
    compiled = torch.compile(model, backend="autocomp", dynamic=False, options=search_options(dirs))
    generate(model, prompt, 3, forward=compiled)  # compiles prefill and decode, searching every workload
    n_reports = len(reports())
    got = generate(model, prompt, 32, forward=compiled, keep_logits=True)
    assert len(reports()) == n_reports, "decoding recompiled"
    assert torch.equal(got.tokens, eager.tokens)
    for a, b in zip(got.logits, eager.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    decode = [r for r in reports()[-2:] if any(d.workload.startswith("mlp_fp32_batch1_") for d in r.decisions)]
    assert decode, "no decode graph was compiled"
    replaced = {d.workload.split("_")[0] for d in decode[0].decisions if d.replaced}
    assert replaced == {"gemm", "mlp", "attention", "lm"}  # lm_head's name starts with "lm"
    # searched while compiling this graph, or while compiling the prefill graph that shares a workload
    assert {d.source for d in decode[0].decisions if d.replaced} <= {"search", "cache"}
    with KernelCache(Path(dirs["cache_dir"]) / "kernels.sqlite") as cache:  # what replaced a subgraph is cached
        assert all(cache.show(d.key) is not None and d.key in REGISTRY.keys()
                   for d in decode[0].decisions if d.replaced)
    configs = [json.loads(p.read_text()) for p in Path(dirs["output_dir"]).glob("*/config.json")]
    assert configs and all(c["eval"]["timing_budget_ms"] == 20 for c in configs)  # options["timing_ms"]


def test_prefill_buckets_serve_every_prompt_length_with_one_prefill_graph_and_its_kernels(dirs):
    torch._dynamo.reset()
    model = build_llama("tiny-llama", "fp32", seed=0)
    compiled = torch.compile(model, backend="autocomp", dynamic=False, options=search_options(dirs))
    before = len(reports())
    for length in (5, 8, 13):  # padded to 8; 8; 8 + 5 padded to 8 (a chunk at position 8: attention by PyTorch)
        prompt = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(length))
        got = generate(model, prompt, 4, forward=compiled, prefill_buckets=(8,), keep_logits=True)
        eager = generate(model, prompt, 4, keep_logits=True)
        assert torch.equal(got.tokens, eager.tokens)
        for a, b in zip(got.logits, eager.logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    graphs = reports()[before:]
    assert len(graphs) == 2, "a prompt length compiled a graph of its own"
    prefill = next(r for r in graphs if any(d.workload.startswith("mlp_fp32_batch8_") for d in r.decisions))
    # the LM head reads the last real token's row (index_select), as the decode graph's reads its one row
    assert {d.workload.split("_")[0] for d in prefill.decisions if d.replaced} >= {"mlp", "attention", "lm"}
    assert any(d.workload.startswith("lm_head_fp32_batch1_") and d.replaced for d in prefill.decisions)


def test_cache_only_reuses_the_searched_kernels_and_reports_misses(dirs):
    torch._dynamo.reset()
    model = build_llama("tiny-llama", "fp32", seed=0)
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    searched = torch.compile(model, backend="autocomp", dynamic=False, options=search_options(dirs))
    generate(model, prompt, 2, forward=searched)  # fills the cache (hits when an earlier test filled it)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="autocomp", dynamic=False,
                             options={"mode": "cache-only", "min_speedup": 0.0, "verbose": False, **dirs})
    eager = generate(model, prompt, 4)
    got = generate(model, prompt, 4, forward=compiled)
    assert torch.equal(got.tokens, eager.tokens)
    decisions = [d for r in reports()[-2:] for d in r.decisions]
    assert any(d.replaced and d.source == "cache" for d in decisions)
    assert all(not d.replaced for d in decisions if d.workload.startswith("rmsnorm"))
    # an empty cache: nothing is replaced, every miss says why, the output is still eager's
    torch._dynamo.reset()
    empty = torch.compile(model, backend="autocomp", dynamic=False,
                          options={"mode": "cache-only", "verbose": False, "cache_dir": dirs["cache_dir"] + "-empty"})
    assert torch.equal(generate(model, prompt, 4, forward=empty).tokens, eager.tokens)
    last = reports()[-1]
    assert last.replaced == 0 and all("not in the kernel cache" in d.reason or "rmsnorm" in d.reason
                                      for d in last.decisions)


def test_deterministic_mode_uses_the_cpu_kernels_it_already_has(dirs):
    """Under torch.use_deterministic_algorithms(True) the backend asks for deterministic kernels; every generated
    CPU kernel fixes its reduction order, so the CPU target is its own deterministic variant and the kernels
    cached by the test above replace the same subgraphs."""
    torch._dynamo.reset()
    model = build_llama("tiny-llama", "fp32", seed=0)
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    searched = torch.compile(model, backend="autocomp", dynamic=False, options=search_options(dirs))
    generate(model, prompt, 2, forward=searched)  # cache hits after the test above; a search when run alone
    torch._dynamo.reset()
    options = {"mode": "cache-only", "min_speedup": 0.0, "verbose": False, **dirs}
    plain = torch.compile(model, backend="autocomp", dynamic=False, options=options)
    generate(model, prompt, 2, forward=plain)
    replaced = {d.workload for r in reports()[-2:] for d in r.decisions if d.replaced}
    assert replaced
    torch._dynamo.reset()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        compiled = torch.compile(model, backend="autocomp", dynamic=False, options=options)
        assert torch.equal(generate(model, prompt, 2, forward=compiled).tokens, generate(model, prompt, 2).tokens)
    finally:
        torch.use_deterministic_algorithms(before)
    last = reports()[-2:]
    assert all(r.deterministic and "deterministic kernels only" in r.summary() for r in last)
    assert {d.workload for r in last for d in r.decisions if d.replaced} == replaced


def test_mode_off_is_inductor(dirs):
    torch._dynamo.reset()
    model = build_llama("tiny-llama", "fp32", seed=0)
    prompt = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(0))
    n = len(reports())
    compiled = torch.compile(model, backend="autocomp", dynamic=False, options={"mode": "off"})
    assert torch.equal(generate(model, prompt, 3, forward=compiled).tokens, generate(model, prompt, 3).tokens)
    assert len(reports()) == n


def cache_kwargs(hf, cache, positions):
    """transformers 5 takes `cache=` (the cache counts its own positions); 4.x `past_key_values=`, `cache_position=`."""
    import inspect

    if "cache" in inspect.signature(type(hf).forward).parameters:
        return {"cache": cache}
    return {"past_key_values": cache, "cache_position": positions}


def _tiny_hf_llama(minversion: str | None = None):
    transformers = pytest.importorskip("transformers", minversion=minversion)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers, transformers.LlamaForCausalLM(cfg).eval()


def _hf_greedy(fn, hf, prompt, cache, n):
    """`n` greedy tokens by `fn` (the model or a compiled one) over `cache`, and the logits of each step."""
    x, pos, toks, logits = prompt, torch.arange(prompt.shape[1]), [], []
    with torch.no_grad():
        for _ in range(n):
            out = fn(input_ids=x, use_cache=True, **cache_kwargs(hf, cache, pos)).logits[:, -1]
            logits.append(out)
            x, pos = out.argmax(-1, keepdim=True), pos[-1:] + 1
            toks.append(x)
    return torch.cat(toks, 1), logits


def test_hugging_face_llama_greedy_tokens_match_eager(dirs):
    transformers, hf = _tiny_hf_llama()
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))

    def greedy(fn, n=32):
        return _hf_greedy(fn, hf, prompt, transformers.DynamicCache(), n)

    torch._dynamo.reset()
    want, want_logits = greedy(hf)
    n = len(reports())
    got, got_logits = greedy(torch.compile(hf, backend="autocomp", options=search_options(dirs)))
    assert torch.equal(got, want)
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    replaced = {d.workload.split("_")[0] for r in reports()[n:] for d in r.decisions if d.replaced}
    assert {"mlp", "gemm", "lm"} <= replaced



def test_hugging_face_llama_with_a_static_cache_gets_decode_attention_too(dirs):
    """With `StaticCache` the KV length is fixed, so decode attention is replaced as well (with `DynamicCache` it
    stays with PyTorch), the tokens stay eager's, and decoding does not recompile."""
    transformers, hf = _tiny_hf_llama(minversion="5.0")  # StaticCache(config=, max_cache_len=)
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))

    def greedy(fn, n=16):
        return _hf_greedy(fn, hf, prompt, transformers.StaticCache(config=hf.config, max_cache_len=64), n)

    torch._dynamo.reset()
    want, want_logits = greedy(hf)
    compiled = torch.compile(hf, backend="autocomp", options=search_options(dirs))
    greedy(compiled, n=3)  # compiles prefill and decode
    n = len(reports())
    got, got_logits = greedy(compiled)
    assert len(reports()) == n, "decoding recompiled"
    assert torch.equal(got, want)
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    replaced = {d.workload for r in reports()[-2:] for d in r.decisions if d.replaced}
    assert "attention_fp32_decode_batch1_head_dim16_heads4_kv_heads2_kv_len32_max_kv_len64" in replaced
    assert {w.split("_")[0] for w in replaced} >= {"attention", "mlp", "gemm", "lm"}


def test_hugging_face_generate_compiles_its_forward_with_the_backend(dirs):
    """`generate(..., cache_implementation="static", compile_config=CompileConfig(backend="autocomp"))`: transformers
    compiles the decode forward with the backend (on the CPU only when asked: `_compile_all_devices`)."""
    transformers, hf = _tiny_hf_llama(minversion="5.0")  # CompileConfig, StaticCache(config=)
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=12, do_sample=False, cache_implementation="static")
        config = transformers.CompileConfig(backend="autocomp", mode=None, options=search_options(dirs))
        config._compile_all_devices = True
        n = len(reports())
        got = hf.generate(prompt, max_new_tokens=12, do_sample=False, cache_implementation="static",
                          compile_config=config)
    assert torch.equal(got, want)
    decisions = [d for r in reports()[n:] for d in r.decisions]
    assert any(d.replaced and d.workload.startswith("attention_fp32_decode") for d in decisions)



def test_llm_models_option_checks_credentials_when_the_backend_compiles(dirs, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    opts = BackendOptions.parse({"mode": "search", "models": "anthropic::claude-x", **dirs})
    assert opts.models == ("anthropic::claude-x",)
    from autocomp_compile.agents.llm_client import LLMConfigError
    from autocomp_compile.passes.dynamo import Rewriter
    from autocomp_compile.targets.base import get_target

    with pytest.raises(LLMConfigError, match="ANTHROPIC_API_KEY"):
        Rewriter(opts, get_target("cpu"))


def test_an_mlp_left_to_pytorch_releases_its_projections(tmp_path):
    """kinds without 'mlp', then a cache with gemm kernels but no MLP kernel: the projections are linears."""
    torch.manual_seed(0)
    model, x = SwiGLU().eval(), torch.randn(1, 64)
    dirs = {"cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "runs")}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="autocomp", dynamic=False, options=search_options(dirs, kinds=("gemm",)))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    decisions = reports()[-1].decisions
    assert sorted((d.kind, d.count, d.replaced) for d in decisions) == [
        ("gemm", 1, True), ("gemm", 2, True), ("mlp", 1, False)]
    torch._dynamo.reset()
    options = {"mode": "cache-only", "min_speedup": 0.0, "verbose": False, "kinds": ("mlp", "gemm"), **dirs}
    compiled = torch.compile(model, backend="autocomp", dynamic=False, options=options)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    report = reports()[-1]
    [mlp] = [d for d in report.decisions if d.kind == "mlp"]
    assert "not in the kernel cache" in mlp.reason and report.replaced == 3, report.summary()


def test_a_cache_that_cannot_be_opened_leaves_the_graph_to_pytorch(tmp_path):
    """A cache directory under a file (as under a read-only mount: it cannot be created): eager's output, every
    subgraph with that reason; the compile used to raise."""
    (tmp_path / "a-file").write_text("")
    torch._dynamo.reset()
    model = SwiGLU().eval()
    x = torch.randn(2, 64)
    compiled = torch.compile(model, backend="autocomp", dynamic=False,
                             options={"mode": "cache-only", "verbose": False,
                                      "cache_dir": str(tmp_path / "a-file" / "cache")})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    last = reports()[-1]
    assert last.decisions and all(not d.replaced and "cannot be opened" in d.reason for d in last.decisions)
    assert REGISTRY.get("0" * 16, str(tmp_path / "a-file" / "cache")) is None
    assert "cannot open the kernel cache" in REGISTRY.failure("0" * 16, str(tmp_path / "a-file" / "cache"))
