"""NKI target on the emulator: every kernel variant is correct against the PyTorch reference, each menu item
gives a correct kernel, the search improves the SIMULATED latency, and simulated results are labelled and
kept apart from real trn1 results in the cache."""
from __future__ import annotations

import random
import re

import pytest

from autocomp_compile import EvalSettings, SearchConfig, get_target, make_workload, optimize
from autocomp_compile.evaluation.job import EvalSettings as _Settings
from autocomp_compile.kernels_cache import KernelCache
from autocomp_compile.targets.nki import codegen, neuron
from autocomp_compile.targets.nki.evaluate import check_and_estimate
from autocomp_compile.workload import WorkloadError

WORKLOADS = {
    "gemm": make_workload("gemm", m=2, n=256, k=512),
    "mlp": make_workload("mlp", hidden=256, intermediate=512),
    "lm_head": make_workload("lm_head", hidden=256, vocab=640),
    "rmsnorm": make_workload("rmsnorm", hidden=512),
    "rmsnorm_rows": make_workload("rmsnorm", rows=130, hidden=96),
    "attention_decode": make_workload("attention", heads=4, kv_heads=1, head_dim=64, kv_len=300, max_kv_len=512),
    "attention_prefill": make_workload("attention", phase="prefill", heads=2, kv_heads=1, head_dim=64, seq_len=160),
    "mlp_fp32": make_workload("mlp", "fp32", hidden=128, intermediate=256),
}
SETTINGS = _Settings(correctness_sets=2, seed=3)


def check(w, knobs):
    return check_and_estimate({}, w, "", (codegen.generate(w, codegen.legalize(w, knobs)),), SETTINGS)


def variants(w, n=3, seed=0):
    rng = random.Random(seed)
    choices = codegen.KNOB_CHOICES[codegen.family(w.kind)]
    best = {k: v[-1] for k, v in choices.items()}
    return [codegen.naive_knobs(w), best] + [{k: rng.choice(v) for k, v in choices.items()} for _ in range(n)]


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_kernel_variants_are_correct(name):
    w = WORKLOADS[name]
    for knobs in variants(w):
        res = check(w, knobs)
        assert res["correct"], (knobs, res["message"])
        assert res["extra"]["simulated"] is True and res["latency_ms"] > 0


@pytest.mark.parametrize("name", ["mlp", "rmsnorm", "attention_decode", "attention_prefill"])
def test_every_menu_item_gives_a_correct_kernel(name):
    w = make_workload("mlp", hidden=512, intermediate=1024) if name == "mlp" else WORKLOADS[name]
    target = get_target("nki")
    naive = target.lower(w)
    wide = target.legalize(w, {**naive.knobs, "load_k": 512})  # what batching transposes needs
    rng = random.Random(1)
    for item in target.menu(w):
        parent = naive.knobs if item.id != "batch_transposes" else wide
        assert item.applies(parent), item.id
        knobs = target.legalize(w, item.apply(dict(parent), rng))
        assert knobs != parent, item.id
        res = check(w, knobs)
        assert res["correct"], (item.id, res["message"])


def test_wrong_kernel_fails_correctness():
    w = WORKLOADS["rmsnorm"]
    code = codegen.generate(w, codegen.naive_knobs(w)).replace("nl.rsqrt(", "nl.sqrt(")
    res = check_and_estimate({}, w, "", (code,), SETTINGS)
    assert not res["correct"] and res["stage"] == "correctness"


def test_rule_breaking_candidate_fails_with_the_rule_named():
    w = WORKLOADS["gemm"]
    code = codegen.generate(w, codegen.naive_knobs(w)).replace("nl.arange(128)[:, None]", "nl.arange(256)[:, None]", 1)
    res = check_and_estimate({}, w, "", (code,), SETTINGS)
    assert not res["correct"] and res["stage"] == "runtime"
    assert res["extra"]["rule"] in ("partition-dim", "out-of-bounds") and "NKI rule" in res["message"]


def test_fingerprint_keeps_emulated_and_real_results_apart(monkeypatch):
    target = get_target("nki")
    monkeypatch.delenv("AUTOCOMP_NKI_BACKEND", raising=False)
    monkeypatch.setattr(neuron, "neuronxcc_version", lambda: "")
    emulated = target.fingerprint()
    assert emulated["simulated"] is True and emulated["backend"] == "emulator-trn1-model"
    assert "SIMULATED" in target.describe()
    monkeypatch.setattr(neuron, "neuronxcc_version", lambda: "2.15.128.0")
    real = target.fingerprint()
    assert real["simulated"] is False and real != emulated
    assert isinstance(target.make_evaluator(WORKLOADS["gemm"]), neuron.NeuronEvaluator)
    monkeypatch.setenv("AUTOCOMP_NKI_BACKEND", "emulator")
    assert target.fingerprint() == emulated


