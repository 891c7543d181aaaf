"""Beam search (search/beam.py), the run directory (search/artifacts.py), resume, and optimize().

Everything but the last test uses FakeEvaluator (tests/conftest.py): no compilation, the loop
runs in milliseconds. The last test is one real end-to-end optimize() on a tiny GEMM.
"""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from autocomp_compile import EvalSettings, SearchConfig, optimize
from autocomp_compile.agents.schedule import ScheduleProposer
from autocomp_compile.report import run_off_line
from autocomp_compile.search.artifacts import RunConflict, RunDirectory
from autocomp_compile.search.beam import BeamSearch, summarize
from autocomp_compile.search.candidate import Candidate, normalized_code_hash
from autocomp_compile.targets.base import EvalResult, RunOffError
from tests.conftest import EvaluatorCalled, FakeEvaluator, FakeTarget, fake_latency
from tests.helpers import small

SETTINGS = EvalSettings(timing_budget_ms=20, timeout_s=30)


def _search(w, evaluator, config, run_dir=None, isas=("scalar", "avx2"), seeds=None):
    target = FakeTarget(evaluator, isas)
    bs = BeamSearch(target, w, evaluator, [ScheduleProposer(dropout=config.dropout)], config, run_dir)
    return bs.run(seeds)


def _by_id(result):
    return {c.id: c for c in result.candidates}


# ---------------------------------------------------------------- the loop


@pytest.mark.parametrize("budget", [1, 2, 7, 20])
def test_budget_is_respected(budget):
    ev = FakeEvaluator()
    r = _search(small("gemm"), ev, SearchConfig(budget=budget, iterations=50, patience=50))
    assert r.candidates_evaluated <= budget
    assert len(ev.seen) == r.candidates_evaluated == r.evaluated_now
    if budget == 1:
        assert r.candidates_evaluated == 1 and r.stop_reason == "budget" and r.iterations == 0
    if budget == 20:
        assert r.candidates_evaluated == 20 and r.stop_reason == "budget"


def test_no_duplicates_and_lineage():
    ev = FakeEvaluator()
    r = _search(small("mlp"), ev, SearchConfig(budget=40, iterations=20, patience=20, plans_per_parent=3,
                                                impls_per_plan=3, beam_size=3))
    hashes = [c.code_hash for c in r.candidates]
    assert len(set(hashes)) == len(hashes) == r.candidates_evaluated
    assert len(set(ev.seen)) == len(ev.seen)
    ids = [c.id for c in r.candidates]
    assert len(set(ids)) == len(ids)
    by_id = _by_id(r)
    assert r.candidates[0] is r.root and r.root.parent_id is None and r.root.menu_ids == []
    for c in r.candidates[1:]:
        assert c.parent_id in by_id, c.id
        parent = by_id[c.parent_id]
        assert parent.iteration < c.iteration
        assert c.menu_ids[:-1] == parent.menu_ids and len(c.menu_ids) == len(parent.menu_ids) + 1
        assert c.knobs != parent.knobs
        assert parent.correct  # only beam members (correct ones) get children


def test_best_is_the_fastest_correct_candidate_and_improves_on_root():
    r = _search(small("gemm"), FakeEvaluator(), SearchConfig(budget=30, iterations=20, patience=20))
    correct = [c for c in r.candidates if c.correct]
    assert r.best is min(correct, key=lambda c: c.latency_ms)
    assert r.best.latency_ms < r.root.latency_ms
    assert r.best.latency_ms == pytest.approx(fake_latency(r.best.knobs))
    assert r.baseline_ms == 2.0 and r.speedup == pytest.approx(2.0 / r.best.latency_ms)
    best_ms = [h["best_ms"] for h in r.history]
    assert best_ms == sorted(best_ms, reverse=True)  # the beam's best never gets worse


class SlowedBaselines(FakeEvaluator):
    """Eager measured at 50 ms next to every candidate slower than 3 ms (their threads, or a load spike,
    slowed it) and at its true 2 ms next to the fast ones."""

    def evaluate(self, candidates):
        results = super().evaluate(candidates)
        for r in results:
            if r.correct and r.latency_ms > 3.0:
                r.baseline_ms = 50.0
        return results


def test_the_speedup_is_the_best_kernels_own_interleaved_ratio():
    # min_depth=1: wide rounds, so that most candidates are slow ones (the median baseline would be 50 ms)
    r = _search(small("gemm"), SlowedBaselines(), SearchConfig(budget=30, iterations=20, patience=20, min_depth=1))
    assert r.best.latency_ms < 3.0 and sum(c.correct and c.latency_ms > 3.0 for c in r.candidates) > len(r.candidates) / 2
    assert r.baseline_ms == 2.0 and r.speedup == pytest.approx(2.0 / r.best.latency_ms)  # not the median, 50 ms


