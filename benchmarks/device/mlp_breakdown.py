"""Where the decode MLP's time goes on a GPU, and how the L2 flush before each timed call affects it.

For one two-kernel MLP schedule (default: the best of mlp_sweep on an H100, or with --from-sweep the best
two-kernel and streaming schedules of an mlp_sweep.py JSON from this GPU) it times, with CUDA events after a
~100 us spin kernel as the evaluator does, each kernel alone, both, the streaming one-kernel MLP (down projection
read transposed), a single GEMV reading as many bytes, and eager (cuBLAS), under three cache states before each call:
  zero     zero a buffer twice the L2 (triton's do_bench; the evaluator before codegen cuda-5): leaves L2 full of
           dirty lines to write back
  read     read that buffer instead (the evaluator's flush since cuda-5): leaves clean lines
  rotate   no flush; the call reads one of 4 weight copies in turn (400 MB), as consecutive layers of a model do
Percentages are of the measured device-to-device copy bandwidth (read + written), as everywhere else, and of
the measured read bandwidth (a 2 GB sum).

    python benchmarks/device/mlp_breakdown.py [--from-sweep mlp_sweep.json] [--knobs JSON] [--streaming JSON]
                                              [--json out.json] [--pdl]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

SWEEP_BEST = {"naive": False, "vec": True, "fuse": True, "stream_loads": True, "down_warps": 8, "down_ksplit": 8,
              "down_unroll": 8, "down_rows": 1, "warps": 4, "unroll": 8, "rows": 2, "ksplit": 1}
STREAMING = {"naive": False, "down_t": True, "warps": 8, "chunk": 64, "stream_loads": True}
COPIES = 4


def schedules(sweep: str | None, knobs: str | None, streaming: str | None) -> tuple[dict, dict]:
    """The two-kernel and streaming schedules to time: explicit JSON first, then the sweep's best correct row of
    each family (as mlp_sweep.py legalises it), then this file's defaults (H100 results)."""
    best: dict[str, dict] = {}
    if sweep and Path(sweep).exists():
        rows = [r for r in json.loads(Path(sweep).read_text()).get("rows", []) if r.get("correct") and "ms" in r]
        for family in ("two_kernel", "streaming"):
            mine = [r for r in rows if r["family"] == family]
            if mine:
                best[family] = dict(naive=False, vec=True, **min(mine, key=lambda r: r["ms"])["schedule"])
    return (json.loads(knobs) if knobs else best.get("two_kernel", SWEEP_BEST),
            json.loads(streaming) if streaming else best.get("streaming", STREAMING))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-sweep", default=None, metavar="JSON",
                    help="take the two-kernel and streaming schedules from the best correct rows of an mlp_sweep.py "
                         "JSON (a missing file or family keeps the defaults; --knobs / --streaming override)")
    ap.add_argument("--knobs", default=None, help=f"the two-kernel MLP's schedule (default {json.dumps(SWEEP_BEST)})")
    ap.add_argument("--streaming", default=None, help=f"the streaming MLP's schedule (default {json.dumps(STREAMING)})")
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--json", default=None)
    ap.add_argument("--pdl", action="store_true", help="also time programmatic-dependent-launch variants")
    args = ap.parse_args()
    knobs, streaming = schedules(args.from_sweep, args.knobs, args.streaming)
    import torch

    from autocomp_compile import make_workload
    from autocomp_compile.references import InputFactory, empty_outputs, get_kind
    from autocomp_compile.targets.cuda import codegen
    from autocomp_compile.targets.cuda.bandwidth import measure_hbm_bandwidth, measure_hbm_read_bandwidth
    from autocomp_compile.targets.cuda.build import build
    from autocomp_compile.targets.cuda.runtime import launch_spec, load

    arch = "sm_%d%d" % torch.cuda.get_device_capability()
    build_dir = Path(tempfile.mkdtemp())
    bw, read_bw = measure_hbm_bandwidth(), measure_hbm_read_bandwidth()

    def compiled(w, knobs, keep=None, edit=lambda src: src):
        """Kernel for w under knobs; `keep` = indices of the launch line's kernels to run (the rest dropped);
        `edit` rewrites the source first (the PDL experiments)."""
        src = edit(codegen.generate(w, codegen.legalize(w, knobs)))
        b = build(src, arch, build_dir)
        assert b.ok, b.log
        if keep is not None:
            spec = launch_spec(src)
            spec["kernels"] = [spec["kernels"][i] for i in keep]
            src = f"// autocomp-launch: {json.dumps(spec)}\n" + src.split("\n", 1)[1]
        return load(str(b.cubin_path), src, [t.name for t in w.tensors], [])

    mlp = make_workload("mlp", "bf16", batch=1, hidden=2048, intermediate=8192)
    gemv = make_workload("lm_head", "bf16", batch=1, vocab=3 * 8192, hidden=2048)  # 100.7 MB, as many as the MLP
    gemv_knobs = {k: knobs.get(k, SWEEP_BEST[k]) for k in ("naive", "vec", "stream_loads", "warps", "unroll", "rows", "ksplit")}
    kernels = {"mlp (both kernels)": (mlp, compiled(mlp, knobs))}
    if len(launch_spec(codegen.generate(mlp, codegen.legalize(mlp, knobs)))["kernels"]) == 2:
        kernels.update({"gate/up kernel alone": (mlp, compiled(mlp, knobs, [0])),
                        "down kernel alone": (mlp, compiled(mlp, knobs, [1]))})
    kernels["mlp, streaming"] = (mlp, compiled(mlp, streaming))
    kernels["one GEMV, 100.7 MB"] = (gemv, compiled(gemv, gemv_knobs))
    if args.pdl:  # programmatic dependent launch: where gate/up lets the down kernel start, with/without prefetch
        pdl = {**knobs, "pdl": True}
        trigger = 'asm volatile("griddepcontrol.launch_dependents;");'
        no_prefetch = lambda src: src.replace('asm volatile("prefetch.global.L2 [%0];" :: "l"(base + o));', ";")

        def late_trigger(src: str) -> str:  # after the gate/up kernel's loads, before its reductions and stores
            head, rest = src.split(trigger, 1)
            loop = "  #pragma unroll\n  for (int j = 0; j < 2; ++j)"
            first = rest.index(loop)
            second = rest.index(loop, first + 1)
            return head + ";" + rest[:second] + "  " + trigger + "\n" + rest[second:]

        kernels.update({
            "mlp, PDL": (mlp, compiled(mlp, pdl)),
            "mlp, PDL, no prefetch": (mlp, compiled(mlp, pdl, edit=no_prefetch)),
            "mlp, PDL late": (mlp, compiled(mlp, pdl, edit=late_trigger)),
            "mlp, PDL late, no prefetch": (mlp, compiled(mlp, pdl, edit=lambda s: late_trigger(no_prefetch(s)))),
        })
    bytes_read = {"mlp (both kernels)": mlp.bytes_moved(), "gate/up kernel alone": 2 * 8192 * 2048 * 2,
                  "down kernel alone": 8192 * 2048 * 2, "one GEMV, 100.7 MB": gemv.bytes_moved(),
                  "eager mlp (cuBLAS)": mlp.bytes_moved(), "mlp, streaming": mlp.bytes_moved()}
    bytes_read.update({n: mlp.bytes_moved() for n in kernels if n.startswith("mlp, PDL")})
    sets = {}
    for w in (mlp, gemv):
        sets[w.name] = []
        for c in range(COPIES):
            host = InputFactory(c).inputs(w)
            sets[w.name].append(({k: v.cuda() for k, v in host.items()}, empty_outputs(w, device="cuda")))
    ref = get_kind("mlp").reference(InputFactory(0).inputs(mlp), mlp.params, mlp.runtime_dims)["out"]
    d0, o0 = sets[mlp.name][0]
    errors = {}
    for n in [n for n in kernels if n.startswith("mlp") and "alone" not in n]:
        o0["out"].fill_(float("nan"))
        kernels[n][1]([d0[t.name] for t in mlp.inputs] + [o0["out"]])
        torch.cuda.synchronize()
        errors[n] = (o0["out"].float().cpu() - ref).abs().max().item()
    err = max(errors.values())

    def call(name: str, c: int):
        if name == "eager mlp (cuBLAS)":
            d, o = sets[mlp.name][c]
            return lambda: get_kind("mlp").eager(d, o, mlp.params, mlp.runtime_dims)
        w, kernel = kernels[name]
        d, o = sets[w.name][c]
        argv = [d[t.name] for t in w.inputs] + [o["out"]]
        return lambda: kernel(argv)

    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    buf = torch.empty(2 * l2, dtype=torch.uint8, device="cuda")
    flushes = {"zero": lambda: buf.zero_(), "read": lambda: buf.view(torch.int32).sum(), "rotate": lambda: None}
    names = list(kernels) + ["eager mlp (cuBLAS)"]
    results = {}
    for mode, flush in flushes.items():
        fns = {n: [call(n, c) for c in range(COPIES)] for n in names}
        for n in names:
            for fn in fns[n]:
                fn()
        torch.cuda.synchronize()
        times = {n: [] for n in names}
        for i in range(args.runs):
            for n in (names if i % 2 == 0 else names[::-1]):
                flush()
                torch.cuda._sleep(200_000)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[n][i % COPIES if mode == "rotate" else 0]()
                end.record()
                times[n].append((start, end))
        torch.cuda.synchronize()
        results[mode] = {n: statistics.median(s.elapsed_time(e) for s, e in times[n]) * 1e3 for n in names}

    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw:.0f} GB/s, read bandwidth {read_bw:.0f} GB/s; "
          f"max |mlp - reference| {err:.3g}; knobs {knobs}")
    print(f"{'':24}" + "".join(f"{m + ' (% copy / % read)':>30}" for m in flushes))
    for n in names:
        cells = "".join(f"{results[m][n]:9.1f} us {100 * bytes_read[n] / (results[m][n] * 1e3) / bw:5.0f}% "
                        f"{100 * bytes_read[n] / (results[m][n] * 1e3) / read_bw:5.0f}%  " for m in flushes)
        print(f"{n:24}{cells}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_gbps": bw,
                                               "read_gbps": read_bw, "knobs": knobs, "streaming": streaming,
                                               "max_abs_error": errors, "us": results, "bytes": bytes_read}, indent=1))


if __name__ == "__main__":
    main()
