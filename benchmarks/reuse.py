"""What schedule reuse buys: a family of GEMM/GEMV shapes on the CPU target, each searched under a small
budget without reuse and then with the other shapes already solved in the cache.

    python benchmarks/reuse.py --budget 16 --json benchmarks/results/reuse.json

Phase A searches every shape from its naive kernel alone (no cache). Its winners fill the cache. Phase B
searches every shape again, from a cache holding the seven other shapes' winners: the nearest three
schedules are replayed as extra starting points. The two phases run in separate run directories (nothing
is shared but the cache). "best known" is the faster of the two winners; "to 5%" is how many candidates,
in evaluation order, a run needed before one came within 5% of it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from autocomp_compile import EvalSettings, SearchConfig, get_target, make_workload, optimize
from autocomp_compile.kernels_cache import KernelCache
from autocomp_compile.report import search_progress

SHAPES = [
    ("gemv 1x2048x2048", dict(m=1, n=2048, k=2048)),
    ("gemv 1x4096x1024", dict(m=1, n=4096, k=1024)),
    ("gemv 4x1024x4096", dict(m=4, n=1024, k=4096)),
    ("square 256", dict(m=256, n=256, k=256)),
    ("square 384", dict(m=384, n=384, k=384)),
    ("tall 1024x64x256", dict(m=1024, n=64, k=256)),
    ("wide 64x1024x256", dict(m=64, n=1024, k=256)),
    ("wide 32x2048x128", dict(m=32, n=2048, k=128)),
]


def to_within(latencies: list[float], target_ms: float) -> int | None:
    for i, ms in enumerate(latencies, start=1):
        if ms <= 1.05 * target_ms:
            return i
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing-ms", type=float, default=200.0)
    ap.add_argument("--json", default="benchmarks/results/reuse.json")
    args = ap.parse_args()

    target = get_target("cpu")
    config = SearchConfig(budget=args.budget, seed=args.seed)
    settings = EvalSettings(timing_budget_ms=args.timing_ms, seed=args.seed)
    work = Path(tempfile.mkdtemp(prefix="autocomp-reuse-"))
    workloads = [(label, make_workload("gemm", args.dtype, **shape)) for label, shape in SHAPES]

    plain = {}
    for label, w in workloads:
        with search_progress(f"no reuse: {label}", args.budget) as progress:
            plain[label] = optimize(w, target, config, settings, work / "plain", progress=progress)

    reused = {}
    for label, w in workloads:
        cache = KernelCache(work / f"cache-{w.signature()}.sqlite")
        for other, ow in workloads:
            if other != label and plain[other].best is not None:
                cache.put(target, ow, plain[other].best)
        with search_progress(f"reuse: {label}", args.budget) as progress:
            reused[label] = optimize(w, target, config, settings, work / "reuse", progress=progress, cache=cache)
        cache.close()

    rows = []
    for label, w in workloads:
        a, b = plain[label], reused[label]
        best_known = min(a.best.latency_ms, b.best.latency_ms)
        rows.append({
            "shape": label, "params": w.params, "shape_class": w.shape_class(),
            "no_reuse_best_ms": a.best.latency_ms, "reuse_best_ms": b.best.latency_ms,
            "no_reuse_speedup_vs_eager": a.speedup, "reuse_speedup_vs_eager": b.speedup,
            "gain": a.best.latency_ms / b.best.latency_ms,
            "no_reuse_to_5pct": to_within([c.latency_ms for c in a.candidates], best_known),
            "reuse_to_5pct": to_within([c.latency_ms for c in b.candidates], best_known),
            "reused_from": b.reused,
            "best_from_seed": b.best.origin.startswith("reuse:") if b.best else False,
        })

    table = Table(title=f"Schedule reuse on the CPU target, gemm {args.dtype}, budget {args.budget} candidates per search")
    for col in ("shape", "class", "no reuse ms", "reuse ms", "gain", "to 5%: no reuse", "to 5%: reuse"):
        table.add_column(col, justify="left" if col in ("shape", "class") else "right")
    fmt = lambda n: str(n) if n is not None else f">{args.budget}"  # noqa: E731
    for r in rows:
        table.add_row(r["shape"], r["shape_class"], f"{r['no_reuse_best_ms']:.4f}", f"{r['reuse_best_ms']:.4f}",
                      f"{r['gain']:.2f}x", fmt(r["no_reuse_to_5pct"]), fmt(r["reuse_to_5pct"]))
    penal = lambda n: n if n is not None else args.budget + 1  # noqa: E731 - "never" counts as budget + 1
    summary = {
        "mean_gain": statistics.mean(r["gain"] for r in rows),
        "geomean_gain": statistics.geometric_mean(r["gain"] for r in rows),
        "mean_to_5pct_no_reuse": statistics.mean(penal(r["no_reuse_to_5pct"]) for r in rows),
        "mean_to_5pct_reuse": statistics.mean(penal(r["reuse_to_5pct"]) for r in rows),
        "reached_5pct_no_reuse": sum(r["no_reuse_to_5pct"] is not None for r in rows),
        "reached_5pct_reuse": sum(r["reuse_to_5pct"] is not None for r in rows),
    }
    table.add_row("mean", "", "", "", f"{summary['mean_gain']:.2f}x", f"{summary['mean_to_5pct_no_reuse']:.1f}",
                  f"{summary['mean_to_5pct_reuse']:.1f}")
    Console(width=130).print(table)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": datetime.datetime.now().isoformat(timespec="seconds"), "budget": args.budget,
                               "target": target.fingerprint(), "summary": summary, "rows": rows}, indent=2, default=str))
    print(f"wrote {out} (never reaching 5% counts as budget + 1 in the means)")


if __name__ == "__main__":
    main()
