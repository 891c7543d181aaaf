"""Beam search over candidate kernels (the Autocomp loop): propose, dedupe, evaluate, keep the best."""
from __future__ import annotations

import dataclasses
import inspect
import itertools
import logging
import math
import random
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from autocomp_compile.search.artifacts import RunDirectory
from autocomp_compile.search.candidate import Candidate
from autocomp_compile.targets.base import EvalResult, Evaluator, RunOffError, Target
from autocomp_compile.workload import Workload

if TYPE_CHECKING:
    from autocomp_compile.agents.schedule import Proposer


log = logging.getLogger(__name__)

# Rounds in a row that propose only already-seen kernels before the search calls its space exhausted.
EMPTY_ROUNDS = 3


@dataclass(frozen=True)
class SearchConfig:
    """Knobs of the search; every field can be set from the CLI or from Python."""

    budget: int = 64  # candidates evaluated, the naive root and reuse seeds included
    beam_size: int = 4
    iterations: int = 12
    plans_per_parent: int = 3
    impls_per_plan: int = 2
    dropout: float = 0.7
    seed: int = 0
    patience: int = 4  # stop after this many iterations without a >1% improvement
    # Iterations the budget is spread over at least (at most `iterations`): an iteration evaluates at most
    # ceil((budget - starting points) / min_depth) children (never fewer than beam_size), so that a small budget
    # still takes several menu steps instead of spending itself on the first two.
    min_depth: int = 6
    # The fastest few correct candidates timed again against each other in one timing loop before the winner is
    # named (the evaluator's run-off); 1: the fastest as measured alone wins.
    finalists: int = 3

    def __post_init__(self) -> None:
        for name in ("budget", "beam_size", "iterations", "plans_per_parent", "impls_per_plan", "patience",
                     "min_depth", "finalists"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class SearchResult:
    root: Candidate | None  # None when the kernel came from the cache
    best: Candidate | None
    candidates: list[Candidate]
    iterations: int
    stop_reason: str
    baseline_ms: float | None
    evaluated_now: int  # evaluated in this process (the rest came from the run directory)
    history: list[dict[str, Any]] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)  # cache keys whose schedules seeded the search
    # The workload's key in the kernel cache, set when the result came from it or was offered to it: the entry
    # there is `best`, or a faster kernel cached before (a slower one never replaces it).
    cache_key: str | None = None
    # The run-off of the finalists (see BeamSearch.run_off); None when there was none.
    run_off: dict[str, Any] | None = None

    @property
    def from_cache(self) -> bool:
        return self.stop_reason == "cache hit"

    @property
    def candidates_evaluated(self) -> int:
        return len(self.candidates)

    @property
    def speedup(self) -> float | None:
        if self.best is None or self.baseline_ms is None:
            return None
        return self.baseline_ms / self.best.latency_ms


ProgressFn = Callable[[int, int, Candidate | None, float | None], None]


def _rankable(c: Candidate) -> bool:
    """Correct, with a latency a kernel can have (a NaN or zero from a damaged record or a remote worker is
    neither best nor a parent)."""
    return c.correct and c.latency_ms != float("inf")


def _fastest_correct(ranked: list[Candidate]) -> Candidate | None:
    """The first of `ranked` (fastest first) still rankable: finalists failed by a run-off are passed over."""
    return next((c for c in ranked if _rankable(c)), None)


