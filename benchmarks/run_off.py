"""Does the search's run-off pick the faster kernel? (`SearchConfig.finalists`, `BeamSearch.run_off`)

    python benchmarks/run_off.py --budget 40 --seeds 3 --repeats 5 --json benchmarks/results/run_off.json

Each workload is searched once per seed (the search ends with its run-off: the `finalists` fastest kernels, as
timed one by one, timed again together, interleaved with eager). Then the same finalists run `--repeats` more
run-offs, each in its own time window, in the same evaluator worker. For every search the table says which
finalist was the fastest timed alone and which won the run-off, how many of the repeats each of them won, and
the median over the repeats of (the fastest alone's time / the run-off winner's time): above 1, the run-off's
choice is the faster kernel. "alone / repeats" is the fastest alone's own time as timed alone over its median in
the repeats: below 1, timing alone flattered it (the winner's curse a run-off corrects).
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
from autocomp_compile.report import search_progress

WORKLOADS = {
    "mlp": ("mlp", {}),
    "lm_head": ("lm_head", {}),
    "q_proj": ("gemm", dict(m=1, n=2048, k=2048)),
    "attention_decode": ("attention", dict(phase="decode")),
}


def tally(ids: list[str], repeats: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per finalist id: the repeats it won (lowest time) and its median time over them."""
    wins = {i: 0 for i in ids}
    for r in repeats:
        wins[min(ids, key=lambda i: r[i])] += 1
    return {i: {"wins": wins[i], "median_ms": statistics.median(r[i] for r in repeats)} for i in ids}


def not_repeatable(record: dict | None) -> str:
    """Why a search's run-off cannot be repeated and compared (no run-off, one that did not finish, or the fastest
    alone or the winner not among the finalists still correct after it); "" when it can."""
    if not record:
        return "no run-off"
    if "error" in record:
        return f"the run-off did not finish ({record['error']})"
    correct = {f["id"] for f in record["finalists"] if f["wrong"] is None}
    for role in ("fastest_alone", "winner"):
        if record[role] not in correct:
            return f"the {role.replace('_', ' ')} ({record[role]}) is not a finalist found correct in the run-off"
    return ""


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3, help="search seeds 0..N-1 per workload")
    ap.add_argument("--repeats", type=int, default=5, help="run-offs of each search's finalists after it")
    ap.add_argument("--finalists", type=int, default=SearchConfig().finalists)
    ap.add_argument("--workloads", default="mlp,lm_head,q_proj", help=f"comma-separated, from {sorted(WORKLOADS)}")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--shape", default="{}", help="JSON of shape parameters for every workload (default: Llama-3.2-1B)")
    ap.add_argument("--timing-ms", type=float, default=EvalSettings().timing_budget_ms, help="per candidate")
    ap.add_argument("--json", default="benchmarks/results/run_off.json")
    args = ap.parse_args(argv)
    names = [n for n in args.workloads.split(",") if n]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        ap.error(f"unknown workloads {unknown}; choose from {sorted(WORKLOADS)}")
    if args.seeds < 1 or args.repeats < 1 or args.finalists < 2:
        ap.error("--seeds and --repeats must be >= 1, --finalists >= 2")

    target = get_target("cpu")
    work = Path(tempfile.mkdtemp(prefix="autocomp-run-off-"))
    report: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "budget": args.budget,
                    "repeats": args.repeats, "finalists": args.finalists, "target": target.fingerprint(),
                    "searches": []}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"Run-off of the {args.finalists} fastest after each search (budget {args.budget}), then "
                        f"{args.repeats} more run-offs of the same finalists")
    for col in ("workload", "seed", "fastest alone", "run-off winner", "alone wins", "winner wins",
                "alone / winner", "alone / repeats"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for name in names:
        kind, params = WORKLOADS[name]
        w = make_workload(kind, args.dtype, **{**params, **json.loads(args.shape)})
        for seed in range(args.seeds):
            settings = EvalSettings(timing_budget_ms=args.timing_ms, seed=seed)
            config = SearchConfig(budget=args.budget, seed=seed, finalists=args.finalists)
            with search_progress(f"{name} seed {seed}", args.budget) as progress:
                r = optimize(w, target, config, settings, work / name, progress=progress)
            record = r.run_off
            why = not_repeatable(record)
            if why:
                print(f"{name} seed {seed}: not repeated: {why}")
                continue
            by_id = {c.id: c for c in r.candidates}
            finalists = [by_id[f["id"]] for f in record["finalists"] if f["wrong"] is None]
            evaluator = target.make_evaluator(w, settings=settings)
            try:
                repeats = []
                for _ in range(args.repeats):
                    timing = evaluator.run_off(finalists)["timing"]
                    repeats.append({c.id: timing[c.code_hash]["median_ms"] for c in finalists})
            finally:
                evaluator.close()
            ids = [c.id for c in finalists]
            stats = tally(ids, repeats)
            alone, winner = record["fastest_alone"], record["winner"]
            ratios = [x[alone] / x[winner] for x in repeats]
            row = {
                "workload": name, "params": w.params, "seed": seed, "run_off": record, "repeats": repeats,
                "tally": stats, "fastest_alone": alone, "winner": winner, "changed": alone != winner,
                "alone_over_winner": statistics.median(ratios),
                "alone_ms_over_repeats": by_id[alone].latency_ms / stats[alone]["median_ms"],
                "menu_ids": {c.id: c.menu_ids for c in finalists},
            }
            report["searches"].append(row)
            out.write_text(json.dumps(report, indent=2, default=str))  # after every search: a stop keeps the rest
            table.add_row(name, str(seed), alone, winner, f"{stats[alone]['wins']}/{args.repeats}",
                          f"{stats[winner]['wins']}/{args.repeats}", f"{row['alone_over_winner']:.3f}",
                          f"{row['alone_ms_over_repeats']:.3f}")
    changed = [s for s in report["searches"] if s["changed"]]
    report["summary"] = {
        "searches": len(report["searches"]), "changed": len(changed),
        "changed_winner_won_repeats": sum(s["tally"][s["winner"]]["wins"] for s in changed),
        "changed_alone_won_repeats": sum(s["tally"][s["fastest_alone"]]["wins"] for s in changed),
        "repeats_of_changed": args.repeats * len(changed),
    }
    out.write_text(json.dumps(report, indent=2, default=str))
    Console(width=140).print(table)
    s = report["summary"]
    print(f"the run-off changed the winner in {s['changed']} of {s['searches']} searches; in their repeats the run-off "
          f"winner won {s['changed_winner_won_repeats']} and the fastest alone {s['changed_alone_won_repeats']} of "
          f"{s['repeats_of_changed']}")
    print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