@pytest.mark.parametrize("name", ["mlp", "lm_head", "rmsnorm", "attention_decode", "attention_prefill"])
def test_search_improves_simulated_latency_and_labels_it(name, tmp_path, monkeypatch):
    monkeypatch.setattr(neuron, "neuronxcc_version", lambda: "")
    w = WORKLOADS[name]
    cache = KernelCache(tmp_path / "kernels.sqlite")
    result = optimize(w, "nki", SearchConfig(budget=8, beam_size=2, iterations=4, seed=0),
                      EvalSettings(correctness_sets=1), output_dir=tmp_path, cache=cache)
    assert result.root.result.correct and result.best.result.correct
    assert result.best.latency_ms < 0.8 * result.root.latency_ms
    assert result.best.result.extra["simulated"] is True
    entry = cache.get(get_target("nki"), w)
    assert entry is not None and entry.fingerprint["simulated"] is True
    hit = optimize(w, "nki", output_dir=tmp_path, cache=cache)
    assert hit.from_cache and hit.best.result.extra["simulated"] is True


@pytest.mark.parametrize("kind, params, match", [
    ("mlp", dict(hidden=100, intermediate=37), "hidden and intermediate to be multiples of 128, got hidden=100"),
    ("mlp", dict(hidden=256, intermediate=320), "intermediate=320"),
    ("lm_head", dict(hidden=256, vocab=100), "hidden and vocab to be multiples of 128"),
    ("gemm", dict(m=1, n=256, k=100), "k and n to be multiples of 128"),
    ("attention", dict(heads=2, kv_heads=1, head_dim=256), "head_dim <= 128"),
    ("gemm", dict(m=640, k=128, n=128), "m <= 512, got 640"),
    ("mlp", dict(batch=512, hidden=4096, intermediate=14336, dtype="fp32"), "keep x\\^T and the SwiGLU"),
    ("attention", dict(heads=1, kv_heads=1, head_dim=64, kv_len=40000, max_kv_len=40000), "max_kv_len <= 6144"),
    ("attention", dict(phase="prefill", heads=1, kv_heads=1, head_dim=64, seq_len=12288), "seq_len <= 6144"),
    ("rmsnorm", dict(hidden=65536), "hidden <= 10347"),
    ("rmsnorm", dict(hidden=8192, dtype="fp32"), "hidden <= 7864"),
])
def test_unsupported_shapes_are_workload_errors_before_any_run(kind, params, match, tmp_path):
    """A shape the NKI kernels do not tile is refused by the target's check, and by optimize() before it creates a
    run directory or evaluates anything (it was a ValueError traceback from codegen in the middle of the run)."""
    params = dict(params)
    w = make_workload(kind, params.pop("dtype", "bf16"), **params)
    with pytest.raises(WorkloadError, match=match):
        get_target("nki").check_workload(w)
    with pytest.raises(WorkloadError, match=match):
        codegen.generate(w, codegen.naive_knobs(w))
    with pytest.raises(WorkloadError, match=match):
        optimize(w, "nki", SearchConfig(budget=2), output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_supported_shapes_pass_the_check():
    for w in WORKLOADS.values():
        get_target("nki").check_workload(w)


@pytest.mark.parametrize("w", [
    make_workload("gemm", m=512, k=128, n=128),
    make_workload("rmsnorm", "fp32", rows=130, hidden=7864),
    make_workload("attention", "fp32", heads=8, kv_heads=1, head_dim=128, kv_len=6144, max_kv_len=6144),
], ids=["gemm_m512", "rmsnorm_7864", "decode_6144"])
def test_shapes_at_the_checked_limits_run_on_the_emulator(w):
    """check()'s bounds come from the emulator's limits: a shape just inside them gives kernels that keep the rules."""
    get_target("nki").check_workload(w)
    for knobs in variants(w, n=0):
        res = check(w, knobs)
        assert res["correct"], (knobs, res["message"])


def test_attention_scores_leave_psum_before_the_gpsimd_mask():
    for w in (WORKLOADS["attention_decode"], WORKLOADS["attention_prefill"]):
        code = codegen.generate(w, codegen.legalize(w, {}))
        assert "on_true_tile=s_ps" not in code and "= nl.copy(s_ps)" in code
        assert check(w, {})["correct"]
    assert codegen.CODEGEN_VERSION == "nki-4"


@pytest.mark.parametrize("knobs", [{}, {"causal_skip": True}, {"causal_skip": True, "loop": "sequential"}])
def test_prefill_attention_masks_with_one_comparison_and_unrolls_what_bounds_loops(knobs):
    """NKI's affine_select refuses `a & b`; a bare `range` is a sequential_range there, whose index cannot bound
    another loop or pick a branch: loops over a Python int are nl.static_range."""
    w = make_workload("attention", "bf16", phase="prefill", heads=2, kv_heads=1, head_dim=64, seq_len=200)
    code = codegen.generate(w, codegen.legalize(w, knobs))
    assert "pred=k0 + i_sf <= q0 + i_m," in code and " & " not in code
    assert re.search(r"\bin range\(", code) is None
    assert check(w, knobs)["correct"]
