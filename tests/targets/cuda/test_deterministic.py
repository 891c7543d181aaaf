"""Deterministic kernels on the CUDA target: which schedules declare float atomics, and the target variant that
searches and caches only bit-reproducible kernels (no GPU needed: code generation, legalisation, menus, keys)."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from autocomp_compile import EvalSettings, get_target, make_workload
from autocomp_compile.kernels_cache.store import cache_key
from autocomp_compile.passes.selection import KernelSelector
from autocomp_compile.targets.base import deterministic_variant
from autocomp_compile.targets.cuda import codegen
from autocomp_compile.targets.cuda.runtime import CudaKernelError, launch_spec

MLP = make_workload("mlp", "bf16", batch=1, hidden=2048, intermediate=8192)
ATOMIC_FORMS = [dict(naive=False, vec=True, fuse_down=True, chunk=64, warps=8),
                dict(naive=False, down_t=True, chunk=64, warps=8)]
OTHER_FORMS = [dict(naive=True), dict(naive=False, vec=True, fuse=True, warps=8, ksplit=2),
               dict(naive=False, vec=True, persistent=True, per_sm=2, warps=8),
               dict(naive=False, vec=True, fuse=True, pdl=True, down_warps=8, down_ksplit=4)]


@pytest.mark.parametrize("knobs", ATOMIC_FORMS)
def test_mlp_forms_that_add_floats_with_atomics_say_so_in_their_launch_line(knobs):
    legal = codegen.legalize(MLP, knobs)
    assert codegen.order_dependent(legal)
    assert launch_spec(codegen.generate(MLP, legal))["order_dependent"] is True


@pytest.mark.parametrize("knobs", OTHER_FORMS)
def test_the_other_mlp_forms_do_not(knobs):
    legal = codegen.legalize(MLP, knobs)
    assert not codegen.order_dependent(legal)
    spec = launch_spec(codegen.generate(MLP, legal))
    assert "order_dependent" not in spec
    assert "red.global.add" not in codegen.generate(MLP, legal)


def test_launch_line_rejects_a_non_boolean_order_dependent():
    with pytest.raises(CudaKernelError, match="order_dependent"):
        launch_spec('// autocomp-launch: {"kernels": [{"name": "k", "grid": [1, 1, 1], "block": [32, 1, 1], '
                    '"args": []}], "order_dependent": "yes"}\n')


def test_deterministic_variant_is_one_object_with_its_own_fingerprint_and_cache_key():
    cuda = get_target("cuda")
    det = get_target("cuda", deterministic=True)
    assert det is not cuda and det is cuda.deterministic_variant() and det.deterministic_variant() is det
    assert deterministic_variant(cuda) is det and not cuda.deterministic
    assert det.fingerprint() == {**cuda.fingerprint(), "deterministic": True}
    sig = MLP.signature()
    version = codegen.CODEGEN_VERSION
    assert cache_key(det.fingerprint(), sig, version) != cache_key(cuda.fingerprint(), sig, version)
    cpu = get_target("cpu")
    assert get_target("cpu", deterministic=True) is cpu  # every generated CPU kernel fixes its reduction order


def test_deterministic_variant_never_legalises_to_float_atomics():
    det = get_target("cuda", deterministic=True)
    rng = random.Random(0)
    choices = codegen.KNOB_CHOICES["gemv"]
    flags = ("naive", "vec", "fuse", "fuse_down", "down_t", "persistent", "stream_loads", "x_smem", "l2_prefetch")
    for w in (MLP, make_workload("mlp", "fp32", batch=2, hidden=64, intermediate=96)):
        for _ in range(300):
            knobs = {name: rng.choice(c) for name, c in choices.items()}
            knobs.update({f: rng.random() < 0.5 for f in flags})
            legal = det.legalize(w, knobs)
            assert not codegen.order_dependent(legal), knobs
            assert "order_dependent" not in launch_spec(det.generate(w, knobs))
        # the same schedules on the unrestricted target do reach both atomic forms
        assert any(codegen.order_dependent(get_target("cuda").legalize(w, k)) for k in ATOMIC_FORMS)


def test_deterministic_variant_menu_leaves_out_the_atomic_mlp_forms():
    full = {m.id for m in get_target("cuda").menu(MLP)}
    det = {m.id for m in get_target("cuda", deterministic=True).menu(MLP)}
    assert full - det == {"one_kernel_mlp", "streaming_mlp", "mlp_chunk"}
    assert {"persistent_mlp", "fuse_epilogue", "split_k"} <= det


def test_deterministic_variant_evaluator_checks_repeatability(tmp_path):
    """The variant's evaluator asks the job for the repeat check, whatever settings it was given."""
    settings = EvalSettings(deterministic=False)
    evaluator = get_target("cuda", deterministic=True).make_evaluator(MLP, tmp_path, settings)
    try:
        assert evaluator.settings.deterministic and evaluator.settings.device == "cuda"
    finally:
        evaluator.close()
    plain = get_target("cuda").make_evaluator(MLP, tmp_path, settings)
    try:
        assert not plain.settings.deterministic
    finally:
        plain.close()


