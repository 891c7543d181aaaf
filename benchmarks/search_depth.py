"""What spreading a small budget over several iterations buys (`SearchConfig.min_depth`).

    python benchmarks/search_depth.py --budget 32 --seeds 6 --json benchmarks/results/search_depth.json

Every workload is searched with the same seeds and budget twice: with wide rounds (`--min-depth 1`: up to
beam x plans x impls children per iteration, as the search worked before min_depth) and with the default
min_depth. The two runs of one seed follow each other. Then every winner is re-timed in one process,
interleaved with PyTorch eager, twice (forward and reverse order), so that the comparison does not depend
on how fast this machine was while each search ran. "within 5%" counts the seeds whose winner came within 5%
of the fastest winner of either setting.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from autocomp_compile import EvalSettings, SearchConfig, get_target, make_workload, optimize
from autocomp_compile.report import search_progress
from autocomp_compile.search.candidate import Candidate

WORKLOADS = {
    "attention_decode": ("attention", dict(phase="decode")),
    "mlp": ("mlp", {}),
    "lm_head": ("lm_head", {}),
    "rmsnorm": ("rmsnorm", {}),
}


def retime(target, workload, winners: list[Candidate], settings: EvalSettings) -> list[tuple[float, float]]:
    """(median latency ms, median eager/latency) of each winner over a forward and a reverse pass."""
    fresh = [dataclasses.replace(c, id=f"w{i}", result=None) for i, c in enumerate(winners)]
    evaluator = target.make_evaluator(workload, settings=settings)
    times: list[list[tuple[float, float]]] = [[] for _ in fresh]
    for order in (list(range(len(fresh))), list(reversed(range(len(fresh))))):
        for i, r in zip(order, evaluator.evaluate([fresh[i] for i in order])):
            if not r.correct:
                raise RuntimeError(f"a winner failed its re-check ({r.stage}): {r.message}")
            times[i].append((r.latency_ms, r.baseline_ms / r.latency_ms if r.baseline_ms else float("nan")))
    return [(statistics.median(t for t, _ in ts), statistics.median(x for _, x in ts)) for ts in times]


def summarize(latencies: list[float], ratios: list[float], best_ms: float) -> dict:
    return {
        "median_ms": statistics.median(latencies), "worst_ms": max(latencies),
        "median_x_eager": statistics.median(ratios), "worst_x_eager": min(ratios),
        "within_5pct": sum(ms <= 1.05 * best_ms for ms in latencies),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=6, help="search seeds 0..N-1 per setting")
    ap.add_argument("--workloads", default="attention_decode,mlp", help=f"comma-separated, from {sorted(WORKLOADS)}")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--shape", default="{}", help="JSON of shape parameters for every workload (default: Llama-3.2-1B)")
    ap.add_argument("--timing-ms", type=float, default=EvalSettings().timing_budget_ms, help="per candidate")
    ap.add_argument("--json", default="benchmarks/results/search_depth.json")
    args = ap.parse_args(argv)
    names = [n for n in args.workloads.split(",") if n]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names or args.seeds < 1:
        ap.error(f"unknown workloads {unknown}; choose from {sorted(WORKLOADS)}" if unknown or not names
                 else "--seeds must be >= 1")

    target = get_target("cpu")
    settings = EvalSettings(timing_budget_ms=args.timing_ms)
    depths = (1, SearchConfig().min_depth)
    work = Path(tempfile.mkdtemp(prefix="autocomp-depth-"))
    report: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "budget": args.budget,
                    "seeds": args.seeds, "target": target.fingerprint(), "workloads": {}}
    table = Table(title=f"Search at budget {args.budget}: wide rounds (min_depth 1) vs min_depth {depths[1]}, "
                        f"{args.seeds} seeds, winners re-timed together")
    for col in ("workload", "min_depth", "median ms", "worst ms", "median x eager", "worst x eager", "within 5%",
                "iterations"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for name in names:
        kind, params = WORKLOADS[name]
        w = make_workload(kind, args.dtype, **{**params, **json.loads(args.shape)})
        runs: dict[int, list] = {d: [] for d in depths}
        for seed in range(args.seeds):
            for d in depths:
                config = SearchConfig(budget=args.budget, seed=seed, min_depth=d)
                with search_progress(f"{name} seed {seed} min_depth {d}", args.budget) as progress:
                    runs[d].append(optimize(w, target, config, settings, work / name, progress=progress))
        winners = [r.best for d in depths for r in runs[d]]
        timed = retime(target, w, winners, settings)
        best_ms = min(ms for ms, _ in timed)
        rows = {}
        for k, d in enumerate(depths):
            mine = timed[k * args.seeds:(k + 1) * args.seeds]
            rows[d] = summarize([ms for ms, _ in mine], [x for _, x in mine], best_ms)
            rows[d]["iterations"] = [r.iterations for r in runs[d]]
            rows[d]["winners_ms"] = [ms for ms, _ in mine]
            rows[d]["winners_menu_ids"] = [r.best.menu_ids for r in runs[d]]
            s = rows[d]
            table.add_row(name, str(d), f"{s['median_ms']:.3f}", f"{s['worst_ms']:.3f}", f"{s['median_x_eager']:.2f}x",
                          f"{s['worst_x_eager']:.2f}x", f"{s['within_5pct']}/{args.seeds}",
                          f"{statistics.median(s['iterations']):g}")
        report["workloads"][name] = {"params": w.params, "by_min_depth": {str(d): rows[d] for d in depths}}
        out = Path(args.json)  # after every workload: an interrupted run keeps what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))
    Console(width=130).print(table)
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
