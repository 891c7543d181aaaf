"""Sweep the decode MLP's schedule families at Llama-3.2-1B shape on a GPU: the streaming one-kernel MLP
(down projection read transposed), the one-kernel split-K MLP (atomics), the persistent one-kernel MLP
(grid barrier) and the two-kernel MLP (gate/up, then down).
The two-kernel family is swept in stages, each keeping the best of the one before: the gate/up kernel's
schedule (the down kernel fixed), then the down kernel's own schedule (block size, split K, loads in
flight, rows per warp), then the switches (programmatic dependent launch, L2 prefetch of the down
weights, streaming loads). Each variant is checked against the reference once, then timed interleaved
with eager (cuBLAS) under the evaluator's CUDA timing (events, L2 flushed), and checked again after the
hundreds of timed launches (the one-kernel forms reset their own scratch for the next launch). Prints a table sorted by
time and writes JSON whose "best" entry is the fastest correct schedule (cuda_check.sh seeds the MLP
search with it).

    python benchmarks/device/mlp_sweep.py --json mlp_sweep.json [--families streaming two_kernel split_k persistent]
    python benchmarks/device/mlp_sweep.py --best-of mlp_sweep.json      # print the best knobs as JSON
    python benchmarks/device/mlp_sweep.py --compile-only sm_90          # no GPU: build every schedule
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

FAMILIES = ("streaming", "two_kernel", "split_k", "persistent")  # persistent last: a hung grid barrier costs the rest
KEYS = ("down_t", "fuse_down", "persistent", "chunk", "per_sm", "warps", "rows", "ksplit", "unroll", "down_warps", "down_rows",
        "down_ksplit", "down_unroll", "pdl", "l2_prefetch", "stream_loads")

Measure = Callable[[str, dict[str, Any]], dict[str, Any]]


def streaming_grid() -> list[dict[str, Any]]:
    """The streaming MLP: warps per block x intermediate rows per block x load hint."""
    return [dict(down_t=True, warps=wp, chunk=c, stream_loads=st)
            for wp, c, st in itertools.product((2, 4, 8), (16, 32, 64, 128), (True, False))]


def split_k_grid() -> list[dict[str, Any]]:
    """Around the best of the 48-point grid measured on an H100 (chunk 32, 16 warps, unroll 8)."""
    return [dict(fuse_down=True, chunk=c, warps=wp, unroll=u, stream_loads=True)
            for c, wp, u in itertools.product((32, 64), (8, 16), (4, 8))]


def persistent_grid() -> list[dict[str, Any]]:
    return [dict(persistent=True, per_sm=b, warps=wp, unroll=u, l2_prefetch=pf, stream_loads=True)
            for b, wp, u, pf in itertools.product((1, 2, 4), (8, 16), (4, 8), (True, False))]


def two_kernel_stages(measure: Measure) -> Iterator[dict[str, Any]]:
    """Coordinate descent over the two-kernel MLP: gate/up schedule, down schedule, then switches."""
    def best(rows: list[dict[str, Any]], fallback: dict[str, Any]) -> dict[str, Any]:
        good = [r for r in rows if r.get("correct")]
        return min(good, key=lambda r: r["ms"])["schedule"] if good else fallback

    base = dict(fuse=True, stream_loads=True, down_warps=8, down_ksplit=4, down_unroll=8, down_rows=1)
    rows = []
    for wp, u, r in itertools.product((4, 8, 16), (4, 8), (1, 2)):
        rows.append(measure("two_kernel", dict(base, warps=wp, unroll=u, rows=r, ksplit=1)))
        yield rows[-1]
    gate_up = best(rows, dict(base, warps=8, unroll=8, rows=1, ksplit=1))
    rows = []
    for dw, dk, du, dr in itertools.product((4, 8, 16), (1, 2, 4, 8), (4, 8), (1, 2)):
        if dk <= dw and not (dr == 2 and du == 8):
            rows.append(measure("two_kernel", dict(gate_up, down_warps=dw, down_ksplit=dk, down_unroll=du, down_rows=dr)))
            yield rows[-1]
    down = best(rows, gate_up)
    for pdl, pf, st in itertools.product((True, False), (True, False), (True, False)):
        yield measure("two_kernel", dict(down, pdl=pdl, l2_prefetch=pf, stream_loads=st))


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest correct row; a row checked correct whose timing then failed has no time and is left out."""
    good = [r for r in rows if r.get("correct") and "ms" in r]
    return min(good, key=lambda r: r["ms"]) if good else None


