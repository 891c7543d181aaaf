"""A Llama decoder block and the LM head at decode shapes through TVM pipelines, against PyTorch eager.

Rows (one process each: importing tvm into a torch process slows torch's CPU kernels, and TVM's thread
pool must not fight torch's; the processes take turns, never two timing at once):

  eager         PyTorch eager on the same module (`PastKVDecodeStep`, weights in memory)
  tvm-default   relax.build with TVM's default CPU pipeline (untuned loops)
  tvm-dlight    FuseTransposeMatmul + legalize/fuse + dlight's CPU GEMV/Reduction schedules
  tvm-ms        MetaSchedule, as relax.pipeline.static_shape_tuning_pipeline (`passes.tvm_tuning.tune`
                works around 0.27's timing-out builder): `--trials` in all, `--trials-per-task` each
                (the tuning time is reported)
  tvm-autocomp  AutocompPartition (kernel cache; `--autocomp-mode search` fills it first), then
                relax.build's default pipeline for what stays with TVM (the dlight passes made those
                small ops 12 ms slower per step in bf16, measured)

The model is a Llama-3.2-1B-shaped network cut to `--layers` decoder blocks (default 1) plus the final
norm and LM head (vocab 128256), random weights (seeded: every process builds the same ones), one new
token over a KV cache of `--past` positions, imported with `relax.frontend.torch.from_exported_program`
(or `--frontend onnx`). Weights are constants of the Relax module, so TVM folds their transposes at build.
Every row's logits and new keys/values are compared with eager's on the same inputs before timing.
Timing: `--rounds` rounds; in each, every row runs `--iters` calls after a warm-up; medians over all.

    python benchmarks/tvm.py --dtypes bf16 fp32 --json benchmarks/results/tvm_cpu_llama-3.2-1b.json
    python benchmarks/tvm.py --config tiny-llama --trials 64 --rows eager tvm-dlight tvm-autocomp  # quick
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

# This file is called tvm.py (as the issue names it); its directory must not shadow the tvm package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

ROWS = ("eager", "tvm-default", "tvm-dlight", "tvm-ms", "tvm-autocomp")
TVM_THREADS = 2


# ---------------------------------------------------------------- model and inputs (every process)


def build_model(cfg: dict[str, Any]):
    import torch

    from autocomp_compile.models.llama import build_llama, get_config

    torch.set_num_threads(TVM_THREADS if cfg["threads"] is None else cfg["threads"])
    config = replace(get_config(cfg["config"]), layers=cfg["layers"], max_seq_len=max(cfg["past"] + 2, 128))
    model = build_llama(config, dtype=cfg["dtype"], seed=0).eval()
    from autocomp_compile.models.export import decode_step_inputs

    return model, decode_step_inputs(model, batch=cfg["batch"], past_len=cfg["past"], seed=1)


def to_numpy(t) -> Any:
    import ml_dtypes
    import torch

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


def relax_module(cfg: dict[str, Any], model, example):
    from autocomp_compile.models.export import export_decode_step, export_decode_step_onnx
    from autocomp_compile.passes.tvm_import import from_onnx, from_torch

    if cfg["frontend"] == "onnx":
        path = Path(cfg["work_dir"]) / f"decode_{cfg['tag']}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        return from_onnx(export_decode_step_onnx(model, example, path))
    return from_torch(export_decode_step(model, example))


def tvm_target():
    import tvm

    from tvm.target import codegen

    return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": TVM_THREADS})


def dlight_passes() -> list:
    from tvm import relax
    from tvm.s_tir import dlight as dl

    return [
        relax.transform.FuseTransposeMatmul(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction()),
    ]


def compile_row(row: str, cfg: dict[str, Any], mod) -> tuple[Any, dict[str, Any]]:
    """Build `mod` the way `row` says; returns the VM executable and facts about the build."""
    import tvm
    from tvm import relax

    target = tvm_target()
    facts: dict[str, Any] = {}
    t0 = time.perf_counter()
    with target:
        if row == "tvm-default":
            pass
        elif row == "tvm-dlight":
            mod = tvm.transform.Sequential(dlight_passes())(mod)
        elif row == "tvm-ms":
            work = Path(cfg["work_dir"]) / f"ms_{cfg['tag']}"
            trials = 0 if cfg["reuse_tuning"] and (work / "database_workload.json").exists() else cfg["trials"]
            facts.update(trials=cfg["trials"], trials_per_task=cfg["trials_per_task"], work_dir=str(work),
                         tuned_now=trials > 0)
            from autocomp_compile.passes.tvm_tuning import tune

            mod = tune(mod, target, str(work), trials, cfg["trials_per_task"])
            if trials:
                facts["tuning_s"] = round(time.perf_counter() - t0, 1)
        elif row == "tvm-autocomp":
            from autocomp_compile.passes.tvm import AutocompPartition

            partition = AutocompPartition(target="cpu", mode=cfg["autocomp_mode"], budget=cfg["budget"],
                                          kinds=tuple(cfg["kinds"]), verbose=True)
            mod = partition(mod)  # the rest goes through relax.build's default pipeline, as in tvm-default
            report = partition.report
            facts.update(replaced=report.replaced, recognised=report.total,
                         decisions=[d.__dict__ for d in report.decisions])
        else:
            raise ValueError(row)
        executable = relax.build(mod, target=target)
    facts["build_s"] = round(time.perf_counter() - t0, 1)
    return executable, facts


# ---------------------------------------------------------------- worker processes


def worker(row: str, cfg: dict[str, Any], conn) -> None:
    """Build the row, then answer ("time", iters) requests with per-call seconds until ("stop",)."""
    try:
        model, example = build_model(cfg)
        if row == "eager":
            import torch

            from autocomp_compile.models.export import PastKVDecodeStep

            step = PastKVDecodeStep(model).eval()

            def call():
                with torch.no_grad():
                    return step(*example)

            def outputs(result):
                return [r.float().numpy() for r in result]

            facts: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
        else:
            import numpy as np
            import tvm
            from tvm import relax

            mod = relax_module(cfg, model, example)
            executable, facts = compile_row(row, cfg, mod)
            vm = relax.VirtualMachine(executable, tvm.cpu())
            inputs = [tvm.runtime.tensor(to_numpy(t)) for t in example]
            del model
            fn = vm["main"]

            def call():
                return fn(*inputs)

            def outputs(result):
                return [np.asarray(r.numpy(), dtype=np.float32) for r in result]

        first = outputs(call())
        conn.send(("ready", facts, first))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            _, iters, warmup = msg
            for _ in range(warmup):
                call()
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            conn.send(("times", times))
    except Exception:  # noqa: BLE001 - reported to the driver as this row's failure
        conn.send(("error", traceback.format_exc()))


def start(row: str, cfg: dict[str, Any]):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    env_before = dict(os.environ)
    os.environ["TVM_NUM_THREADS"] = str(cfg["autocomp_tvm_threads"] if row == "tvm-autocomp" else TVM_THREADS)
    os.environ.update(cfg.get("env", {}))
    proc = ctx.Process(target=worker, args=(row, cfg, child), daemon=True)
    proc.start()
    os.environ.clear()
    os.environ.update(env_before)
    return proc, parent


# ---------------------------------------------------------------- driver


def compare(out, ref, dtype: str) -> dict[str, Any]:
    import numpy as np

    errs = [float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30)) for o, r in zip(out, ref)]
    tol = 2e-2 if dtype == "bf16" else 1e-4
    return {"rel_l2_error": max(errs), "tolerance": tol, "correct": max(errs) <= tol,
            "same_argmax": bool((out[0].reshape(-1, out[0].shape[-1]).argmax(-1) ==
                                 ref[0].reshape(-1, ref[0].shape[-1]).argmax(-1)).all())}


def run_dtype(args, dtype: str) -> dict[str, Any]:
    cfg = {"config": args.config, "layers": args.layers, "past": args.past, "batch": args.batch, "dtype": dtype,
           "frontend": args.frontend, "work_dir": str(args.work_dir), "trials": args.trials,
           "trials_per_task": args.trials_per_task, "reuse_tuning": args.reuse_tuning,
           "autocomp_mode": args.autocomp_mode, "autocomp_tvm_threads": args.autocomp_tvm_threads,
           "env": dict(e.split("=", 1) for e in args.env), "budget": args.budget, "kinds": args.kinds, "threads": None,
           "tag": f"{args.config}_l{args.layers}_p{args.past}_b{args.batch}_{dtype}_{args.frontend}"}
    workers, facts, first, errors = {}, {}, {}, {}
    for row in args.rows:  # one at a time: no build overlaps another process's work
        print(f"[{dtype}] building {row} ...", file=sys.stderr, flush=True)
        proc, conn = start(row, cfg)
        t0 = time.perf_counter()
        limit = args.tuning_timeout if row == "tvm-ms" or (row == "tvm-autocomp" and args.autocomp_mode == "search") \
            else args.build_timeout
        if not conn.poll(limit):
            proc.kill()
            errors[row] = f"build did not finish within {limit:.0f} s (killed)"
            print(f"[{dtype}] {row}: {errors[row]}", file=sys.stderr, flush=True)
            continue
        msg = conn.recv()
        if msg[0] == "error":
            errors[row] = msg[1]
            print(f"[{dtype}] {row} failed:\n{msg[1]}", file=sys.stderr)
            proc.join(5)
            continue
        _, facts[row], first[row] = msg
        facts[row]["ready_s"] = round(time.perf_counter() - t0, 1)
        workers[row] = (proc, conn)
        print(f"[{dtype}] {row} ready: {json.dumps({k: v for k, v in facts[row].items() if k != 'decisions'})}",
              file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {row: [] for row in workers}
    slow = {}
    for r in range(args.rounds):
        for row, (proc, conn) in workers.items():
            iters, warmup = args.iters, args.warmup
            if row in slow:  # untuned builds take seconds per call: a couple of calls suffice
                iters, warmup = 1, 0
            conn.send(("time", iters, warmup))
            msg = conn.recv()
            times[row] += msg[1]
            if statistics.median(msg[1]) > 1.0:
                slow[row] = True
        print(f"[{dtype}] round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for proc, conn in workers.values():
        conn.send(("stop",))
        proc.join(10)
    ref = first.get("eager")
    result = {"dtype": dtype, "rows": {}, "errors": errors}
    for row in workers:
        med = statistics.median(times[row])
        entry = {"median_ms": med * 1e3, "p10_ms": sorted(times[row])[len(times[row]) // 10] * 1e3,
                 "calls": len(times[row]), **facts[row]}
        if ref is not None:
            entry.update(compare(first[row], ref, dtype))
        result["rows"][row] = entry
    base = result["rows"].get("eager", {}).get("median_ms")
    ms = result["rows"].get("tvm-ms", {}).get("median_ms")
    for entry in result["rows"].values():
        entry["speedup_vs_eager"] = base / entry["median_ms"] if base else None
        entry["speedup_vs_tvm_ms"] = ms / entry["median_ms"] if ms else None
    return result


def print_table(results: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("dtype", "pipeline", "ms / step", "vs eager", "vs TVM MetaSchedule", "rel. error vs eager",
                "build / tuning"):
        table.add_column(col, justify="right" if col not in ("dtype", "pipeline") else "left")
    for res in results:
        for row, e in res["rows"].items():
            build = f"{e.get('build_s', 0):.0f} s"
            if e.get("tuning_s"):
                build += f" (tuning {e['tuning_s']:.0f} s, {e['trials']} trials)"
            elif row == "tvm-ms":
                build += f" (database reused, {e['trials']} trials)"
            if row == "tvm-autocomp":
                build += f", {e['replaced']}/{e['recognised']} regions offloaded"
            err = f"{e['rel_l2_error']:.1e}{'' if e['correct'] else ' WRONG'}" if "rel_l2_error" in e else "-"
            table.add_row(res["dtype"], row, f"{e['median_ms']:.2f}",
                          f"{e['speedup_vs_eager']:.2f}x" if e.get("speedup_vs_eager") else "-",
                          f"{e['speedup_vs_tvm_ms']:.2f}x" if e.get("speedup_vs_tvm_ms") else "-", err, build)
        for row, err in res["errors"].items():
            table.add_row(res["dtype"], row, "failed", "", "", "", err.strip().splitlines()[-1][:60])
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama-3.2-1b", choices=["llama-3.2-1b", "tiny-llama"])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--past", type=int, default=511, help="KV positions before the new token")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--frontend", default="torch", choices=["torch", "onnx"])
    p.add_argument("--trials", type=int, default=512, help="MetaSchedule trials in all")
    p.add_argument("--trials-per-task", type=int, default=32)
    p.add_argument("--reuse-tuning", action="store_true", help="apply an existing MetaSchedule database, no tuning")
    p.add_argument("--autocomp-mode", default="cache-only", choices=["cache-only", "search"])
    p.add_argument("--budget", type=int, default=16, help="search budget per workload (--autocomp-mode search)")
    p.add_argument("--kinds", nargs="+", default=["attention", "mlp", "lm_head", "gemm"])
    p.add_argument("--autocomp-tvm-threads", type=int, default=TVM_THREADS,
                   help="TVM thread-pool size in the tvm-autocomp row (its kernels bring their own OpenMP threads)")
    p.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE", help="environment of the TVM row processes")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--work-dir", type=Path, default=Path("output/tvm_bench"))
    p.add_argument("--build-timeout", type=float, default=600, help="seconds a row may take to build")
    p.add_argument("--tuning-timeout", type=float, default=3600, help="... to tune and build (MetaSchedule, search)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    results = [run_dtype(args, dtype) for dtype in args.dtypes]
    title = (f"{args.config} x{args.layers} block(s) + LM head, decode batch {args.batch}, KV {args.past}+1, "
             f"{args.frontend} frontend, {TVM_THREADS} threads")
    print_table(results, title)
    if args.json:
        import platform

        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.processor() or
                platform.machine(), "cpus": os.cpu_count(), "argv": sys.argv[1:], "title": title}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if all(e.get("correct", True) for r in results for e in r["rows"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
