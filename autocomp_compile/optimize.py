"""`optimize()`: the whole Autocomp loop for one workload on one target."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from autocomp_compile.agents.schedule import Proposer, ScheduleProposer
from autocomp_compile.evaluation.job import EvalSettings
from autocomp_compile.search.artifacts import RunDirectory
from autocomp_compile.search.beam import BeamSearch, ProgressFn, SearchConfig, SearchResult
from autocomp_compile.search.candidate import Candidate
from autocomp_compile.targets.base import Target, get_target, require_available
from autocomp_compile.workload import Workload


def run_name(workload: Workload, target: Target, config: SearchConfig, settings: EvalSettings) -> str:
    """Short, stable name: the workload plus a hash of everything that shapes the run."""
    blob = json.dumps(
        [workload.signature(), target.fingerprint(), dataclasses.asdict(config), dataclasses.asdict(settings)],
        sort_keys=True, default=str,
    )
    return f"{workload.kind}-{workload.dtype}-{target.name}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def optimize(
    workload: Workload,
    target: str | Target = "cpu",
    config: SearchConfig | None = None,
    settings: EvalSettings | None = None,
    output_dir: str | Path = "output",
    name: str | None = None,
    proposers: list[Proposer] | None = None,
    seeds: list[Candidate] | None = None,
    progress: ProgressFn | None = None,
) -> SearchResult:
    """Search for a fast, correct kernel for `workload`.

    Parameters
    ----------
    workload: what to compute (see `make_workload`).
    target: a target name ("cpu") or object.
    config: beam-search settings (budget, beam size, dropout, seed, ...).
    settings: evaluation settings (correctness input sets, timing budget, timeout).
    output_dir, name: the run is written to `output_dir/name` and resumed from there when re-run
        with the same settings; `name` defaults to a hash of the settings.
    proposers: defaults to the offline `ScheduleProposer`.
    seeds: extra starting points (schedule reuse).

    Returns
    -------
    SearchResult with the naive root, the best correct candidate and every evaluated candidate.
    """
    tgt = get_target(target) if isinstance(target, str) else target
    require_available(tgt)
    config = config or SearchConfig()
    settings = settings or EvalSettings(seed=config.seed)
    name = name or run_name(workload, tgt, config, settings)
    run_dir = RunDirectory(
        Path(output_dir) / name,
        {
            "workload": workload.describe(),
            "target": tgt.fingerprint(),
            "search": dataclasses.asdict(config),
            "eval": dataclasses.asdict(settings),
            "proposers": [getattr(p, "name", type(p).__name__) for p in proposers or []] or ["schedule"],
        },
    )
    proposers = proposers or [ScheduleProposer(dropout=config.dropout)]
    evaluator = tgt.make_evaluator(workload, settings=settings)
    try:
        return BeamSearch(tgt, workload, evaluator, proposers, config, run_dir, progress).run(seeds)
    finally:
        evaluator.close()