def compile_all(families: list[str], arch: str) -> int:
    """Build every schedule of `families` for `arch` (the two-kernel stages follow their fallbacks, as
    nothing is timed); returns the number that failed."""
    from autocomp_compile import make_workload
    from autocomp_compile.targets.cuda import codegen
    from autocomp_compile.targets.cuda.build import build

    w = make_workload("mlp", "bf16", batch=1, hidden=2048, intermediate=8192)
    build_dir = Path(tempfile.mkdtemp())
    start, failed, total = time.perf_counter(), 0, 0

    def measure(family: str, schedule: dict[str, Any]) -> dict[str, Any]:
        nonlocal failed, total
        b = build(codegen.generate(w, codegen.legalize(w, dict(naive=False, vec=True, **schedule))), arch, build_dir)
        total += 1
        if not b.ok:
            failed += 1
            print(f"{family} {schedule}: build failed\n{b.log[-500:]}")
        return {"family": family, "schedule": schedule}

    for family in families:
        if family == "two_kernel":
            list(two_kernel_stages(measure))
        else:
            for s in {"streaming": streaming_grid, "split_k": split_k_grid, "persistent": persistent_grid}[family]():
                measure(family, s)
    print(f"{total} schedules built for {arch}, {failed} failed, {time.perf_counter() - start:.0f} s")
    return failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--timing-ms", type=float, default=150.0)
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--best-of", default=None, help="print the best schedule of this sweep JSON and exit")
    ap.add_argument("--compile-only", metavar="ARCH", default=None,
                    help="build every schedule for ARCH (e.g. sm_90) without a GPU, report failures and exit")
    args = ap.parse_args()
    if args.best_of:
        best = json.loads(Path(args.best_of).read_text()).get("best")
        if not best:
            sys.exit(f"{args.best_of}: no correct schedule")
        print(json.dumps(dict(naive=False, vec=True, **best["schedule"])))  # as measure() legalises it
        return

    if args.compile_only:
        sys.exit(compile_all(args.families, args.compile_only))
    import torch

    from autocomp_compile import make_workload
    from autocomp_compile.evaluation.checks import compare, time_interleaved_cuda
    from autocomp_compile.references import InputFactory, empty_outputs, get_kind
    from autocomp_compile.targets.cuda import codegen
    from autocomp_compile.targets.cuda.bandwidth import measure_hbm_bandwidth, measure_hbm_read_bandwidth
    from autocomp_compile.targets.cuda.build import build
    from autocomp_compile.targets.cuda.runtime import load

    w = make_workload("mlp", "bf16", batch=1, hidden=2048, intermediate=8192)
    spec = get_kind(w.kind)
    host = InputFactory(0).inputs(w)
    ref = spec.reference(host, w.params, w.runtime_dims)["out"]
    dev = {k: v.cuda() for k, v in host.items()}
    base_out = empty_outputs(w, device="cuda")
    arch = "sm_%d%d" % torch.cuda.get_device_capability()
    bw, read_bw = measure_hbm_bandwidth(), measure_hbm_read_bandwidth()
    build_dir = Path(tempfile.mkdtemp())
    seen: dict[str, dict[str, Any]] = {}

    def measure(family: str, schedule: dict[str, Any]) -> dict[str, Any]:
        knobs = codegen.legalize(w, dict(naive=False, vec=True, **schedule))
        key = repr(sorted(knobs.items()))
        if key in seen:  # legalisation can map two grid points to one schedule
            return seen[key]
        row: dict[str, Any] = {"family": family, "schedule": schedule, "knobs": {k: knobs[k] for k in KEYS}}
        seen[key] = row
        src = codegen.generate(w, knobs)
        b = build(src, arch, build_dir)
        if not b.ok:
            row["error"] = b.log[-300:]
            return row
        try:
            kernel = load(str(b.cubin_path), src, [t.name for t in w.tensors], [])
        except Exception as exc:  # noqa: BLE001 - e.g. a persistent grid that does not fit on this GPU
            row["error"] = f"{type(exc).__name__}: {exc}"
            return row
        outs = empty_outputs(w, device="cuda")
        args_ = [dev[t.name] for t in w.inputs] + [outs["out"]]
        try:
            kernel(args_)
            torch.cuda.synchronize()
            row["correct"] = compare("out", outs["out"].cpu(), ref).ok
            t = time_interleaved_cuda({"kernel": lambda: kernel(args_),
                                       "eager": lambda: spec.eager(dev, base_out, w.params, w.runtime_dims)},
                                      budget_ms=args.timing_ms)
        except Exception as exc:  # noqa: BLE001 - a launch error; a sticky CUDA error fails the rows after it too
            row["error"] = f"{type(exc).__name__}: {exc}"
            print(f"  {family:>10} failed: {row['error'][:200]} {schedule}", flush=True)
            return row
        torch.cuda.synchronize()
        # again after every timed launch: the one-kernel forms must leave their scratch zeroed for the next one
        row["correct_after_timing"] = compare("out", outs["out"].cpu(), ref).ok
        row["correct"] = row["correct"] and row["correct_after_timing"]
        ms = t["kernel"].median_ms
        row.update({"ms": ms, "eager_ms": t["eager"].median_ms, "gbps": w.bytes_moved() / (ms * 1e6),
                    "percent_of_copy_bw": 100 * w.bytes_moved() / (ms * 1e6) / bw,
                    "percent_of_read_bw": 100 * w.bytes_moved() / (ms * 1e6) / read_bw})
        print(f"  {family:>10} {ms * 1e3:7.1f} us {row['percent_of_copy_bw']:4.0f}% {'ok ' if row['correct'] else 'BAD'} "
              f"{schedule}", flush=True)
        return row

    def save(rows: list[dict[str, Any]], seconds: float) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_gbps": bw,
                                                   "read_gbps": read_bw,
                                                   "seconds": seconds, "best": best_row(rows), "rows": rows}, indent=1))

    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for family in args.families:
        points = {"streaming": lambda: (measure("streaming", s) for s in streaming_grid()),
                  "split_k": lambda: (measure("split_k", s) for s in split_k_grid()),
                  "persistent": lambda: (measure("persistent", s) for s in persistent_grid()),
                  "two_kernel": lambda: two_kernel_stages(measure)}[family]()
        for row in points:
            if row not in rows:
                rows.append(row)
                save(rows, time.perf_counter() - start)  # a stage killed by its time limit keeps what it measured

    good = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    print(f"{torch.cuda.get_device_name()}: HBM copy bandwidth {bw:.0f} GB/s, read bandwidth {read_bw:.0f} GB/s")
    print(f"{'family':>10} {'ms':>8} {'eager':>8} {'GB/s':>7} {'%BW':>5} ok  schedule")
    for fam in args.families:
        for r in [r for r in good if r["family"] == fam][:6]:
            print(f"{fam:>10} {r['ms']:8.4f} {r['eager_ms']:8.4f} {r['gbps']:7.0f} {r['percent_of_copy_bw']:5.0f} "
                  f"{str(r['correct']):5s} {r['schedule']}")
    print(f"{len(good)} variants timed, {sum(not r['correct'] for r in good)} wrong, "
          f"{sum('error' in r for r in rows)} failed to build or load, {time.perf_counter() - start:.0f} s")
    save(rows, time.perf_counter() - start)


if __name__ == "__main__":
    main()
