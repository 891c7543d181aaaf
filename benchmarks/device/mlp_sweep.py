"""Sweep the decode MLP's schedule families at Llama-3.2-1B shape on a GPU: the two-kernel MLP (gate/up,
then down; optionally prefetching the down weights into L2), the one-kernel split-K MLP (atomics) and the
persistent one-kernel MLP (grid barrier). Each variant is checked against the reference once, then timed
interleaved with eager (cuBLAS) under the evaluator's CUDA timing (events, L2 flushed). Prints a table
sorted by time and writes JSON.

    python benchmarks/device/mlp_sweep.py --json mlp_sweep.json [--families split_k persistent two_kernel]
"""
from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import torch

from autocomp_compile import make_workload
from autocomp_compile.evaluation.checks import compare, time_interleaved_cuda
from autocomp_compile.references import InputFactory, empty_outputs, get_kind
from autocomp_compile.targets.cuda import codegen
from autocomp_compile.targets.cuda.bandwidth import measure_hbm_bandwidth
from autocomp_compile.targets.cuda.build import build
from autocomp_compile.targets.cuda.runtime import load


FAMILIES = {
    "split_k": [dict(fuse_down=True, chunk=c, warps=wp, unroll=u, stream_loads=st)
                for c, wp, u, st in itertools.product((16, 32, 64, 128), (4, 8, 16), (4, 8), (True, False))],
    "persistent": [dict(persistent=True, blocks=b, warps=wp, unroll=u, l2_prefetch=pf, stream_loads=True)
                   for b, wp, u, pf in itertools.product((64, 128, 256), (4, 8, 16), (4, 8), (True, False))],
    "two_kernel": [dict(fuse=True, warps=wp, rows=r, ksplit=ks, unroll=u, l2_prefetch=pf, stream_loads=True)
                   for wp, r, ks, u, pf in itertools.product((4, 8), (1, 2), (1, 4), (4, 8), (True, False))],
}
KEYS = ("fuse_down", "persistent", "chunk", "blocks", "warps", "rows", "ksplit", "unroll", "l2_prefetch", "stream_loads")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    ap.add_argument("--timing-ms", type=float, default=150.0)
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    args = ap.parse_args()
    w = make_workload("mlp", "bf16", batch=1, hidden=2048, intermediate=8192)
    spec = get_kind(w.kind)
    host = InputFactory(0).inputs(w)
    ref = spec.reference(host, w.params, w.runtime_dims)["out"]
    dev = {k: v.cuda() for k, v in host.items()}
    base_out = empty_outputs(w, device="cuda")
    arch = "sm_%d%d" % torch.cuda.get_device_capability()
    bw = measure_hbm_bandwidth()
    build_dir = Path(tempfile.mkdtemp())
    rows = []
    for family, schedule in ((f, k) for f in args.families for k in FAMILIES[f]):
        knobs = codegen.legalize(w, dict(naive=False, vec=True, **schedule))
        src = codegen.generate(w, knobs)
        b = build(src, arch, build_dir)
        if not b.ok:
            rows.append({"family": family, "knobs": knobs, "error": b.log[-300:]})
            continue
        try:
            kernel = load(str(b.cubin_path), src, [t.name for t in w.tensors], [])
        except Exception as exc:  # noqa: BLE001 - e.g. a persistent grid that does not fit on this GPU
            rows.append({"family": family, "knobs": knobs, "error": f"{type(exc).__name__}: {exc}"})
            continue
        outs = empty_outputs(w, device="cuda")
        args_ = [dev[t.name] for t in w.inputs] + [outs["out"]]
        kernel(args_)
        torch.cuda.synchronize()
        ok = compare("out", outs["out"].cpu(), ref)
        t = time_interleaved_cuda({"kernel": lambda: kernel(args_),
                                   "eager": lambda: spec.eager(dev, base_out, w.params, w.runtime_dims)},
                                  budget_ms=args.timing_ms)
        ms = t["kernel"].median_ms
        rows.append({"family": family, "knobs": {k: knobs[k] for k in KEYS}, "correct": ok.ok,
                     "ms": ms, "eager_ms": t["eager"].median_ms, "gbps": w.bytes_moved() / (ms * 1e6),
                     "percent_of_copy_bw": 100 * w.bytes_moved() / (ms * 1e6) / bw})
    good = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    print(f"{torch.cuda.get_device_name()}: HBM copy bandwidth {bw:.0f} GB/s")
    print(f"{'family':>10} {'ms':>8} {'eager':>8} {'GB/s':>7} {'%BW':>5} ok  schedule")
    for fam in args.families:
        for r in [r for r in good if r["family"] == fam][:6]:
            k = {key: v for key, v in r["knobs"].items() if key not in ("fuse_down", "persistent")}
            print(f"{fam:>10} {r['ms']:8.4f} {r['eager_ms']:8.4f} {r['gbps']:7.0f} {r['percent_of_copy_bw']:5.0f} "
                  f"{str(r['correct']):5s} {k}")
    print(f"{len(good)} variants timed, {sum(not r['correct'] for r in good)} wrong, "
          f"{sum('error' in r for r in rows)} failed to build or load")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_gbps": bw, "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
