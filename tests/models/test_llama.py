"""The compact Llama: shapes, static KV cache, greedy generation, Hugging Face weights and equivalence."""
from __future__ import annotations

import json

import pytest
import torch

from autocomp_compile.models import build_llama, config_from_hf, generate, get_config, load_pretrained
from autocomp_compile.models.generate import PrefillChunk, prefill_chunks
from autocomp_compile.models.llama import LlamaConfig, rope_frequencies
from autocomp_compile.workload import WorkloadError


def test_unknown_model_and_bad_config_are_clear_errors():
    with pytest.raises(WorkloadError, match="unknown model"):
        get_config("llama-9000")
    with pytest.raises(WorkloadError, match="multiple of kv_heads"):
        LlamaConfig(hidden=64, intermediate=128, heads=4, kv_heads=3, head_dim=16, vocab=10, layers=1)


def test_forward_shapes_last_only_and_logits_at():
    model = build_llama("tiny-llama", "fp32")
    model.setup_caches(2)
    tokens = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        full = model(tokens, torch.arange(6))
        model.setup_caches(2)
        last = model(tokens, torch.arange(6), last_only=True)
        model.setup_caches(2)
        picked = model(tokens, torch.arange(6), logits_at=torch.tensor([3, 0]))
    assert full.shape == (2, 6, 256) and last.shape == (2, 1, 256) and picked.shape == (2, 2, 256)
    torch.testing.assert_close(last[:, 0], full[:, -1])
    torch.testing.assert_close(picked, full[:, [3, 0]])
    with pytest.raises(ValueError, match=r"logits_at \[6\] must lie in \[0, 6\)"):
        model(tokens, torch.arange(6), logits_at=torch.tensor([6]))
    with pytest.raises(ValueError, match="1-D int64"):
        model(tokens, torch.arange(6), logits_at=torch.tensor(2))
    with pytest.raises(ValueError, match="not both"):
        model(tokens, torch.arange(6), last_only=True, logits_at=torch.tensor([5]))


def test_forward_requires_caches_for_the_batch():
    model = build_llama("tiny-llama", "fp32")
    with pytest.raises(ValueError, match="setup_caches"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))


def test_decode_with_cache_matches_full_recompute():
    """Token-by-token decoding over the static cache gives the logits of one full forward pass."""
    model = build_llama("tiny-llama", "fp32", seed=3)
    tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.setup_caches(1)
        full = model(tokens, torch.arange(9))
        model.setup_caches(1)
        model(tokens[:, :4], torch.arange(4))
        steps = [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 4:], rtol=1e-5, atol=1e-5)


def test_setup_caches_reuses_buffers_of_the_same_batch():
    model = build_llama("tiny-llama", "fp32")
    model.setup_caches(1)
    cache = model.model.layers[0].self_attn.kv_cache
    cache.k.fill_(1.0)
    model.setup_caches(1)
    assert model.model.layers[0].self_attn.kv_cache is cache and not cache.k.any()
    model.setup_caches(2)
    assert model.model.layers[0].self_attn.kv_cache.k.shape[0] == 2


def test_generate_is_deterministic_and_checks_lengths():
    model = build_llama("tiny-llama", "fp32", seed=1)
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    a, b = generate(model, prompt, 8), generate(model, prompt, 8)
    assert a.tokens.shape == (2, 8) and torch.equal(a.tokens, b.tokens)
    assert len(a.decode_s) == 7 and a.decode_tokens_per_s > 0
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, prompt, 1000)
    full = torch.zeros(1, 100, dtype=torch.long)  # 100 + 29 tokens write positions up to 127: the whole cache
    assert generate(model, full, 29).tokens.shape == (1, 29)
    with pytest.raises(ValueError, match=r"need 129 cache positions, more than max_seq_len \(128\)"):
        generate(model, full, 30)
    with pytest.raises(ValueError, match="prompt must be"):
        generate(model, torch.zeros(3, dtype=torch.long), 2)


def test_random_weights_are_seeded():
    a = build_llama("tiny-llama", "bf16", seed=0)
    b = build_llama("tiny-llama", "bf16", seed=0)
    c = build_llama("tiny-llama", "bf16", seed=1)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert wa.dtype == torch.bfloat16 and torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_llama3_rope_scaling_keeps_high_frequencies_and_scales_low_ones():
    cfg = get_config("llama-3.2-1b")
    plain = rope_frequencies(LlamaConfig(**{**cfg.to_dict(), "rope_scaling": None}))
    scaled = rope_frequencies(cfg)
    assert torch.equal(scaled[:4], plain[:4])  # short wavelengths untouched
    torch.testing.assert_close(scaled[-1], plain[-1] / 32)  # longest wavelengths divided by the factor


def _hf_tiny(tmp_path, tie: bool = False, **overrides):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**{
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 128, "tie_word_embeddings": tie,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32},
        "attn_implementation": "sdpa", **overrides,
    })
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("tie", [False, True])
def test_hugging_face_weights_give_hugging_face_logits(tmp_path, tie):
    hf = _hf_tiny(tmp_path, tie)
    ours = load_pretrained(tmp_path, "fp32")
    assert ours.config.rope_scaling == (8.0, 1.0, 4.0, 32) and ours.config.tie_embeddings == tie
    tokens = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))  # past the original 32
    ours.setup_caches(1)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens, torch.arange(40)), hf(tokens).logits, rtol=1e-4, atol=1e-4)