class BeamSearch:
    def __init__(
        self,
        target: Target,
        workload: Workload,
        evaluator: Evaluator,
        proposers: list["Proposer"],
        config: SearchConfig,
        run_dir: RunDirectory | None = None,
        progress: ProgressFn | None = None,
    ):
        if not proposers:
            raise ValueError("at least one proposer is needed")
        self.target, self.workload, self.evaluator = target, workload, evaluator
        self.proposers, self.config, self.run_dir = proposers, config, run_dir
        self.progress = progress or (lambda *a: None)
        self._memo: dict[str, EvalResult] = run_dir.load_results() if run_dir else {}
        self._evaluated_now = 0
        # evaluators that report each result as it is known (Evaluator.evaluate's on_result)
        self._streams_results = "on_result" in inspect.signature(evaluator.evaluate).parameters

    def _evaluate(self, cands: list[Candidate]) -> None:
        todo = [c for c in cands if c.code_hash not in self._memo]

        def record(i: int, r: EvalResult) -> None:  # saved at once: a resumed run does not evaluate it again
            c = todo[i]
            if c.code_hash not in self._memo:
                self._memo[c.code_hash] = r
                self._evaluated_now += 1
                c.result = r
                if self.run_dir:
                    self.run_dir.save_candidate(c)

        if todo:
            if self._streams_results:
                results = self.evaluator.evaluate(todo, on_result=record)
            else:
                results = self.evaluator.evaluate(todo)
            for i, r in enumerate(results):
                record(i, r)
        for c in cands:
            if c.result is not self._memo[c.code_hash]:  # not saved by record() above
                c.result = self._memo[c.code_hash]
                if self.run_dir:
                    self.run_dir.save_candidate(c)

    def _feedback(self, c: Candidate) -> str:
        r = c.result
        if r is None:
            return ""
        if not r.correct:
            return f"failed at {r.stage}: {r.message}"
        p99 = f", {r.latency_p99_ms:.3f} ms p99" if r.latency_p99_ms is not None else ""
        base = f" (PyTorch eager {r.baseline_ms:.3f} ms)" if r.baseline_ms else ""
        return f"latency {r.latency_ms:.3f} ms median{p99}{base}"

    def _repairs(self, children: list[Candidate], seen: set[str], iteration: int, room: int) -> list[Candidate]:
        """Proposers that repair (LLM proposers with repair on) get one more call per failed child."""
        fixers = [p for p in self.proposers if getattr(p, "repair_failed", False)]
        failed = [c for c in children if not c.correct]
        if not fixers or not failed or room <= 0:
            return []
        fixes = []
        for fix in fixers[0].repair(failed, self.workload, self.target, iteration):
            if fix.code_hash not in seen and len(fixes) < room:
                seen.add(fix.code_hash)
                fix.id, fix.iteration = f"i{iteration}r{len(fixes):02d}", iteration
                fixes.append(fix)
        self._evaluate(fixes)
        return fixes

    def run(self, seeds: list[Candidate] | None = None) -> SearchResult:
        cfg = self.config
        rng = random.Random(cfg.seed)
        root = self.target.lower(self.workload)
        first, seen = [root], {root.code_hash}
        for c in seeds or []:
            if c.code_hash not in seen and len(first) < cfg.budget:
                seen.add(c.code_hash)
                first.append(c)
        for i, c in enumerate(first[1:]):
            c.id, c.iteration, c.parent_id = f"seed{i}", 0, None
        self._evaluate(first)
        every = list(first)
        beam = sorted((c for c in first if _rankable(c)), key=lambda c: c.latency_ms)[: cfg.beam_size]
        rounds = min(cfg.min_depth, cfg.iterations)  # a search of fewer iterations spends its budget in those
        round_size = max(cfg.beam_size, math.ceil((cfg.budget - len(first)) / rounds))
        history = [self._snapshot(0, beam, every)]
        if self.run_dir:
            self.run_dir.save_beam(0, beam)
        self.progress(len(every), cfg.budget, beam[0] if beam else None, self._baseline(beam, every))
        stop, stale, empty = "iterations", 0, 0
        for iteration in range(1, cfg.iterations + 1):
            if len(every) >= cfg.budget:
                stop = "budget"
                break
            if not beam:
                stop = "no correct kernel"
                break
            room = min(cfg.budget - len(every), round_size)
            # A round that cannot hold every child asks for fewer implementations per plan first (distinct menu
            # items are worth more than parameter variants of one), then for fewer plans: every beam member
            # still gets some, and proposers (LLMs included) are seldom asked for children the round drops.
            impls = min(cfg.impls_per_plan, max(1, math.ceil(room / (len(beam) * cfg.plans_per_parent))))
            plans = min(cfg.plans_per_parent, max(1, math.ceil(room / (len(beam) * impls))))
            per_parent: list[list[Candidate]] = []
            for j, parent in enumerate(beam):
                proposer = self.proposers[(iteration + j) % len(self.proposers)]
                per_parent.append([])
                for child in proposer.propose(
                    parent, self.workload, self.target, self._feedback(parent),
                    plans, impls, rng, iteration,
                ):
                    if child.code_hash not in seen:
                        seen.add(child.code_hash)
                        per_parent[-1].append(child)
            # Round robin over the parents, best first: a full round leaves room for every beam member's first child.
            children = [c for group in itertools.zip_longest(*per_parent) for c in group if c is not None]
            for c in children[room:]:
                seen.discard(c.code_hash)  # not evaluated: a later round may propose it again
            children = children[:room]
            if not children:
                # Only duplicates this round: menu dropout and the proposer's random draws may still find new
                # candidates next round, so an empty round counts as a stale one and ends the search only
                # after EMPTY_ROUNDS in a row (or when patience runs out).
                stale, empty = stale + 1, empty + 1
                if empty >= min(EMPTY_ROUNDS, cfg.patience) or stale >= cfg.patience:
                    stop = "search space exhausted" if empty >= min(EMPTY_ROUNDS, cfg.patience) else \
                        f"no improvement in {cfg.patience} iterations"
                    break
                continue
            empty = 0
            for n, child in enumerate(children):
                child.id = f"i{iteration}c{n:02d}"
                child.iteration = iteration
            self._evaluate(children)
            every += children
            fixes = self._repairs(children, seen, iteration, cfg.budget - len(every))
            every += fixes
            children += fixes
            best_before = beam[0].latency_ms
            pool = {c.code_hash: c for c in beam + [c for c in children if _rankable(c)]}
            beam = sorted(pool.values(), key=lambda c: c.latency_ms)[: cfg.beam_size]
            history.append(self._snapshot(iteration, beam, children))
            if self.run_dir:
                self.run_dir.save_beam(iteration, beam)
            self.progress(len(every), cfg.budget, beam[0], self._baseline(beam, every))
            stale = 0 if beam[0].latency_ms < 0.99 * best_before else stale + 1
            if stale >= cfg.patience:
                stop = f"no improvement in {cfg.patience} iterations"
                break
        best, run_off = self.run_off(every)
        if best is not None and beam and best is not beam[0]:
            self.progress(len(every), cfg.budget, best, self._baseline([best], every))
        result = SearchResult(
            root=root,
            best=best,
            candidates=every,
            iterations=len(history) - 1,  # iterations that evaluated candidates
            stop_reason=stop,
            baseline_ms=self._baseline([best] if best else [], every),
            evaluated_now=self._evaluated_now,
            history=history,
            run_off=run_off,
        )
        if self.run_dir:
            self.run_dir.save_result(summarize(result, self.workload))
        return result

    def run_off(self, every: list[Candidate]) -> tuple[Candidate | None, dict[str, Any] | None]:
        """The winner among the evaluated candidates `every`, and the record of its run-off.

        Each candidate was timed in its own time window, and this machine's speed drifts between windows, so the
        fastest as measured alone may be only the luckiest. The `finalists` fastest are therefore timed again,
        interleaved with each other and eager in one loop (the evaluator's `run_off`), and the fastest there
        wins. A finalist whose output is wrong after the run-off's timing fails, as if its evaluation had found
        it, and is never the winner. Without a run-off (one finalist, an evaluator without one), the fastest as
        measured alone wins; after a run-off that did not finish, the fastest that passes its evaluation again
        (`_run_off_failed`)."""
        ranked = sorted((c for c in every if _rankable(c)), key=lambda c: c.latency_ms)
        finalists = ranked[: self.config.finalists]
        run = getattr(self.evaluator, "run_off", None)
        if len(finalists) < 2 or run is None:
            return (ranked[0] if ranked else None), None
        try:
            out = run(finalists)
        except RunOffError as exc:
            return self._run_off_failed(ranked, finalists, str(exc))
        if out is None:
            return ranked[0], None
        timing, wrong = out["timing"], out["wrong"]
        alone = {c.code_hash: c.latency_ms for c in finalists}
        for c in finalists:
            if c.code_hash in wrong:
                log.warning("%s: finalist %s computed a wrong result in the run-off: %s", self.workload.name, c.id,
                            wrong[c.code_hash])
                self._fail(c, EvalResult.failure("correctness", f"in the run-off, after timing: {wrong[c.code_hash]}"))
        standing = [c for c in finalists if c.code_hash not in wrong]
        if standing:
            winner = min(standing, key=lambda c: timing[c.code_hash]["median_ms"])
        else:  # every finalist failed: the fastest of the rest, as timed alone
            winner = _fastest_correct(ranked)
        eager = timing.get("eager", {}).get("median_ms")
        record = {
            "finalists": [{"id": c.id, "alone_ms": alone[c.code_hash],
                           "run_off_ms": timing[c.code_hash]["median_ms"], "runs": timing[c.code_hash]["runs"],
                           "wrong": wrong.get(c.code_hash)} for c in finalists],
            "eager_ms": eager,
            "winner": winner.id if winner else None,
            "fastest_alone": ranked[0].id,
        }
        if winner is not None and winner is not ranked[0]:
            log.info("%s: %s won the run-off of %d finalists; %s was the fastest timed alone", self.workload.name,
                     winner.id, len(finalists), ranked[0].id)
        return winner, record

    def _run_off_failed(self, ranked: list[Candidate], finalists: list[Candidate], error: str,
                        ) -> tuple[Candidate | None, dict[str, Any]]:
        """A run-off that did not finish (a crash, a timeout): the worker may have died of one of the finalists, and
        which one is unknown, so each is evaluated again alone; one that fails now fails for good, and the fastest
        of the rest (`ranked`: every correct candidate, fastest first), as timed before, wins."""
        log.warning("%s: the run-off of %d finalists did not finish (%s); each is evaluated again alone",
                    self.workload.name, len(finalists), error)
        again = self.evaluator.evaluate([dataclasses.replace(c, result=None) for c in finalists])
        failed = []
        for c, r in zip(finalists, again):
            if not r.correct:
                failed.append(c.id)
                self._fail(c, EvalResult.failure(r.stage, f"evaluated again after a run-off that did not finish: "
                                                          f"{r.message}", stderr=r.stderr))
        winner = _fastest_correct(ranked)
        return winner, {"error": error, "finalists": [c.id for c in finalists], "failed_again": failed,
                        "winner": winner.id if winner else None}

    def _fail(self, c: Candidate, result: EvalResult) -> None:
        """Record that candidate `c`, evaluated correct before, failed after all (the memo and the run directory)."""
        self._memo[c.code_hash] = c.result = result
        if self.run_dir:
            self.run_dir.save_candidate(c)

    @staticmethod
    def _baseline(beam: list[Candidate], cands: list[Candidate]) -> float | None:
        """PyTorch eager's time as measured interleaved with the best kernel, so that the speedup is a ratio of
        one paired measurement (a candidate whose threads slowed eager, or a load spike during some candidates'
        timing, cannot inflate it); the median over every candidate only where the best has none."""
        if beam and beam[0].result and beam[0].result.baseline_ms:
            return beam[0].result.baseline_ms
        values = [c.result.baseline_ms for c in cands if c.result and c.result.baseline_ms]
        return statistics.median(values) if values else None

    @staticmethod
    def _snapshot(iteration: int, beam: list[Candidate], evaluated: list[Candidate]) -> dict[str, Any]:
        return {
            "iteration": iteration,
            "evaluated": len(evaluated),
            "correct": sum(c.correct for c in evaluated),
            "best_ms": beam[0].latency_ms if beam else None,
            "beam": [c.id for c in beam],
        }


