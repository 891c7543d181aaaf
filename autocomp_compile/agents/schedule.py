"""The offline proposer: plans are menu items (drawn with dropout), implementations are concrete
schedule changes, and code is regenerated from the new schedule. No LLM involved."""
from __future__ import annotations

import random
from typing import Any, Protocol

from autocomp_compile.agents.menu import MenuItem, apply_dropout
from autocomp_compile.search.candidate import Candidate
from autocomp_compile.workload import Workload


class Proposer(Protocol):
    def propose(
        self, parent: Candidate, workload: Workload, target: Any, feedback: str, n_plans: int, n_impls: int,
        rng: random.Random, iteration: int,
    ) -> list[Candidate]:
        """Children of `parent`: up to n_plans plans with up to n_impls implementations each."""


def bound_by(workload: Workload, target: Any) -> str:
    """"compute" when the workload's arithmetic intensity reaches the target's `compute_bound_intensity` (flops
    per byte from which arithmetic, not memory, bounds it there); "" otherwise or when either does not say."""
    ridge = getattr(target, "compute_bound_intensity", None)
    intensity = workload.arithmetic_intensity()
    return "compute" if ridge is not None and intensity is not None and intensity >= ridge else ""


class ScheduleProposer:
    """Menu-driven schedule transformations (the offline stand-in for an LLM planner)."""

    name = "schedule"

    def __init__(self, dropout: float = 0.7, max_redraws: int = 20):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = dropout
        self.max_redraws = max_redraws

    def _draw_plan(self, applicable: list[MenuItem], rng: random.Random) -> MenuItem:
        """One menu item from the menu left after dropout; redraw the dropout when nothing survives."""
        for _ in range(self.max_redraws):
            survivors = apply_dropout(applicable, self.dropout, rng)
            if survivors:
                return rng.choice(survivors)
        return rng.choice(applicable)

    def propose(self, parent, workload, target, feedback, n_plans, n_impls, rng, iteration):
        knobs = parent.knobs
        if knobs is None:
            return []  # code without a schedule (e.g. LLM-written) cannot be transformed offline
        applicable = [m for m in target.menu(workload) if m.applies(knobs)]
        bound = bound_by(workload, target)
        children: list[Candidate] = []
        seen: set[str] = set()
        for p in range(n_plans):
            if not applicable:
                break
            # A parent's first plan relieves what bounds the workload where the menu says which items do: a
            # prefill GEMM's search otherwise spends most of its budget on prefetching and threading (fresh
            # searches of a 64-row GEMM: a median 3.5x eager without this, 5.5x with it and the 2 x 6 panel).
            favoured = [m for m in applicable if bound and m.relieves == bound] if p == 0 else []
            # Plans for one parent are distinct menu items: a second draw of the same item would mostly
            # re-propose the first one's kernels and spend the budget on near-duplicates.
            item = self._draw_plan(favoured or applicable, rng)
            applicable = [m for m in applicable if m is not item]
            for i in range(n_impls):
                new = target.legalize(workload, item.apply(dict(knobs), rng))
                key = repr(sorted(new.items()))
                if new == knobs or key in seen:
                    continue
                seen.add(key)
                changed = {k: v for k, v in new.items() if knobs.get(k) != v}
                children.append(Candidate(
                    id=f"i{iteration}-{parent.id}-p{p}-{i}",
                    parent_id=parent.id,
                    iteration=iteration,
                    language=target.language,
                    code=target.generate(workload, new),
                    plan=f"[{item.id}] {item.title}: {item.description}\nChange: {changed}",
                    menu_ids=parent.menu_ids + [item.id],
                    knobs=new,
                    models=[self.name],
                ))
        return children