@pytest.mark.parametrize("torch_mode,option", list(itertools.product([False, True], [None, False, True])))
def test_selector_follows_torch_deterministic_mode_unless_told(tmp_path, torch_mode, option):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(torch_mode)
    try:
        sel = KernelSelector(get_target("cuda"), cache_dir=str(tmp_path), verbose=False, deterministic=option)
    finally:
        torch.use_deterministic_algorithms(before)
    want = torch_mode if option is None else option
    try:
        assert sel.deterministic is want
        assert sel.target is (get_target("cuda", deterministic=True) if want else get_target("cuda"))
        d = sel.decide(MLP)
        assert not d.replaced and ("warm --deterministic" in d.reason) == want
    finally:
        sel.close()


HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU here: the repeat check needs one to run kernels")


@needs_gpu
def test_on_gpu_a_deterministic_search_keeps_only_reproducible_mlps(tmp_path, monkeypatch):
    """Seeded with the one-kernel and streaming MLPs, the deterministic search refuses both (declared atomics)
    and its winner gives the same bits on every run."""
    from autocomp_compile import SearchConfig, optimize
    from autocomp_compile.agents.schedule import ScheduleProposer
    from autocomp_compile.optimize import schedule_seed
    from autocomp_compile.references import InputFactory, empty_outputs
    from autocomp_compile.targets.cuda.runtime import load
    from autocomp_compile.targets.cuda.build import build

    monkeypatch.setenv("AUTOCOMP_CACHE_DIR", str(tmp_path / "cache"))
    w = make_workload("mlp", "bf16", batch=1, hidden=1024, intermediate=4096)
    plain = get_target("cuda")
    seeds = [schedule_seed(plain, w, k, "atomic form", [], "test") for k in ATOMIC_FORMS]
    assert all(launch_spec(s.code).get("order_dependent") for s in seeds)
    det = get_target("cuda", deterministic=True)
    r = optimize(w, det, SearchConfig(budget=6, seed=0), EvalSettings(timing_budget_ms=30), tmp_path / "out",
                 proposers=[ScheduleProposer(dropout=0.3)], seeds=seeds)
    assert r.best is not None and not launch_spec(r.best.code).get("order_dependent")
    refused = [c for c in r.candidates if c.origin == "test"]
    assert refused and all(c.result.stage == "nondeterministic" for c in refused)
    built = build(r.best.code, det.arch, tmp_path / "build")
    kernel = load(str(built.cubin_path), r.best.code, [t.name for t in w.tensors], [])
    inputs = {k: v.cuda() for k, v in InputFactory(0).inputs(w).items()}
    runs = []
    for _ in range(5):
        outs = empty_outputs(w, device="cuda")
        kernel([*inputs.values(), *outs.values()], [])
        runs.append(outs["out"].view(torch.int16).cpu())
    assert all(torch.equal(runs[0], other) for other in runs[1:])