def test_beam_never_contains_incorrect_candidates():
    bad = lambda k: k["threads"] != "serial" or k.get("unroll") == 2  # noqa: E731 - fast but wrong
    r = _search(small("gemm"), FakeEvaluator(bad=bad), SearchConfig(budget=40, iterations=20, patience=20))
    by_id = _by_id(r)
    assert any(not c.correct for c in r.candidates)  # the test is meaningful
    for h in r.history:
        for cid in h["beam"]:
            assert by_id[cid].correct
    assert r.best.correct and not bad(r.best.knobs)
    assert all(by_id[c.parent_id].correct for c in r.candidates[1:])
    summary = summarize(r, small("gemm"))
    assert summary["failures"] == {"correctness": sum(not c.correct for c in r.candidates)}


def test_beam_size_bounds_the_beam():
    r = _search(small("gemm"), FakeEvaluator(), SearchConfig(budget=40, beam_size=2, iterations=20, patience=20))
    assert all(len(h["beam"]) <= 2 for h in r.history)
    assert len(r.history[-1]["beam"]) == 2


def test_a_small_budget_is_spread_over_min_depth_iterations():
    """Rounds of beam x plans x impls (24 by default) would spend a budget of 32 in two menu steps."""
    r = _search(small("decode"), FakeEvaluator(), SearchConfig(budget=32, iterations=12, patience=12))
    assert r.candidates_evaluated == 32 and r.stop_reason == "budget"
    assert all(h["evaluated"] <= 6 for h in r.history)  # ceil((32 - 1) / 6)
    assert r.iterations >= 6
    assert max(len(c.menu_ids) for c in r.candidates) >= 5
    wide = _search(small("decode"), FakeEvaluator(), SearchConfig(budget=32, iterations=12, patience=12, min_depth=1))
    assert wide.iterations <= 4 and max(h["evaluated"] for h in wide.history) > 6


def test_a_short_round_gives_every_beam_member_children():
    """Round robin over the parents: the best parent's children do not take the whole round."""
    r = _search(small("mlp"), FakeEvaluator(), SearchConfig(budget=40, iterations=12, patience=12, beam_size=3))
    by_id = _by_id(r)
    checked = 0
    for before, h in zip(r.history, r.history[1:]):
        children = [c for c in r.candidates if c.iteration == h["iteration"]]
        if len(before["beam"]) == 3 and len(children) >= 3:
            assert {c.parent_id for c in children} == set(before["beam"]), h
            checked += 1
    assert checked >= 3 and all(by_id[c.parent_id].correct for c in r.candidates[1:])


def test_a_short_round_asks_for_distinct_plans_before_implementations():
    """Rounds of 2 (budget 8 over 4 iterations): the root's two children are two menu items, not two variants of one."""
    for seed in range(5):
        r = _search(small("decode"), FakeEvaluator(), SearchConfig(budget=8, beam_size=2, iterations=4, seed=seed))
        first = [c.menu_ids[-1] for c in r.candidates if c.iteration == 1]
        assert len(first) == len(set(first)) == 2, (seed, first)


def test_fewer_iterations_than_min_depth_spend_the_budget_in_them():
    r = _search(small("decode"), FakeEvaluator(), SearchConfig(budget=25, iterations=2, patience=5))
    assert r.iterations == 2 and r.candidates_evaluated > 1 + 2 * 4  # rounds of 12, not ceil(24 / 6) = 4


def test_early_stop_with_patience():
    ev = FakeEvaluator(latency=lambda k: 5.0)  # nothing ever improves
    r = _search(small("gemm"), ev, SearchConfig(budget=1000, iterations=30, patience=2))
    assert r.stop_reason == "no improvement in 2 iterations"
    assert r.iterations == 2 and len(r.history) == 3
    r3 = _search(small("gemm"), FakeEvaluator(latency=lambda k: 5.0), SearchConfig(budget=1000, iterations=30, patience=3))
    assert r3.iterations == 3


def test_improvement_resets_patience():
    # each generation is 2 % faster than the last: never stale
    ev = FakeEvaluator(latency=lambda k: 10.0 * 0.98 ** sum(1 for v in k.values() if v not in (False, 0, 1, "scalar", "serial")))
    r = _search(small("gemm"), ev, SearchConfig(budget=1000, iterations=3, patience=1, beam_size=4))
    assert r.stop_reason == "iterations" and r.iterations == 3


