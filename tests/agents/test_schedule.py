"""The offline proposer (agents/schedule.py)."""
from __future__ import annotations

import random

import pytest

from autocomp_compile.agents.schedule import ScheduleProposer
from autocomp_compile.search.candidate import Candidate
from autocomp_compile.targets.cpu.target import CpuTarget
from tests.helpers import small

TARGET = CpuTarget(["scalar", "avx2"])


def _propose(parent, w, seed, n_plans=3, n_impls=2, dropout=0.7, iteration=1):
    return ScheduleProposer(dropout=dropout).propose(parent, w, TARGET, "", n_plans, n_impls, random.Random(seed), iteration)


def _summary(children):
    return [(c.id, c.knobs, c.code, c.plan, c.menu_ids) for c in children]


@pytest.mark.parametrize("wname", ["gemm", "mlp", "decode", "prefill", "rmsnorm"])
def test_same_seed_same_children(wname):
    w = small(wname)
    root = TARGET.lower(w)
    a, b = _propose(root, w, 42), _propose(root, w, 42)
    assert a and _summary(a) == _summary(b)


def test_different_seeds_differ():
    w = small("prefill")
    root = TARGET.lower(w)
    base = _summary(_propose(root, w, 0))
    others = [_summary(_propose(root, w, s)) for s in range(1, 6)]
    assert any(o != base for o in others)


@pytest.mark.parametrize("wname", ["gemm", "mlp", "decode", "prefill", "rmsnorm"])
def test_children_are_legal_distinct_changes_of_the_parent(wname):
    w = small(wname)
    parent = TARGET.lower(w)
    parent.menu_ids = ["earlier_step"]
    menu_ids = {m.id for m in TARGET.menu(w)}
    for seed in range(5):
        children = _propose(parent, w, seed, n_plans=3, n_impls=2, iteration=4)
        assert 0 < len(children) <= 6
        keys = [repr(sorted(c.knobs.items())) for c in children]
        assert len(set(keys)) == len(keys)  # no duplicate schedules
        for c in children:
            assert c.knobs != parent.knobs
            assert TARGET.legalize(w, c.knobs) == c.knobs
            assert c.code == TARGET.generate(w, c.knobs)
            assert c.parent_id == parent.id and c.iteration == 4 and c.language == "c"
            assert c.menu_ids[:-1] == ["earlier_step"] and c.menu_ids[-1] in menu_ids
            assert c.plan.startswith(f"[{c.menu_ids[-1]}]") and "Change:" in c.plan
            assert c.models == ["schedule"]


@pytest.mark.parametrize("wname", ["mlp", "decode", "prefill"])
def test_plans_for_one_parent_are_distinct_menu_items(wname):
    w = small(wname)
    root = TARGET.lower(w)
    for seed in range(20):
        plans = [c.menu_ids[-1] for c in _propose(root, w, seed, n_plans=3, n_impls=1)]
        assert len(plans) == len(set(plans)) == 3, (seed, plans)


def test_plan_count_bounds_children():
    w = small("gemm")
    root = TARGET.lower(w)
    one = _propose(root, w, 3, n_plans=1, n_impls=1)
    assert len(one) == 1
    assert len({c.menu_ids[-1] for c in _propose(root, w, 3, n_plans=1, n_impls=4)}) == 1  # one plan


def test_no_knobs_no_children():
    w = small("gemm")
    llm = Candidate(id="x", parent_id=None, iteration=0, language="c", code="int x;", knobs=None)
    assert _propose(llm, w, 0) == []


def test_dropout_validation():
    with pytest.raises(ValueError):
        ScheduleProposer(dropout=1.0)
    with pytest.raises(ValueError):
        ScheduleProposer(dropout=-0.5)


def test_high_dropout_still_proposes():
    """When dropout removes every item, the draw is repeated (or falls back to the full menu)."""
    w = small("rmsnorm")
    root = TARGET.lower(w)
    children = ScheduleProposer(dropout=0.99, max_redraws=1).propose(root, w, TARGET, "", 2, 1, random.Random(0), 1)
    assert children


def test_a_compute_bound_workload_gets_a_compute_item_as_each_parents_first_plan():
    """A 64-row GEMM (60 flops per byte, above the CPU target's 16): each parent's first plan relieves compute
    when such an item applies; its other plans, and every plan of a decode GEMV (1 flop per byte), come from the
    whole menu."""
    from autocomp_compile.agents.schedule import bound_by
    from autocomp_compile.workload import make_workload

    prefill, decode = make_workload("gemm", "bf16", m=64, n=256, k=512), make_workload("gemm", "bf16", m=1, n=256, k=512)
    assert (bound_by(prefill, TARGET), bound_by(decode, TARGET)) == ("compute", "")
    vectorized = TARGET.lower(prefill)
    vectorized.knobs = TARGET.legalize(prefill, {**vectorized.knobs, "isa": "avx2", "threads": "static"})
    relieves = {m.id: m.relieves for m in TARGET.menu(prefill)}
    firsts, others = set(), set()
    for seed in range(30):
        children = _propose(vectorized, prefill, seed, n_plans=3, n_impls=1)
        plans = [c.menu_ids[-1] for c in children]
        firsts.add(plans[0])
        others.update(plans[1:])
    assert firsts and all(relieves[i] == "compute" for i in firsts), firsts
    assert {"pack_panels", "register_tile"} <= firsts
    assert any(relieves[i] != "compute" for i in others)
    decode_root = TARGET.lower(decode)
    decode_root.knobs = TARGET.legalize(decode, {**decode_root.knobs, "isa": "avx2", "threads": "static"})
    decode_firsts = {_propose(decode_root, decode, s, n_plans=1, n_impls=1)[0].menu_ids[-1] for s in range(30)}
    assert any({m.id: m.relieves for m in TARGET.menu(decode)}[i] != "compute" for i in decode_firsts)
