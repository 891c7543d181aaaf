"""NKI benchmark on the emulator: naive vs searched NKI kernels for Llama-3.2-1B, latencies SIMULATED.

For each workload: lower the naive kernel, run the beam search with the offline menu-driven proposer, and
report both kernels' latency as estimated by the trn1 cost model (targets/nki/cost_model.py) from the
emulator's instruction trace. No Trainium is involved: every figure is a simulation, and says so.

    python benchmarks/nki.py --json benchmarks/results/nki_simulated_llama-3.2-1b.json
    python benchmarks/nki.py --only rmsnorm,mlp --budget 12
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from autocomp_compile import EvalSettings, SearchConfig, get_target, make_workload, optimize
from autocomp_compile.report import search_progress
from autocomp_compile.targets.nki.evaluate import check_and_estimate

os.environ.setdefault("AUTOCOMP_NKI_BACKEND", "emulator")  # simulated numbers even on a trn1 host


def workloads() -> list[tuple[str, str, object]]:
    """(key, label, workload) at Llama-3.2-1B shapes, decode batch 1 (and one prefill length)."""
    return [
        ("rmsnorm", "rmsnorm decode (hidden 2048)", make_workload("rmsnorm")),
        ("attention", "attention decode kv=1024", make_workload("attention", kv_len=1024)),
        ("prefill", "attention prefill s=256", make_workload("attention", phase="prefill", seq_len=256)),
        ("mlp", "mlp decode (2048 -> 8192 -> 2048)", make_workload("mlp")),
        ("lm_head", "lm_head decode (vocab 128256)", make_workload("lm_head")),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=16, help="candidates per workload, the naive kernel included")
    ap.add_argument("--only", default="", help="comma-separated keys: rmsnorm,attention,prefill,mlp,lm_head")
    ap.add_argument("--sets", type=int, default=1, help="fresh random input sets per candidate during the search")
    ap.add_argument("--verify-sets", type=int, default=3, help="fresh input sets the naive and best kernels are "
                    "re-checked on afterwards (the seed's correctness check)")
    ap.add_argument("--output-dir", default="output")
    ap.add_argument("--json", dest="json_path", default="")
    args = ap.parse_args()
    target = get_target("nki")
    chosen = [x for x in workloads() if not args.only or x[0] in args.only.split(",")]
    rows = []
    for key, label, w in chosen:
        t0 = time.perf_counter()
        # Dropout 0.3: the NKI menus are short (4-7 items); the default 0.7 leaves most draws empty.
        config = SearchConfig(budget=args.budget, beam_size=3, iterations=8, plans_per_parent=2, impls_per_plan=2,
                              dropout=0.3, seed=0)
        with search_progress(label, config.budget) as progress:
            res = optimize(w, target, config, EvalSettings(correctness_sets=args.sets, timeout_s=900),
                           output_dir=args.output_dir, progress=progress)
        naive, best = res.root, res.best
        # The search checked each candidate on --sets input sets; re-check the two reported kernels on more.
        verify = EvalSettings(correctness_sets=args.verify_sets, seed=20261127)
        verified = [check_and_estimate({}, w, "", (c.code,), verify) if c else {"correct": False} for c in (naive, best)]
        rows.append({
            "workload": label, "key": key, "shape": w.describe(),
            "naive_us_simulated": naive.latency_ms * 1e3 if naive and naive.result and naive.result.correct else None,
            "best_us_simulated": best.latency_ms * 1e3 if best else None,
            "naive_correct": bool(naive and naive.result and naive.result.correct and verified[0]["correct"]),
            "best_correct": bool(best and best.result and best.result.correct and verified[1]["correct"]),
            "verified_input_sets": args.verify_sets,
            "best_max_abs_error": best.result.max_abs_error if best else None,
            "best_menu_ids": best.menu_ids if best else [],
            "best_knobs": best.knobs if best else None,
            "best_cost_breakdown": best.result.extra.get("cost_model") if best else None,
            "candidates_evaluated": len(res.candidates), "search_wall_s": time.perf_counter() - t0,
            "simulated": True,
        })
    table = Table(title="NKI kernels, Llama-3.2-1B, bf16 - SIMULATED trn1 latency (emulator + cost model, no Trainium)")
    for col in ("workload", "naive us (sim)", "best us (sim)", "speedup (sim)", "bottleneck", "correct", "candidates",
                "simulated"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for r in rows:
        n, b = r["naive_us_simulated"], r["best_us_simulated"]
        table.add_row(r["workload"], f"{n:.1f}" if n else "-", f"{b:.1f}" if b else "-",
                      f"{n / b:.2f}x" if n and b else "-", (r["best_cost_breakdown"] or {}).get("bottleneck", "-"),
                      "yes" if r["naive_correct"] and r["best_correct"] else "NO", str(r["candidates_evaluated"]), "yes")
    Console(width=150).print(table)
    if args.json_path:
        out = {"simulated": True, "note": "latencies are SIMULATED by the trn1 cost model on the NKI emulator; "
               "no Trainium device was used", "target": target.fingerprint(), "host": platform.processor() or
               platform.machine(), "date": datetime.date.today().isoformat(), "budget": args.budget, "rows": rows}
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(out, indent=2, default=str))
    return 0 if all(r["naive_correct"] and r["best_correct"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