def test_no_correct_kernel_stops():
    r = _search(small("gemm"), FakeEvaluator(bad=lambda k: True), SearchConfig(budget=10))
    assert r.best is None and r.stop_reason == "no correct kernel" and r.iterations == 0
    assert r.candidates_evaluated == 1 and r.speedup is None


def test_search_is_deterministic_for_a_seed():
    cfg = SearchConfig(budget=25, seed=3)
    a = _search(small("prefill"), FakeEvaluator(), cfg)
    b = _search(small("prefill"), FakeEvaluator(), cfg)
    assert [(c.id, c.code_hash) for c in a.candidates] == [(c.id, c.code_hash) for c in b.candidates]
    c = _search(small("prefill"), FakeEvaluator(), SearchConfig(budget=25, seed=4))
    assert [x.code_hash for x in c.candidates] != [x.code_hash for x in a.candidates]


def test_search_space_exhausted():
    r = _search(small("rmsnorm"), FakeEvaluator(), SearchConfig(budget=1000, iterations=100, patience=100))
    assert r.stop_reason == "search space exhausted"
    assert r.candidates_evaluated < 1000


def test_iterations_count_completed_iterations_when_exhausted():
    r = _search(small("rmsnorm"), FakeEvaluator(), SearchConfig(budget=1000, iterations=100, patience=100))
    assert r.stop_reason == "search space exhausted"
    assert r.iterations == len(r.history) - 1


class _ScriptedProposer:
    """Round r proposes the children named in `script[r]` (codes that differ only in a comment are one kernel)."""

    def __init__(self, script):
        self.script = script

    def propose(self, parent, workload, target, feedback, n_plans, n_impls, rng, iteration):
        return [Candidate(id="", parent_id=parent.id, iteration=iteration, language="c",
                          code=f"// kernel {name}\nvoid f(){{}} /* {iteration} */ int v{name};", knobs=parent.knobs)
                for name in self.script.get(iteration, [])]


def test_a_round_of_only_duplicates_does_not_end_the_search():
    script = {1: ["a"], 2: ["a"], 3: ["b"], 4: ["b"], 5: ["b"], 6: ["b"], 7: ["c"]}
    cfg = SearchConfig(budget=1000, iterations=20, patience=20)
    r = BeamSearch(FakeTarget(FakeEvaluator()), small("gemm"), FakeEvaluator(), [_ScriptedProposer(script)], cfg).run()
    assert [c.iteration for c in r.candidates] == [0, 1, 3]  # round 2's duplicate is skipped, round 3 runs
    assert r.stop_reason == "search space exhausted"  # rounds 4-6 proposed only duplicates: round 7 never ran
    assert r.iterations == len(r.history) - 1 == 2


def test_rounds_of_duplicates_count_against_patience():
    cfg = SearchConfig(budget=1000, iterations=20, patience=2)
    r = BeamSearch(FakeTarget(FakeEvaluator()), small("gemm"), FakeEvaluator(), [_ScriptedProposer({1: ["a"]})],
                   cfg).run()
    assert [c.iteration for c in r.candidates] == [0, 1]
    assert r.stop_reason == "no improvement in 2 iterations"  # round 1 did not improve, round 2 proposed nothing


def test_seeds_are_evaluated_and_can_win():
    w = small("gemm")
    target = FakeTarget(FakeEvaluator())
    knobs = target.legalize(w, dict(isa="avx2", rows=4, threads="static", bf16_split=True))
    seed = Candidate(id="s", parent_id=None, iteration=5, language="c", code=target.generate(w, knobs), knobs=knobs,
                     origin="reuse:x")
    r = _search(w, FakeEvaluator(), SearchConfig(budget=2), seeds=[seed])
    assert [c.id for c in r.candidates] == ["root", "seed0"]
    assert r.best.id == "seed0" and r.best.iteration == 0


def test_seed_identical_to_root_is_not_evaluated_twice():
    w = small("gemm")
    target = FakeTarget(FakeEvaluator())
    dup = copy.deepcopy(target.lower(w))
    r = _search(w, FakeEvaluator(), SearchConfig(budget=10), seeds=[dup])
    hashes = [c.code_hash for c in r.candidates]
    assert len(set(hashes)) == len(hashes)


def test_correct_result_without_p99_does_not_crash():
    class NoP99(FakeEvaluator):
        def evaluate(self, candidates):
            return [EvalResult(correct=True, stage="ok", latency_ms=1.0) for _ in candidates]

    r = _search(small("gemm"), NoP99(), SearchConfig(budget=5))
    assert r.best is not None