def test_incremental_decode_matches_hugging_face_full_forward(tmp_path):
    """Batch 2, a head_dim other than hidden/heads, a one-token prompt, then decode steps up to the last
    cache position: each step's logits equal those of Hugging Face's forward over the whole sequence."""
    hf = _hf_tiny(tmp_path, head_dim=24, max_position_embeddings=48)
    ours = load_pretrained(tmp_path, "fp32")
    assert ours.config.head_dim == 24 and ours.config.max_seq_len == 48
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        ours.setup_caches(2)
        steps = [ours(tokens[:, :1], torch.arange(1))]
        steps += [ours(tokens[:, p:p + 1], torch.tensor([p])) for p in range(1, 48)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-4, atol=1e-4)


def test_load_pretrained_errors(tmp_path):
    with pytest.raises(WorkloadError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                                      "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": 8}))
    with pytest.raises(WorkloadError, match="no \\*.safetensors"):
        load_pretrained(tmp_path)
    with pytest.raises(WorkloadError, match="not a Llama"):
        config_from_hf({"model_type": "mistral"})
    with pytest.raises(WorkloadError, match="not supported"):
        config_from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}, "num_attention_heads": 4})


def test_generate_runs_the_prompt_through_prefill_forward():
    model = build_llama("tiny-llama", "fp32", seed=1)
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    seen = []

    def prefill(tokens, pos, last_only):
        seen.append(tokens.shape[1])
        return model(tokens, pos, last_only=last_only)

    g = generate(model, prompt, 4, prefill_forward=prefill)
    assert seen == [5]  # the prompt only; the decode steps used the model
    assert torch.equal(g.tokens, generate(model, prompt, 4).tokens)


@pytest.mark.parametrize("length, buckets, chunks", [
    (5, (), [(0, 5, 5)]),
    (1, (8, 4), [(0, 1, 4)]),
    (5, (4, 8), [(0, 5, 8)]),
    (8, (4, 8), [(0, 8, 8)]),
    (13, (4, 8, 8), [(0, 8, 8), (8, 5, 8)]),
    (18, (4, 8), [(0, 8, 8), (8, 8, 8), (16, 2, 4)]),
    (122, (48,), [(0, 48, 48), (48, 48, 48), (96, 26, 26)]),  # a pad to 144 would run past the 128 positions
])
def test_prefill_chunks_pad_to_the_smallest_bucket_and_split_at_the_largest(length, buckets, chunks):
    assert prefill_chunks(length, buckets, max_seq_len=128) == [PrefillChunk(*c) for c in chunks]


def test_prefill_buckets_may_be_numpy_integers():
    import numpy as np

    chunks = prefill_chunks(13, np.array([4, 8]), max_seq_len=128)
    assert chunks == [PrefillChunk(0, 8, 8), PrefillChunk(8, 5, 8)] and type(chunks[0].padded) is int
    model = build_llama("tiny-llama", "fp32", seed=2)
    prompt = torch.randint(0, 256, (1, 13), generator=torch.Generator().manual_seed(0))
    assert torch.equal(generate(model, prompt, 3, prefill_buckets=np.array([4, 8])).tokens,
                       generate(model, prompt, 3).tokens)


@pytest.mark.parametrize("buckets", [(0,), (8, 129), (4.0,), (True,)])
def test_prefill_buckets_outside_the_cache_are_refused_before_anything_runs(buckets):
    model = build_llama("tiny-llama", "fp32")
    ran = []
    with pytest.raises(ValueError, match=r"prefill buckets must be integers in \[1, max_seq_len=128\]"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 2, forward=lambda *a, **k: ran.append(a),
                 prefill_buckets=buckets)
    assert not ran


@pytest.mark.parametrize("length", [1, 5, 8, 13, 30, 122])
def test_bucketed_prefill_decodes_the_unpadded_tokens_and_logits(length):
    """Right padding is exact: no real token attends to a pad, and decoding overwrites each padded cache position
    before reading it (after 122 tokens, the last chunk runs unpadded: a pad would pass the 128 positions)."""
    model = build_llama("tiny-llama", "fp32", seed=2)
    prompt = torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(length))
    steps = min(6, 129 - length)
    plain = generate(model, prompt, steps, keep_logits=True)
    for buckets in ((4, 8), (48,)):
        padded = generate(model, prompt, steps, keep_logits=True, prefill_buckets=buckets)
        assert torch.equal(padded.tokens, plain.tokens)
        for a, b in zip(padded.logits, plain.logits):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_prefill_buckets_compile_one_graph_per_bucket():
    """With buckets, prompts of any length reuse the bucket's compiled prefill graph (dynamic=False)."""
    torch._dynamo.reset()
    model = build_llama("tiny-llama", "fp32", seed=0)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(example_inputs)
        return gm.forward

    compiled = torch.compile(model, backend=counting, dynamic=False)
    for length in (3, 6, 8, 11):
        prompt = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(length))
        got = generate(model, prompt, 3, forward=compiled, prefill_buckets=(8,))
        assert torch.equal(got.tokens, generate(model, prompt, 3).tokens)
    assert len(graphs) == 2  # the 8-token prefill and the 1-token decode step
    torch._dynamo.reset()