def summarize(r: SearchResult, w: Workload) -> dict[str, Any]:
    """The JSON summary of a search (the CLI's --json and the run directory's result.json)."""
    best = r.best
    failures: dict[str, int] = {}
    for c in r.candidates:
        if c.result and not c.result.correct:
            failures[c.result.stage] = failures.get(c.result.stage, 0) + 1
    return {
        "workload": w.describe(),
        "signature": w.signature(),
        "baseline_ms": r.baseline_ms,
        "naive_ms": r.root.latency_ms if r.root is not None and r.root.correct else None,
        "best_ms": best.latency_ms if best else None,
        "best_p99_ms": best.result.latency_p99_ms if best and best.result else None,
        "speedup": r.speedup,
        "correct": best is not None,
        "best_id": best.id if best else None,
        "best_iteration": best.iteration if best else None,  # 0: a starting point (naive kernel, reuse seed)
        "best_menu_ids": best.menu_ids if best else [],
        "best_knobs": best.knobs if best else None,
        "candidates_evaluated": r.candidates_evaluated,
        "evaluated_now": r.evaluated_now,
        "failures": failures,
        "iterations": r.iterations,
        "stop_reason": r.stop_reason,
        "bytes_moved": w.bytes_moved(),
        "history": r.history,
        "reused": r.reused,
        "from_cache": r.from_cache,
        "cache_key": r.cache_key,
        "run_off": r.run_off,
    }


__all__ = ["BeamSearch", "SearchConfig", "SearchResult", "summarize"]