def test_config_validation():
    with pytest.raises(ValueError, match="budget"):
        SearchConfig(budget=0)
    with pytest.raises(ValueError, match="beam_size"):
        SearchConfig(beam_size=0)
    with pytest.raises(ValueError, match="dropout"):
        SearchConfig(dropout=1.0)
    with pytest.raises(ValueError, match="min_depth"):
        SearchConfig(min_depth=0)
    with pytest.raises(ValueError, match="proposer"):
        BeamSearch(FakeTarget(FakeEvaluator()), small("gemm"), FakeEvaluator(), [], SearchConfig())


def test_progress_callback():
    calls = []
    ev = FakeEvaluator()
    r = BeamSearch(FakeTarget(ev), small("gemm"), ev, [ScheduleProposer()], SearchConfig(budget=12, iterations=3,
                   patience=5), progress=lambda *a: calls.append(a)).run()
    assert len(calls) == r.iterations + 1
    done = [c[0] for c in calls]
    assert done == sorted(done) and done[-1] == r.candidates_evaluated and all(c[1] == 12 for c in calls)


def test_normalized_code_hash_ignores_comments_and_whitespace():
    a = "int f(void) { return 1; } /* one */"
    b = "// header\nint f(void)\n{\n  return 1;\n}\n"
    assert normalized_code_hash(a) == normalized_code_hash(b)
    assert normalized_code_hash(a) != normalized_code_hash("int f(void) { return 2; }")


def test_candidate_round_trip():
    c = Candidate(id="a", parent_id="root", iteration=2, language="c", code="x", plan="p", menu_ids=["m"],
                  knobs={"isa": "avx2"}, result=EvalResult(True, "ok", latency_ms=1.5))
    d = json.loads(json.dumps(c.to_dict()))
    assert d["code_hash"] == c.code_hash
    back = Candidate.from_dict(d)
    assert back == c and back.latency_ms == 1.5
    assert Candidate(id="b", parent_id=None, iteration=0, language="c", code="x").latency_ms == float("inf")


# ---------------------------------------------------------------- the run-off


class RunOffEvaluator(FakeEvaluator):
    """A fake evaluator with a run-off: each finalist is timed there at `run_off_ms(rank alone, knobs)`;
    `wrong(knobs)` finalists compute a wrong result there; `fails` raises RunOffError instead."""

    def __init__(self, run_off_ms=None, wrong=None, fails=False, **kw):
        super().__init__(**kw)
        self.run_off_ms = run_off_ms or (lambda rank, k: fake_latency(k))
        self.wrong, self.fails = wrong or (lambda k: False), fails
        self.run_offs: list[list[str]] = []

    def run_off(self, candidates):
        self.run_offs.append([c.id for c in candidates])
        if self.fails:
            raise RunOffError("worker crashed")
        timing = {c.code_hash: {"median_ms": self.run_off_ms(i, c.knobs), "p99_ms": None, "runs": 7}
                  for i, c in enumerate(candidates)}
        timing["eager"] = {"median_ms": 2.5, "p99_ms": None, "runs": 7}
        return {"timing": timing, "wrong": {c.code_hash: "out mismatch" for c in candidates if self.wrong(c.knobs)}}


def test_the_run_off_names_the_winner_among_the_fastest_candidates():
    """Timed together, the third fastest as timed alone is the fastest: it wins, and the record says so."""
    ev = RunOffEvaluator(run_off_ms=lambda rank, k: [3.0, 2.0, 1.0][rank])
    r = _search(small("gemm"), ev, SearchConfig(budget=30, iterations=20, patience=20))
    ranked = sorted((c for c in r.candidates if c.correct), key=lambda c: c.latency_ms)
    assert ev.run_offs == [[c.id for c in ranked[:3]]]
    assert r.best is ranked[2] and r.best.latency_ms > ranked[0].latency_ms  # its own timing is kept
    assert r.run_off["winner"] == ranked[2].id and r.run_off["fastest_alone"] == ranked[0].id
    assert [f["run_off_ms"] for f in r.run_off["finalists"]] == [3.0, 2.0, 1.0]
    assert [f["alone_ms"] for f in r.run_off["finalists"]] == [c.latency_ms for c in ranked[:3]]
    assert r.run_off["eager_ms"] == 2.5 and r.baseline_ms == r.best.result.baseline_ms
    assert summarize(r, small("gemm"))["run_off"] == r.run_off


def test_the_fastest_alone_wins_a_run_off_it_also_wins():
    ev = RunOffEvaluator()
    r = _search(small("gemm"), ev, SearchConfig(budget=30, iterations=20, patience=20, finalists=4))
    ranked = sorted((c for c in r.candidates if c.correct), key=lambda c: c.latency_ms)
    assert len(ev.run_offs[0]) == 4 and r.best is ranked[0] and r.run_off["winner"] == ranked[0].id


