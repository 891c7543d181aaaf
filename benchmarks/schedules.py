"""Hand-given schedules of one workload, timed against each other and PyTorch eager, interleaved in one process.

A search picks one winner; this answers "how much does schedule B gain over schedule A at this shape?" with
both timed in the same rounds, the way the search times candidates (cold weights, fresh activations, eager
writing into preallocated outputs with `out=`). Every kernel is checked against the reference on fresh inputs
before it is timed. Each round is a fresh worker process; the table gives medians over rounds.

    python benchmarks/schedules.py                      # the two presets below: register tile vs packed panels
    python benchmarks/schedules.py --kind gemm --params '{"m": 64, "n": 2048, "k": 2048}' \\
        --schedule 'tile={"isa": "avx2", "m_tile": 6, "rows": 2, "threads": "dynamic", "chunk": 16}' \\
        --schedule 'packed={"isa": "avx2", "pack": 2, "pack_rows": 6, "threads": "dynamic", "chunk": 4}'

Schedules are legalised for the shape and this host first (the table shows what ran).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from autocomp_compile import get_target, make_workload
from autocomp_compile.evaluation.worker import IsolatedWorker
from autocomp_compile.optimize import schedule_seed
from autocomp_compile.passes.kernels import build_loader, check_loaded, load_built
from autocomp_compile.targets.base import require_available
from autocomp_compile.workload import Workload

# The 64-token prompt of Llama-3.2-1B: a register tile of activation rows (the warm's pick before packed panels
# existed) against packed weight panels of 2 vectors of rows x 6 weight rows.
_TILE = {"isa": "avx2", "bf16_split": True, "m_tile": 6, "rows": 2, "threads": "dynamic", "chunk": 16}
_PACKED = {"isa": "avx2", "pack": 2, "pack_rows": 6, "threads": "dynamic", "chunk": 4}
PRESETS = [
    ("gemm", {"m": 64, "n": 2048, "k": 2048}, {"register tile": _TILE, "packed panels": _PACKED}),
    ("mlp", {"batch": 64, "hidden": 2048, "intermediate": 8192},
     {"register tile": {**_TILE, "fuse": True}, "packed panels": {**_PACKED, "fuse": True}}),
]


def parse_schedule(text: str) -> tuple[str, dict]:
    label, sep, knobs = text.partition("=")
    if not sep or not label:
        raise SystemExit(f"--schedule {text!r}: expected LABEL=JSON, e.g. 'packed={{\"pack\": 2}}'")
    try:
        parsed = json.loads(knobs)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--schedule {label}: not JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise SystemExit(f"--schedule {label}: the knobs must be a JSON object")
    return label, parsed


def compare(target, w: Workload, schedules: dict[str, dict], rounds: int, timing_ms: float) -> dict:
    """Legalise, build and check every schedule, then time them all with eager, interleaved, `rounds` times."""
    if w.flops() is None:
        raise SystemExit(f"--kind {w.kind}: GFLOP/s are defined for gemm, lm_head and mlp only")
    loaders, legal = {}, {}
    for label, knobs in schedules.items():
        cand = schedule_seed(target, w, knobs, f"given: {knobs}", [], f"benchmark:{label}")
        loaders[label], legal[label] = build_loader(target, w, cand), cand.knobs
        check_loaded(load_built(loaders[label]), w)  # raises on a wrong result: nothing wrong is timed
    runs = []
    for _ in range(rounds):  # every build is done before the first timing
        with IsolatedWorker() as worker:
            runs.append(worker.run("autocomp_compile.evaluation.job:time_functions", w, loaders, timing_ms, True,
                                   False, "cpu", 0, timeout_s=900))
    median = {name: statistics.median(r[name]["median_ms"] for r in runs) for name in [*schedules, "eager"]}
    return {"kind": w.kind, "params": w.params, "dtype": w.dtype, "flops": w.flops(), "legal_knobs": legal,
            "median_ms": median, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", help="gemm, lm_head or mlp (default: the presets)")
    ap.add_argument("--params", default="{}", help="the workload's shape, JSON")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--schedule", action="append", default=[], metavar="LABEL=JSON", help="repeatable; the first is "
                    "the reference of the 'vs first' column")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timing-ms", type=float, default=3000.0, help="timing budget per round")
    ap.add_argument("--json", default="benchmarks/results/schedules.json")
    args = ap.parse_args()
    if args.kind:
        if not args.schedule:
            raise SystemExit("--kind needs at least one --schedule")
        cases = [(args.kind, json.loads(args.params), dict(map(parse_schedule, args.schedule)))]
    else:
        cases = PRESETS
    target = get_target("cpu")
    require_available(target)
    console = Console(width=140)
    results = []
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    for kind, params, schedules in cases:
        w = make_workload(kind, args.dtype, **params)
        console.print(f"{w.name}: {len(schedules)} schedule(s), {args.rounds} round(s) ...")
        results.append(compare(target, w, schedules, args.rounds, args.timing_ms))
        out.write_text(json.dumps({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                                   "target": target.fingerprint(), "rounds": args.rounds, "results": results},
                                  indent=2, default=str))

    table = Table(title=f"schedules against eager, {target.describe()} (median ms of {args.rounds} interleaved rounds)")
    for col in ("workload", "schedule", "ms", "GFLOP/s", "vs eager", "vs first"):
        table.add_column(col, justify="left" if col in ("workload", "schedule") else "right")
    for r in results:
        ms = r["median_ms"]
        first = ms[next(iter(r["legal_knobs"]))]
        for name, t in ms.items():
            table.add_row(f"{r['kind']} {json.dumps(r['params'])}", name, f"{t:.3f}", f"{r['flops'] / (t * 1e6):.1f}",
                          f"{ms['eager'] / t:.2f}x", f"{first / t:.2f}x")
    console.print(table)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
