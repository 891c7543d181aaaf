"""`optimize()`: the whole Autocomp loop for one workload on one target."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from autocomp_compile.agents.schedule import Proposer, ScheduleProposer
from autocomp_compile.evaluation.job import EvalSettings
from autocomp_compile.search.artifacts import RunDirectory
from autocomp_compile.search.beam import BeamSearch, ProgressFn, SearchConfig, SearchResult
from autocomp_compile.search.candidate import Candidate
from autocomp_compile.targets.base import EvalResult, Target, deterministic_variant, get_target, require_available
from autocomp_compile.workload import Workload, WorkloadError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from autocomp_compile.kernels_cache import CacheEntry, KernelCache


def evaluation_config(settings: EvalSettings) -> dict[str, Any]:
    """The evaluation settings as a run records them. The deterministic check's settings appear only when it is
    on, so that runs made before it existed keep their names and resume."""
    evaluation = dataclasses.asdict(settings)
    if not settings.deterministic:
        del evaluation["deterministic"], evaluation["repeat_runs"]
    return evaluation


def search_config(config: SearchConfig) -> dict[str, Any]:
    """The search settings as a run records them. `finalists` appears only when it is not the default, so that
    runs made before the run-off existed keep their names and resume (and then end with a run-off)."""
    search = dataclasses.asdict(config)
    if config.finalists == SearchConfig.finalists:
        del search["finalists"]
    return search


def proposer_names(proposers: list[Proposer] | None) -> list[str]:
    """The proposers as a run records them; ["schedule"] for the offline default."""
    return [getattr(p, "name", type(p).__name__) for p in proposers or []] or ["schedule"]


def run_name(workload: Workload, target: Target, config: SearchConfig, settings: EvalSettings,
             proposers: list[str] | None = None) -> str:
    """Short, stable name: the workload plus a hash of everything that shapes the run. `proposers` (their
    `proposer_names`) count only when they are not the offline default, so that offline runs keep their names."""
    parts: list[Any] = [workload.signature(), target.fingerprint(), search_config(config), evaluation_config(settings)]
    if proposers and proposers != ["schedule"]:
        parts.append(proposers)
    blob = json.dumps(parts, sort_keys=True, default=str)
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
    cache: "KernelCache | None" = None,
    reuse: int = 3,
) -> SearchResult:
    """Search for a fast, correct kernel for `workload`.

    Parameters
    ----------
    workload: what to compute (see `make_workload`).
    target: a target name ("cpu") or object.
    config: beam-search settings (budget, beam size, dropout, seed, ...).
    settings: evaluation settings (correctness input sets, timing budget, timeout). With `deterministic`, the
        target's deterministic variant searches (see `targets.base.deterministic_variant`); a deterministic
        variant always evaluates with the repeat check.
    output_dir, name: the run is written to `output_dir/name` and resumed from there when re-run
        with the same settings; `name` defaults to a hash of the settings.
    proposers: defaults to the offline `ScheduleProposer`.
    seeds: extra starting points.
    cache: a `KernelCache`. A hit returns the cached kernel without searching; on a miss the schedules
        of up to `reuse` (>= 0) most similar solved workloads are replayed on this workload as extra starting
        points (schedule reuse), and the winner is stored.

    Returns
    -------
    SearchResult with the naive root, the best correct candidate and every evaluated candidate.
    Raises `WorkloadError` before any work when the target has no kernel for the workload's shape.
    """
    tgt = get_target(target) if isinstance(target, str) else target
    config = config or SearchConfig()
    tgt, settings = _deterministic_as_asked(tgt, settings or EvalSettings(seed=config.seed))
    require_available(tgt)
    check_supported(tgt, workload)
    if reuse < 0:
        raise ValueError(f"reuse must be >= 0, got {reuse}")
    if cache is not None:
        hit = cache_hit(cache, tgt, workload, settings)
        if hit is not None:
            return result_from_cache(hit)
        reused = reuse_seeds(tgt, workload, cache.nearest(tgt, workload, reuse)) if reuse else []
        seeds = list(seeds or []) + reused
    name = name or run_name(workload, tgt, config, settings, proposer_names(proposers))
    run_dir = RunDirectory(
        Path(output_dir) / name,
        {
            "workload": workload.describe(),
            "target": tgt.fingerprint(),
            "search": search_config(config),
            "eval": evaluation_config(settings),
            "proposers": proposer_names(proposers),
        },
    )
    proposers = proposers or [ScheduleProposer(dropout=config.dropout)]
    calls_before = model_calls(proposers)
    for p in proposers:
        if hasattr(p, "attach_run_dir"):  # LLM proposers keep their prompts and responses with the run
            p.attach_run_dir(run_dir.root)
        if hasattr(p, "translate"):  # translation phase: first kernels from the PyTorch reference
            seeds = list(seeds or []) + p.translate(workload, tgt)
    evaluator = tgt.make_evaluator(workload, settings=settings)
    try:
        result = BeamSearch(tgt, workload, evaluator, proposers, config, run_dir, progress).run(seeds)
    finally:
        evaluator.close()
    result.reused = [c.origin.split(":", 1)[1] for c in result.candidates if c.origin.startswith("reuse:")]
    calls, failures = (now - then for now, then in zip(model_calls(proposers), calls_before))
    unsearched = nothing_searched(calls, failures, result.best.iteration if result.best else None)
    if cache is not None and result.best is not None and not unsearched:
        cache.put(tgt, workload, result.best, provenance={"run": name, "reused": result.reused})
        entry = cache.get(tgt, workload)
        result.cache_key = entry.key if entry else None
    return result


def _deterministic_as_asked(tgt: Target, settings: EvalSettings) -> tuple[Target, EvalSettings]:
    """Deterministic kernels are searched and cached by the target's deterministic variant, whichever of the
    settings or the target asked for them."""
    if settings.deterministic:
        return deterministic_variant(tgt), settings
    if getattr(tgt, "deterministic", False):
        return tgt, dataclasses.replace(settings, deterministic=True)
    return tgt, settings


def cache_hit(cache: "KernelCache", target: Target, workload: Workload, settings: EvalSettings, check: bool = True,
              ) -> "CacheEntry | None":
    """The cached kernel `optimize` would return for `workload` without searching, or None (in deterministic
    mode, an entry whose reproducibility was not checked does not count). An imported entry not yet evaluated on
    this machine is evaluated first (`check_imported`); with `check=False` (a target that cannot run here, e.g.
    a remote node's) it does not count."""
    tgt, settings = _deterministic_as_asked(target, settings)
    hit = cache.get(tgt, workload)
    if hit is not None and hit.unchecked:
        hit = check_imported(cache, tgt, workload, hit, settings) if check else None
    return hit if hit is not None and (hit.reproducible or not settings.deterministic) else None


# Evaluation stages that condemn a kernel (rather than the moment: a timeout under load, a roofline doubt).
KERNEL_FAULTS = frozenset({"compile", "load", "runtime", "crash", "correctness", "out_of_bounds", "inputs_modified",
                           "harness_modified", "nondeterministic"})


def check_imported(cache: "KernelCache", target: Target, workload: Workload, entry: "CacheEntry",
                   settings: EvalSettings) -> "CacheEntry | None":
    """Evaluate an imported entry here as a search evaluates a candidate (correctness on fresh inputs, then
    timing against eager on this machine), in the evaluator's isolated worker. It passes: the record of what was
    measured here replaces the file's; the kernel is at fault (KERNEL_FAULTS): the entry is removed, a wrong
    kernel is never served; otherwise (a timeout, say) it stays unchecked for its next use. Returns the entry now
    cached, or None. The check is the normal one (a repeat check would condemn a correct kernel that normal
    mode may use): deterministic mode then decides by the entry's `reproducible`, as for any entry."""
    log.info("checking imported kernel %s (%s) on this machine", entry.key, workload.name)
    cand = entry.candidate()
    evaluator = target.make_evaluator(workload, settings=dataclasses.replace(settings, deterministic=False))
    try:
        [cand.result] = evaluator.evaluate([cand])
    finally:
        evaluator.close()
    if cand.latency_ms == float("inf"):
        r = cand.result
        why = f"{r.stage}: {r.message}" if r is not None else "no result"
        if r is not None and r.stage in KERNEL_FAULTS:
            cache.remove(entry.key)
            log.warning("imported kernel %s failed its check here and was removed (%s)", entry.key, why)
        else:
            log.warning("imported kernel %s could not be checked now (%s); not used, checked again at its next use",
                        entry.key, why)
        return None
    provenance = {k: v for k, v in entry.provenance.items() if k != "unchecked"}
    cache.put(target, workload, cand, provenance={**provenance, "checked_here": True})
    return cache.get(target, workload)


def nothing_searched(calls: int, failures: int, best_iteration: int | None) -> bool:
    """Whether every model call failed and the best kernel is a starting point (the naive kernel or a schedule
    reuse seed, iteration 0): the search the user asked for did not happen, so nothing is cached and the run
    does not count as a success."""
    return bool(failures and not calls and best_iteration == 0)


def model_calls(proposers: Sequence[Any]) -> tuple[int, int]:
    """Model calls answered and failed so far by the LLM proposers' clients (0, 0 without any)."""
    usages = {id(p.client): p.client.usage for p in proposers if hasattr(p, "client")}
    return sum(u.calls for u in usages.values()), sum(u.failures for u in usages.values())


def host_memory_bytes() -> int | None:
    """This machine's physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_supported(target: Target, workload: Workload) -> None:
    """Raise `WorkloadError` when `workload` cannot be searched here: its tensors alone exceed this machine's
    memory (every evaluation allocates them, and more), or `target` has no kernel for it (a target that defines
    `check_workload(workload)` says so; the others take every workload the workload checks accept)."""
    need, have = sum(t.nbytes for t in workload.tensors), host_memory_bytes()
    if have is not None and need > have:
        raise WorkloadError(f"{workload.name}: its tensors take {need / 1e9:.1f} GB, more than this machine's "
                            f"{have / 1e9:.1f} GB of memory")
    check = getattr(target, "check_workload", None)
    if check is not None:
        check(workload)


def schedule_seed(target: Target, workload: Workload, knobs: dict[str, Any], plan: str, menu_ids: list[str],
                  origin: str) -> Candidate:
    """A starting point for the search: the kernel of schedule `knobs`, legalised for `workload`."""
    legal = target.legalize(workload, knobs)
    return Candidate(id="seed", parent_id=None, iteration=0, language=target.language,
                     code=target.generate(workload, legal), plan=plan, menu_ids=list(menu_ids), knobs=legal,
                     origin=origin)


def reuse_seeds(target: Target, workload: Workload, entries: "list[CacheEntry]") -> list[Candidate]:
    """Replay solved workloads' schedules on `workload`: their knobs, re-legalised for the new shape. A schedule
    this code generator cannot legalise (e.g. imported from another version) is skipped with a warning."""
    seeds = []
    for e in entries:
        if e.knobs is None:  # code without a schedule (LLM-written) cannot be re-targeted to another shape
            continue
        try:
            seeds.append(schedule_seed(
                target, workload, e.knobs,
                f"Schedule reuse: the optimization sequence {e.menu_ids} of cached {e.kind} kernel {e.key} "
                f"({e.workload['params']}), re-legalised for this shape.", e.menu_ids, f"reuse:{e.key}"))
        except Exception as exc:  # noqa: BLE001 - a bad seed must not stop the search it would only start
            log.warning("schedule reuse: skipping cached kernel %s: its schedule %s does not apply here (%s: %s)",
                        e.key, e.knobs, type(exc).__name__, exc)
    return seeds


def result_from_cache(entry: "CacheEntry") -> SearchResult:
    """What `optimize` returns for a cache hit: the cached kernel as the best candidate, nothing searched."""
    cand = entry.candidate()
    cand.result = EvalResult(correct=True, stage="ok", latency_ms=entry.latency_ms, baseline_ms=entry.baseline_ms,
                             latency_p99_ms=entry.evidence.get("p99_ms"),
                             extra={"from_cache": entry.key, "simulated": bool(entry.fingerprint.get("simulated"))})
    return SearchResult(root=None, best=cand, candidates=[], iterations=0, stop_reason="cache hit",
                        baseline_ms=entry.baseline_ms, evaluated_now=0, cache_key=entry.key)