def test_one_finalist_or_an_evaluator_without_a_run_off_means_no_run_off():
    ev = RunOffEvaluator(run_off_ms=lambda rank, k: [3.0, 2.0, 1.0][rank])
    r = _search(small("gemm"), ev, SearchConfig(budget=30, iterations=20, patience=20, finalists=1))
    assert not ev.run_offs and r.run_off is None
    assert r.best is min((c for c in r.candidates if c.correct), key=lambda c: c.latency_ms)
    plain = _search(small("gemm"), FakeEvaluator(), SearchConfig(budget=30, iterations=20, patience=20))
    assert plain.run_off is None and summarize(plain, small("gemm"))["run_off"] is None


def test_a_finalist_wrong_in_the_run_off_fails_and_never_wins(tmp_path):
    """The fastest as timed alone is wrong after the run-off's timing: it fails, is saved as failed (a resumed run
    does not take it back), and the fastest of the others in the run-off wins."""
    first = _search(small("gemm"), FakeEvaluator(), SearchConfig(budget=30, iterations=20, patience=20))
    cheat = first.best.knobs
    ev = RunOffEvaluator(wrong=lambda k: k == cheat)
    run_dir = RunDirectory(tmp_path / "run", {"x": 1})
    r = _search(small("gemm"), ev, SearchConfig(budget=30, iterations=20, patience=20), run_dir)
    (failed,) = [c for c in r.candidates if c.knobs == cheat]
    assert not failed.correct and failed.result.stage == "correctness" and "out mismatch" in failed.result.message
    assert r.best is not failed and r.best.correct
    assert r.best is min((c for c in r.candidates if c.correct), key=lambda c: c.latency_ms)
    assert r.run_off["finalists"][0]["wrong"] == "out mismatch" and r.run_off["winner"] == r.best.id
    assert run_off_line("gemm", r.run_off).startswith(f"gemm: the run-off of the 3 fastest found {failed.id} wrong")
    saved = json.loads(next((tmp_path / "run").glob(f"iter-*/{failed.id}/candidate.json")).read_text())
    assert saved["result"]["correct"] is False
    assert not RunDirectory(tmp_path / "run", {"x": 1}).load_results()[failed.code_hash].correct


def test_when_every_finalist_is_wrong_the_fastest_of_the_rest_wins():
    ev = RunOffEvaluator(wrong=lambda k: True)
    r = _search(small("gemm"), ev, SearchConfig(budget=30, iterations=20, patience=20, finalists=2))
    assert all(f["wrong"] for f in r.run_off["finalists"])
    assert r.best is min((c for c in r.candidates if c.correct), key=lambda c: c.latency_ms)
    assert r.best.id not in ev.run_offs[0] and r.run_off["winner"] == r.best.id
    assert run_off_line("gemm", r.run_off).endswith(f"winner {r.best.id}, the fastest of the others as timed alone")


def test_after_a_run_off_that_does_not_finish_the_fastest_that_passes_again_wins(caplog, tmp_path):
    """The worker died during the run-off: each finalist is evaluated again alone. Here the fastest crashes then
    (it is the one that took the worker down): it fails for good, and the next fastest wins."""
    class CrashesInRunOff(RunOffEvaluator):
        def run_off(self, candidates):
            crasher = candidates[0].knobs
            self.bad = lambda k: k == crasher
            return super().run_off(candidates)

    ev = CrashesInRunOff(fails=True)
    run_dir = RunDirectory(tmp_path / "run", {"x": 1})
    with caplog.at_level("WARNING"):
        r = _search(small("gemm"), ev, SearchConfig(budget=30, iterations=20, patience=20), run_dir)
    finalists = [c for c in r.candidates if c.id in ev.run_offs[0]]
    crasher = next(c for c in finalists if c.id == ev.run_offs[0][0])
    assert not crasher.correct and crasher.result.message.startswith("evaluated again after a run-off")
    assert not RunDirectory(tmp_path / "run", {"x": 1}).load_results()[crasher.code_hash].correct
    assert r.best is min((c for c in r.candidates if c.correct), key=lambda c: c.latency_ms)
    assert r.best.id == ev.run_offs[0][1]
    assert r.run_off == {"error": "worker crashed", "finalists": ev.run_offs[0], "failed_again": [crasher.id],
                         "winner": r.best.id}
    assert run_off_line("gemm", r.run_off) == (f"gemm: the run-off did not finish (worker crashed); failed when "
                                               f"evaluated again: {crasher.id}; winner {r.best.id}")
    assert ev.seen[-3:] == [c.code_hash for c in sorted(finalists, key=lambda c: ev.run_offs[0].index(c.id))]
    assert "run-off of 3 finalists did not finish (worker crashed); each is evaluated again alone" in caplog.text


