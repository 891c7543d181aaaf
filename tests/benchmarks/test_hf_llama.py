"""benchmarks/hf_llama.py: transformers' LlamaForCausalLM on the compact model's weights, decoding over a
StaticCache as the compact model decodes (e2e.py --hf)."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from autocomp_compile.models import build_llama, generate, get_config
from autocomp_compile.models.weights import config_from_hf

pytest.importorskip("transformers", minversion="5.0")  # rope_parameters, dtype=, StaticCache(config=)
_spec = importlib.util.spec_from_file_location("hf_llama", Path(__file__).parents[2] / "benchmarks" / "hf_llama.py")
hf_llama = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("hf_llama", hf_llama)
_spec.loader.exec_module(hf_llama)


@pytest.mark.parametrize("name", ["tiny-llama", "llama-3.2-1b"])
def test_the_config_reads_back_as_the_compact_one(name):
    cfg = get_config(name)
    assert config_from_hf(hf_llama.hf_config(cfg, torch.bfloat16).to_dict()) == cfg


@pytest.mark.parametrize("tie", [False, True])
def test_same_weights_same_greedy_tokens_and_logits(tie):
    model = build_llama(dataclasses.replace(get_config("tiny-llama"), tie_embeddings=tie), "fp32", seed=0)
    hf = hf_llama.hf_llama(model)
    assert hf.model.layers[0].mlp.up_proj.weight.data_ptr() == model.model.layers[0].mlp.up_proj.weight.data_ptr()
    assert hf.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tie
    prompt = torch.randint(0, model.config.vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    want = generate(model, prompt, 10, keep_logits=True)
    for _ in range(2):  # the second run reuses (and resets) the model's cache
        got = hf_llama.generate_hf(hf, prompt, 10, keep_logits=True)
        assert torch.equal(got.tokens, want.tokens) and len(got.decode_s) == 9
        for a, b in zip(got.logits, want.logits):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_decode_step_is_a_step_of_generate():
    model = build_llama("tiny-llama", "fp32", seed=0)
    hf = hf_llama.hf_llama(model)
    prompt = torch.randint(0, model.config.vocab, (1, 5), generator=torch.Generator().manual_seed(1))
    got = hf_llama.generate_hf(hf, prompt, 2, keep_logits=True)
    hf_llama.generate_hf(hf, prompt, 1)  # the cache holds the prompt again
    with torch.no_grad():
        step = hf_llama.decode_step(hf)(hf, got.tokens[:, :1], torch.tensor([5]))
    torch.testing.assert_close(step, got.logits[1])


def test_generation_past_the_cache_is_refused():
    model = build_llama("tiny-llama", "fp32", seed=0)
    hf = hf_llama.hf_llama(model)
    prompt = torch.zeros(1, model.config.max_seq_len, dtype=torch.long)
    with pytest.raises(ValueError, match="do not fit the cache"):
        hf_llama.generate_hf(hf, prompt, 2)
