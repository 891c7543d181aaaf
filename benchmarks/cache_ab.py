"""Decode tokens/sec of one model compiled against two kernel caches, interleaved in one process (CPU).

    python benchmarks/cache_ab.py --cache-a ~/.cache/autocomp_compile --cache-b /tmp/rewarmed --json ab.json

Each round compiles the model once per cache (from scratch: dynamo is reset in between), in alternating order, and times `--steps` decode steps of each next
to one eager step per three, so that the machine's drift hits both alike. Besides the step times it reports the
time spent inside the kernels of each workload, per step, so that a cache whose kernels are faster alone but not
in the model shows where. Use it after a re-warm (a new codegen, a new schedule space) to see whether the new
winners speed up the model, not only their own searches.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from autocomp_compile.models import build_llama
from autocomp_compile.passes.kernels import BoundKernel

console = Console()


def _part(kernel: BoundKernel) -> str:
    """A workload's part of the step: its kind, and a GEMM's output rows (the projections differ in size)."""
    w = kernel.workload
    return f"{w.kind} n={w.params['n']}" if w.kind == "gemm" else w.kind


class KernelClock:
    """Seconds spent in each part's kernels, and which kernels ran (their code hashes), per variant; wraps
    BoundKernel calls while installed."""

    def __init__(self) -> None:
        self.variant = ""
        self.spent: dict[tuple[str, str], float] = collections.defaultdict(float)
        self.ran: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
        self._call = BoundKernel.__call__

    def __enter__(self) -> "KernelClock":
        clock, call = self, self._call

        def timed(kernel: BoundKernel, inputs, outputs, dims=()) -> None:
            t0 = time.perf_counter()
            call(kernel, inputs, outputs, dims)
            clock.spent[(clock.variant, _part(kernel))] += time.perf_counter() - t0
            clock.ran[(clock.variant, _part(kernel))].add(kernel.code_hash)

        BoundKernel.__call__ = timed
        return self

    def __exit__(self, *exc: object) -> None:
        BoundKernel.__call__ = self._call


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = build_llama(args.model, args.dtype, seed=0)
    model.setup_caches(1)
    limit = model.config.max_seq_len
    args.pos = limit // 2 if args.pos is None else args.pos
    if not 0 <= args.pos < limit:
        raise SystemExit(f"cache_ab.py: --pos must be in [0, {limit}) for {args.model}, got {args.pos}")
    caches = {"A": args.cache_a, "B": args.cache_b}
    tok = torch.zeros(1, 1, dtype=torch.long)
    pos = torch.tensor([args.pos])
    steps: dict[str, list[float]] = {"A": [], "B": [], "eager": []}
    ratios: dict[str, list[float]] = {"A": [], "B": []}
    with torch.no_grad(), KernelClock() as clock:
        for r in range(args.rounds):
            for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                torch._dynamo.reset()
                fn = torch.compile(model, backend="autocomp", dynamic=False,
                                   options={"mode": "cache-only", "cache_dir": caches[name], "verbose": args.verbose,
                                            "min_speedup": args.min_speedup})
                clock.variant = ""  # compilation and warm-up are not counted
                for _ in range(2):
                    fn(tok, pos, last_only=True)
                mine, eager = [], []
                for i in range(args.steps):
                    clock.variant = name
                    t0 = time.perf_counter()
                    fn(tok, pos, last_only=True)
                    mine.append(time.perf_counter() - t0)
                    if i % 3 == 0:
                        clock.variant = ""
                        t0 = time.perf_counter()
                        model(tok, pos, last_only=True)
                        eager.append(time.perf_counter() - t0)
                steps[name] += mine
                steps["eager"] += eager
                ratios[name].append(statistics.median(eager) / statistics.median(mine))
            console.print(f"  round {r + 1}/{args.rounds}: A {statistics.median(steps['A']) * 1e3:.1f} ms, "
                          f"B {statistics.median(steps['B']) * 1e3:.1f} ms per step")
    torch._dynamo.reset()
    parts = sorted({part for (_, part) in clock.spent})
    return {
        "model": args.model, "dtype": args.dtype, "pos": args.pos, "rounds": args.rounds, "steps": args.steps,
        "caches": caches, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "step_ms": {k: statistics.median(v) * 1e3 for k, v in steps.items()},
        "speedup_vs_eager": {k: statistics.median(v) for k, v in ratios.items()},
        "speedup_vs_eager_per_round": ratios,
        "kernel_ms_per_step": {k: {p: clock.spent[(k, p)] / len(steps[k]) * 1e3 for p in parts} for k in ("A", "B")},
        "kernels_run": {k: {p: sorted(clock.ran[(k, p)]) for p in parts if clock.ran[(k, p)]} for k in ("A", "B")},
    }


def print_tables(res: dict) -> None:
    t = Table(title=f"{res['model']} {res['dtype']}: decode step with kernel cache A vs B (medians, one process)")
    for col in ("variant", "step ms", "tok/s", "vs eager (per-round median)"):
        t.add_column(col, justify="right")
    for k in ("A", "B", "eager"):
        ms = res["step_ms"][k]
        vs = res["speedup_vs_eager"].get(k)
        t.add_row(k, f"{ms:.2f}", f"{1e3 / ms:.2f}", f"{vs:.3f}x" if vs else "1.000x")
    console.print(t)
    p = Table(title="time inside each part's kernels, ms per step")
    for col in ("part", "A", "B", "B / A"):
        p.add_column(col, justify="right")
    a, b = res["kernel_ms_per_step"]["A"], res["kernel_ms_per_step"]["B"]
    for part in a:
        p.add_row(part, f"{a[part]:.2f}", f"{b[part]:.2f}", f"{b[part] / a[part]:.3f}" if a[part] else "-")
    console.print(p)
    console.print(f"B's step time over A's: {res['step_ms']['B'] / res['step_ms']['A']:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--cache-a", required=True, help="kernel cache directory A (e.g. before a re-warm)")
    p.add_argument("--cache-b", required=True, help="kernel cache directory B")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=9, help="decode steps timed per variant and round")
    p.add_argument("--pos", type=int, help="KV position of the timed decode steps (default: half the model's "
                   "max_seq_len, the position `warm` tunes decode attention for)")
    p.add_argument("--min-speedup", type=float, default=1.0,
                   help="the backend's min_speedup: a cached kernel replaces PyTorch when its search measured at least this")
    p.add_argument("--verbose", action="store_true", help="print the backend's replacement summaries")
    p.add_argument("--json", dest="json_path")
    args = p.parse_args()
    for d in (args.cache_a, args.cache_b):
        if not (Path(d) / "kernels.sqlite").exists():
            p.error(f"no kernel cache in {d} (expected {Path(d) / 'kernels.sqlite'})")
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be >= 1")
    res = run(args)
    print_tables(res)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(res, indent=2))
        console.print(f"wrote {args.json_path}")


if __name__ == "__main__":
    main()