def test_after_a_run_off_that_does_not_finish_finalists_that_pass_again_keep_their_order():
    ev = RunOffEvaluator(fails=True)
    r = _search(small("gemm"), ev, SearchConfig(budget=30, iterations=20, patience=20))
    assert r.best is min((c for c in r.candidates if c.correct), key=lambda c: c.latency_ms)
    assert r.best.id == ev.run_offs[0][0] and r.run_off["failed_again"] == []


def test_finalists_keep_earlier_run_names_at_their_default(tmp_path):
    from autocomp_compile.optimize import run_name, search_config
    from autocomp_compile.targets.cpu.target import CpuTarget

    w, t = small("gemm"), CpuTarget(["scalar"])
    assert "finalists" not in search_config(SearchConfig()) and search_config(SearchConfig(finalists=1))["finalists"] == 1
    assert run_name(w, t, SearchConfig(), SETTINGS) != run_name(w, t, SearchConfig(finalists=1), SETTINGS)
    with pytest.raises(ValueError, match="finalists"):
        SearchConfig(finalists=0)


# ---------------------------------------------------------------- run directory and resume


def _optimize(w, evaluator, out, config, name=None):
    return optimize(w, FakeTarget(evaluator), config, SETTINGS, output_dir=out, name=name)


def test_run_directory_layout(tmp_path):
    w = small("gemm")
    ev = FakeEvaluator()
    r = _optimize(w, ev, tmp_path, SearchConfig(budget=9, iterations=3, patience=5))
    assert ev.closed  # optimize() closes its evaluator
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert run.name.startswith("gemm-bf16-cpu-")
    config = json.loads((run / "config.json").read_text())
    assert config["search"]["budget"] == 9 and config["workload"] == json.loads(json.dumps(w.describe()))
    assert config["eval"]["timing_budget_ms"] == 20 and config["proposers"] == ["schedule"]
    root = run / "iter-000" / "root"
    assert (root / "kernel.c").read_text() == r.root.code
    assert (root / "plan.md").read_text().startswith("Naive translation")
    cand = json.loads((root / "candidate.json").read_text())
    assert cand["id"] == "root" and cand["code_hash"] == r.root.code_hash and cand["result"]["correct"]
    assert json.loads((run / "iter-000" / "beam.json").read_text()) == ["root"]
    for c in r.candidates:
        d = run / f"iter-{c.iteration:03d}" / c.id
        assert (d / "kernel.c").exists() and (d / "plan.md").exists() and (d / "candidate.json").exists()
    for it in range(r.iterations + 1):
        assert (run / f"iter-{it:03d}" / "beam.json").exists()
    result = json.loads((run / "result.json").read_text())
    assert result["best_id"] == r.best.id and result["candidates_evaluated"] == r.candidates_evaluated
    assert result["evaluated_now"] == r.candidates_evaluated and result["signature"] == w.signature()
    assert result["speedup"] == pytest.approx(r.speedup) and result["correct"] is True
    assert not list(run.rglob("*.tmp"))


def test_resume_evaluates_nothing(tmp_path):
    w = small("mlp")
    cfg = SearchConfig(budget=15, iterations=6, patience=6)
    first = _optimize(w, FakeEvaluator(), tmp_path, cfg)
    again = _optimize(w, FakeEvaluator(forbid=True), tmp_path, cfg)
    assert again.evaluated_now == 0
    assert again.best.id == first.best.id and again.best.code_hash == first.best.code_hash
    assert again.best.latency_ms == first.best.latency_ms
    assert [c.code_hash for c in again.candidates] == [c.code_hash for c in first.candidates]
    result = json.loads(next(tmp_path.glob("*/result.json")).read_text())
    assert result["evaluated_now"] == 0 and result["candidates_evaluated"] == first.candidates_evaluated


def test_forbidding_evaluator_really_raises(tmp_path):
    """Guard for the test above: with a fresh output dir the forbidding evaluator is called."""
    with pytest.raises(EvaluatorCalled):
        _optimize(small("mlp"), FakeEvaluator(forbid=True), tmp_path, SearchConfig(budget=15))


