"""Refusals of what the compact Llama would load or run wrongly: configs, checkpoint files, decode steps, lengths."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from autocomp_compile.models import build_llama, config_from_hf, generate, get_config, load_pretrained
from autocomp_compile.models.export import PastKVDecodeStep
from autocomp_compile.workload import WorkloadError
from tests.helpers import TINY_HF, hf_checkpoint, tiny_state

@pytest.mark.parametrize("change, match", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": None, "architectures": ["MistralForCausalLM"]}, "architectures"),
    ({"hidden_size": None}, "lacks \\['hidden_size'\\]"),
    ({"rope_scaling": {"factor": 2.0}}, "no rope_type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks \\['low_freq_factor'"),
    ({"attention_bias": True}, "attention_bias: projections with biases"),
    ({"mlp_bias": True}, "mlp_bias: projections with biases"),
])
def test_config_refusals(change, match):
    hf = {k: v for k, v in {**TINY_HF, **change}.items() if v is not None}
    with pytest.raises(WorkloadError, match=match):
        config_from_hf(hf)


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "vocab_size", "num_hidden_layers",
                                   "intermediate_size"])
def test_missing_required_fields_are_named(field):
    with pytest.raises(WorkloadError, match=field):
        config_from_hf({k: v for k, v in TINY_HF.items() if k != field})


def test_config_defaults_silu_mha_and_llama_architecture():
    hf = {k: v for k, v in TINY_HF.items() if k not in ("model_type", "hidden_act")}
    assert config_from_hf({**hf, "num_key_value_heads": None}).kv_heads == 4  # null is absent: MHA
    assert config_from_hf(hf).kv_heads == 2
    assert config_from_hf({**hf, "max_position_embeddings": None}).max_seq_len == 2048  # transformers' default
    assert config_from_hf({**hf, "hidden_act": "swish"}) == config_from_hf(hf)  # transformers' SiLU too


@pytest.mark.parametrize("positions, match", [
    ([126, 127, 128], "must lie in \\[0, max_seq_len=128\\)"),
    ([-3, -2, -1], "must lie in"),
    ([2, 0, 1], "strictly increasing"),  # attended to 2 cached positions for the query at 2
    ([0, 1], "1-D int64 tensor of 3 positions"),
    ([0.0, 1.0, 2.0], "1-D int64 tensor"),
])
def test_positions_the_static_cache_cannot_take_are_refused(positions, match):
    model = build_llama("tiny-llama", "fp32")
    model.setup_caches(1)
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(1, 3, dtype=torch.long), torch.tensor(positions))


def test_unknown_dtype_is_a_clear_error(tmp_path):
    hf_checkpoint(tmp_path, tiny_state(0))
    with pytest.raises(WorkloadError, match="unknown dtype 'fp16'.*bf16"):
        load_pretrained(tmp_path, dtype="fp16")


def test_index_names_the_files_loaded(tmp_path):
    state = tiny_state(0)
    hf_checkpoint(tmp_path, state)
    save_file(tiny_state(1), str(tmp_path / "zz-consolidated.safetensors"))  # a stray file the index does not name
    model = load_pretrained(tmp_path, "fp32")
    assert torch.equal(model.model.embed_tokens.weight, state["model.embed_tokens.weight"])


def test_missing_shard_and_duplicate_tensors_are_refused(tmp_path):
    state = tiny_state(0)
    weight_map = hf_checkpoint(tmp_path, state)
    (tmp_path / "model.safetensors.index.json").unlink()
    save_file(tiny_state(1), str(tmp_path / "zz-consolidated.safetensors"))
    with pytest.raises(WorkloadError, match="in both"):  # no index: every file, each tensor once
        load_pretrained(tmp_path, "fp32")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WorkloadError, match="missing: \\['model-00002-of-00002.safetensors'\\]"):
        load_pretrained(tmp_path, "fp32")


def test_decode_step_takes_one_token_at_the_past_length():
    model = build_llama("tiny-llama", "fp32", seed=0).eval()
    tokens = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    model.setup_caches(1)
    with torch.no_grad():
        ref = model(tokens, torch.arange(10))
        past = [t[:, :, :7].clone() for layer in model.model.layers
                for t in (layer.self_attn.kv_cache.k, layer.self_attn.kv_cache.v)]
        step = PastKVDecodeStep(model)
        torch.testing.assert_close(step(tokens[:, 7:8], torch.tensor([7]), *past)[0][:, 0], ref[:, 7])
        with pytest.raises(ValueError, match="one decode step"):
            step(tokens[:, 7:10], torch.arange(7, 10), *past)
        with pytest.raises(ValueError, match="input_pos 3 must equal the past length 7"):
            step(tokens[:, 7:8], torch.tensor([3]), *past)


def test_generate_checks_max_new_tokens():
    model = build_llama("tiny-llama", "fp32", seed=1)
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    none = generate(model, prompt, 0)
    assert none.tokens.shape == (2, 0) and none.decode_s == []
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate(model, prompt, -1)


def test_max_seq_len_zero_is_refused_not_replaced():
    assert config_from_hf(TINY_HF, max_seq_len=None).max_seq_len == 128 and config_from_hf(TINY_HF, max_seq_len=64).max_seq_len == 64
    with pytest.raises(ValueError, match="positive"):
        config_from_hf(TINY_HF, max_seq_len=0)


def test_absent_fields_take_transformers_defaults():
    transformers = pytest.importorskip("transformers")
    absent = {k: v for k, v in TINY_HF.items() if k != "rms_norm_eps"}
    assert config_from_hf(absent).eps == transformers.LlamaConfig().rms_norm_eps == 1e-6
    assert config_from_hf({**TINY_HF, "rms_norm_eps": None}).eps == 1e-6
    assert config_from_hf(TINY_HF).eps == 1e-5


@pytest.mark.parametrize("field, value, match", [
    ("kv_heads", 0, "every size in a Llama config must be positive"),
    ("kv_heads", -2, "every size in a Llama config must be positive"),
    ("eps", -1e-5, "eps .* must be positive"),
    ("rope_theta", 0.0, "rope_theta .* must be positive"),
])
def test_config_values_are_checked_before_use(field, value, match):
    with pytest.raises(WorkloadError, match=match):
        dataclasses.replace(get_config("tiny-llama"), **{field: value})


def test_an_explicit_zero_kv_heads_in_config_json_is_refused_not_made_multi_head():
    hf = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
          "num_key_value_heads": 0, "num_hidden_layers": 1, "vocab_size": 32}
    with pytest.raises(WorkloadError, match="must be positive"):
        config_from_hf(hf)


def test_token_ids_outside_the_vocabulary_are_refused():
    model = build_llama("tiny-llama", "fp32")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\), got -1..3"):
        generate(model, torch.tensor([[3, -1]]), 2)
    with pytest.raises(ValueError, match="got 0..256"):
        generate(model, torch.tensor([[0, 256]]), 2)


def test_build_llama_refuses_an_unknown_dtype():
    with pytest.raises(WorkloadError, match="unknown dtype 'fp16'"):
        build_llama("tiny-llama", "fp16")
