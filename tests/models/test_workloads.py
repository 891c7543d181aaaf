"""The workloads `warm` optimizes are the ones the backend looks up."""
from __future__ import annotations

import pytest

from autocomp_compile.models.workloads import model_workloads
from autocomp_compile.workload import WorkloadError, make_workload


def test_tiny_llama_decode_and_prefill_workloads():
    found = {w.signature(): w for w in model_workloads("tiny-llama", "bf16", batch=1, prefill_lens=[8])}
    expected = [
        make_workload("gemm", "bf16", m=1, n=64, k=64),
        make_workload("gemm", "bf16", m=1, n=32, k=64),
        make_workload("gemm", "bf16", m=8, n=64, k=64),
        make_workload("gemm", "bf16", m=8, n=32, k=64),
        make_workload("mlp", "bf16", batch=1, hidden=64, intermediate=128),
        make_workload("mlp", "bf16", batch=8, hidden=64, intermediate=128),
        make_workload("lm_head", "bf16", batch=1, hidden=64, vocab=256),
        make_workload("attention", "bf16", phase="decode", batch=1, heads=4, kv_heads=2, head_dim=16, kv_len=64,
                      max_kv_len=128),
        make_workload("attention", "bf16", phase="prefill", batch=1, heads=4, kv_heads=2, head_dim=16, seq_len=8),
        make_workload("rmsnorm", "bf16", rows=1, hidden=64, eps=1e-5),
        make_workload("rmsnorm", "bf16", rows=8, hidden=64, eps=1e-5),
    ]
    assert set(found) == {w.signature() for w in expected}


def test_kinds_filter_and_bad_lengths():
    kinds = {w.kind for w in model_workloads("tiny-llama", "fp32", kinds=["mlp", "lm_head"])}
    assert kinds == {"mlp", "lm_head"}
    with pytest.raises(WorkloadError):
        model_workloads("tiny-llama", prefill_lens=[1000])


def test_warm_kinds_without_mlp_find_the_projections_the_backend_replaces():
    # the backend compiled with kinds=("gemm",) replaces the MLP's three projections as gemms too
    found = {(w.params["m"], w.params["n"], w.params["k"]) for w in model_workloads("tiny-llama", "bf16", kinds=["gemm"])}
    assert found == {(1, 64, 64), (1, 32, 64), (1, 128, 64), (1, 64, 128)}


def test_more_prefill_lengths_than_dynamos_recompile_limit():
    lengths = list(range(2, 11))  # 9 prefill graphs + decode: past dynamo's default limit of 8 recompilations
    found = model_workloads("tiny-llama", "fp32", prefill_lens=lengths, kinds=["attention"])
    assert sorted(w.params["seq_len"] for w in found if w.params["phase"] == "prefill") == lengths


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(WorkloadError, match="unknown dtype 'fp16'"):
        model_workloads("tiny-llama", "fp16")


def test_earlier_compilations_of_the_forward_do_not_use_up_the_recompile_limit():
    import torch

    from autocomp_compile.models import build_llama

    model = build_llama("tiny-llama", "fp32")
    model.setup_caches(1)
    compiled = torch.compile(model, backend="eager", dynamic=False)
    with torch.no_grad():
        for n in range(2, 8):  # six compilations of Llama.forward, counted with the ones below
            compiled(torch.zeros(1, n, dtype=torch.long), torch.arange(n))
    found = model_workloads("tiny-llama", "fp32", prefill_lens=range(8, 13), kinds=["attention"])
    assert sorted(w.params["seq_len"] for w in found if w.params["phase"] == "prefill") == [8, 9, 10, 11, 12]