@pytest.mark.parametrize("interrupt_after", [1, 6, 11])
def test_interrupted_run_resumes_with_only_the_missing_candidates(tmp_path, interrupt_after):
    w = small("gemm")
    cfg = SearchConfig(budget=16, iterations=8, patience=8, plans_per_parent=2, impls_per_plan=2, beam_size=2)
    reference = _optimize(w, FakeEvaluator(), tmp_path / "ref", cfg)
    assert reference.candidates_evaluated == 16

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _optimize(w, FakeEvaluator(interrupt_after=interrupt_after), out, cfg)
    saved = [json.loads(p.read_text()) for p in out.glob("*/iter-*/*/candidate.json")]
    saved_hashes = {d["code_hash"] for d in saved if d.get("result")}
    assert len(saved_hashes) == interrupt_after  # every result known before the interrupt, not whole batches
    assert not list(out.glob("*/result.json"))

    ev = FakeEvaluator()
    resumed = _optimize(w, ev, out, cfg)
    assert resumed.evaluated_now == 16 - len(saved_hashes)
    assert not (set(ev.seen) & saved_hashes)  # nothing evaluated twice
    assert resumed.best.code_hash == reference.best.code_hash
    assert [c.code_hash for c in resumed.candidates] == [c.code_hash for c in reference.candidates]


def test_run_conflict_on_other_settings(tmp_path):
    w = small("gemm")
    _optimize(w, FakeEvaluator(), tmp_path, SearchConfig(budget=5), name="shared")
    with pytest.raises(RunConflict, match="different settings"):
        _optimize(w, FakeEvaluator(forbid=True), tmp_path, SearchConfig(budget=6), name="shared")
    with pytest.raises(RunConflict):
        _optimize(small("gemm", "fp32"), FakeEvaluator(forbid=True), tmp_path, SearchConfig(budget=5), name="shared")
    # same settings, same name: a resume, not a conflict
    assert _optimize(w, FakeEvaluator(forbid=True), tmp_path, SearchConfig(budget=5), name="shared").evaluated_now == 0


def test_a_run_directory_with_an_unreadable_config_is_a_conflict_not_a_traceback(tmp_path):
    w = small("gemm")
    _optimize(w, FakeEvaluator(), tmp_path, SearchConfig(budget=3), name="edited")
    (cfg,) = tmp_path.glob("edited/config.json")
    cfg.write_text('{"workload": ')
    with pytest.raises(RunConflict, match="not valid JSON"):
        _optimize(w, FakeEvaluator(forbid=True), tmp_path, SearchConfig(budget=3), name="edited")


def test_default_run_names_separate_settings(tmp_path):
    w = small("gemm")
    _optimize(w, FakeEvaluator(), tmp_path, SearchConfig(budget=3))
    _optimize(w, FakeEvaluator(), tmp_path, SearchConfig(budget=4))
    _optimize(small("gemm", "fp32"), FakeEvaluator(), tmp_path, SearchConfig(budget=3))
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3


def test_load_results_skips_corrupt_files(tmp_path):
    rd = RunDirectory(tmp_path / "r", {"a": 1})
    c = Candidate(id="x", parent_id=None, iteration=0, language="c", code="int a;", result=EvalResult(True, "ok", latency_ms=2.0))
    rd.save_candidate(c)
    bad = tmp_path / "r" / "iter-000" / "y"
    bad.mkdir()
    (bad / "candidate.json").write_text('{"id": "y", "code_ha')  # interrupted mid-write
    for name, text in {"z": '{"result": {"correct": true}}', "w": '[1, 2]', "v": b"\xff\xfe".decode("latin-1")}.items():
        (tmp_path / "r" / "iter-000" / name).mkdir()  # valid JSON of the wrong shape, bytes that are not UTF-8
        (tmp_path / "r" / "iter-000" / name / "candidate.json").write_text(text, encoding="latin-1")
    memo = rd.load_results()
    assert set(memo) == {c.code_hash} and memo[c.code_hash].latency_ms == 2.0
    with pytest.raises(RunConflict):
        RunDirectory(tmp_path / "r", {"a": 2})


def test_two_writers_of_one_run_directory_never_share_a_temporary_file(tmp_path):
    """Two searches with the same settings (two warms, ranks of one job) write the same files: each write goes
    through a temporary file of its own, so neither renames the other's away (FileNotFoundError before)."""
    import threading

    rd = RunDirectory(tmp_path / "r", {"a": 1})
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(200):
                rd.save_result({"writer": n, "i": i, "pad": "x" * 2000})
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert json.loads((tmp_path / "r" / "result.json").read_text())["i"] == 199
    assert not list((tmp_path / "r").glob("*.tmp"))


# ---------------------------------------------------------------- real end to end


def test_optimize_end_to_end_tiny_gemm(tmp_path):
    """Real compile + worker evaluation of ~8 candidates (~10-15 s here: gcc and the worker's torch import)."""
    w = small("gemm", "bf16")
    cfg = SearchConfig(budget=8, iterations=4, patience=4, seed=0)
    settings = EvalSettings(correctness_sets=2, timing_budget_ms=20, timeout_s=60)
    r = optimize(w, "cpu", cfg, settings, output_dir=tmp_path / "out")
    assert r.root.correct
    assert r.best is not None and r.best.correct and r.best.result.stage == "ok"
    assert r.candidates_evaluated <= 8 and r.evaluated_now == r.candidates_evaluated
    assert r.best.latency_ms <= r.root.latency_ms
    assert r.speedup is not None and r.speedup > 0
    (result_json,) = list((tmp_path / "out").glob("*/result.json"))
    summary = json.loads(result_json.read_text())
    assert summary["correct"] is True and summary["speedup"] == pytest.approx(r.speedup)
    assert summary["best_ms"] == pytest.approx(r.best.latency_ms) and summary["naive_ms"] > 0
    assert summary["bytes_moved"] == w.bytes_moved()
    # the fastest three were timed again together (the CPU evaluator's run-off), and the winner came from them
    finalists = summary["run_off"]["finalists"]
    assert len(finalists) == min(3, sum(c.correct for c in r.candidates)) >= 2
    assert summary["run_off"]["winner"] == r.best.id and r.best.id in [f["id"] for f in finalists]
    assert all(f["run_off_ms"] > 0 and f["wrong"] is None for f in finalists) and summary["run_off"]["eager_ms"] > 0
    # builds went to the temporary cache set by tests/conftest.py, not ~/.cache
    assert list((tmp_path / "cache").glob("build/cpu/k_*.so"))


class TwoModeTarget(FakeTarget):
    """A fake target with a deterministic variant (own fingerprint), recording the settings it evaluates with."""

    def __init__(self, evaluator, deterministic=False):
        super().__init__(evaluator)
        self.deterministic = deterministic
        self.settings_seen = []
        self.variant = self if deterministic else TwoModeTarget(evaluator, deterministic=True)

    def deterministic_variant(self):
        return self.variant

    def fingerprint(self):
        return {**super().fingerprint(), **({"deterministic": True} if self.deterministic else {})}

    def make_evaluator(self, workload, build_dir=None, settings=None):
        self.settings_seen.append(settings)
        return self.evaluator


def test_optimize_searches_deterministic_kernels_with_the_targets_variant(tmp_path):
    """Deterministic settings switch to the target's variant (its fingerprint, its cache entries), and the
    variant always evaluates with the repeat check on, whatever settings it was given."""
    w = small("gemm")
    plain = TwoModeTarget(FakeEvaluator())
    optimize(w, plain, SearchConfig(budget=3), dataclasses.replace(SETTINGS, deterministic=True), tmp_path / "a")
    assert not plain.settings_seen and plain.variant.settings_seen[-1].deterministic
    (config,) = [json.loads(p.read_text()) for p in (tmp_path / "a").glob("*/config.json")]
    assert config["target"]["deterministic"] and config["eval"]["deterministic"]
    variant = TwoModeTarget(FakeEvaluator(), deterministic=True)
    optimize(w, variant, SearchConfig(budget=3), SETTINGS, tmp_path / "b")
    assert variant.settings_seen[-1].deterministic
    (config,) = [json.loads(p.read_text()) for p in (tmp_path / "b").glob("*/config.json")]
    assert config["eval"]["deterministic"]
    optimize(w, plain, SearchConfig(budget=3), SETTINGS, tmp_path / "c")
    assert not plain.settings_seen[-1].deterministic


def test_a_correct_result_with_an_impossible_latency_is_never_best():
    """NaN (a damaged run record, a remote worker), 0 or a negative latency: such a candidate never heads the beam,
    whatever sorting NaN would do."""
    def latency(k):
        return float("nan") if k["rows"] == 2 else 0.0 if k["rows"] == 4 else fake_latency(k)

    r = _search(small("gemm"), FakeEvaluator(latency=latency), SearchConfig(budget=40, iterations=20, patience=20))
    odd = [c for c in r.candidates if c.correct and c.knobs["rows"] in (2, 4)]
    assert odd, "the search never reached rows=2 or rows=4"
    usable = [c for c in r.candidates if c.correct and c.knobs["rows"] not in (2, 4)]
    assert r.best is min(usable, key=lambda c: c.latency_ms)
