"""End-to-end tokens/sec: PyTorch eager vs torch.compile (inductor) vs torch.compile(backend="autocomp").

One process, one model (random weights, nothing downloaded), the three variants interleaved round by
round so that machine noise hits them alike. Prefill tokens/sec counts the prompt tokens of the whole
batch; decode tokens/sec counts generated tokens of the whole batch (batch x steps / time). The
autocomp variant runs in cache-only mode: warm the cache first (`autocomp-compile warm`, or `--warm`).

    python benchmarks/e2e.py --model llama-3.2-1b --batch 1 --json benchmarks/results/e2e_cpu.json
    python benchmarks/e2e.py --model tiny-llama --batch 1 32 --warm 8

A per-kernel breakdown of one decode step follows: eager time by module (attention block, MLP,
LM head, the rest) and, for autocomp, the time inside each autocomp op and in the inductor code between.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import autocomp_compile  # noqa: F401  (registers the backend)
from autocomp_compile.models import build_llama, generate, get_config
from autocomp_compile.passes.dynamo import reports

console = Console(width=140)


def warm(model: str, batch: int, prompt_len: int, budget: int) -> None:
    """Fill the cache for the decode and prefill kernels (in a child process: nothing else runs meanwhile)."""
    cmd = [sys.executable, "-m", "autocomp_compile.cli", "warm", "--model", model, "--batch", str(batch),
           "--prefill", str(prompt_len), "--budget", str(budget), "--quiet"]
    console.print(f"[bold]warming:[/] {' '.join(cmd[2:])}")
    subprocess.run(cmd, check=True)


def variants(model, options: dict) -> dict:
    return {
        "eager": model,
        "inductor": torch.compile(model, dynamic=False),
        "autocomp": torch.compile(model, backend="autocomp", dynamic=False, options=options),
    }


def eager_breakdown(model, batch: int, pos: int, steps: int = 5) -> dict[str, float]:
    """Seconds per decode step spent in each module kind of the eager model, via forward hooks."""
    spent: dict[str, float] = defaultdict(float)
    starts: dict[int, float] = {}
    handles = []

    def hook_pair(name: str, module: torch.nn.Module) -> None:
        handles.append(module.register_forward_pre_hook(lambda m, a: starts.__setitem__(id(m), time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, a, o: spent.__setitem__(name, spent[name] + time.perf_counter() - starts[id(m)])))

    for layer in model.model.layers:
        hook_pair("attention block", layer.self_attn)
        hook_pair("mlp", layer.mlp)
    hook_pair("lm_head", model.lm_head)
    tok = torch.zeros(batch, 1, dtype=torch.long)
    total = 0.0
    with torch.no_grad():
        for _ in range(steps):
            t0 = time.perf_counter()
            model(tok, torch.tensor([pos]), last_only=True)
            total += time.perf_counter() - t0
    for h in handles:
        h.remove()
    out = {k: v / steps for k, v in spent.items()}
    out["other (norms, embedding, residuals)"] = total / steps - sum(out.values())
    return out


def autocomp_breakdown(fn, batch: int, pos: int, vocab: int, steps: int = 5) -> dict[str, float]:
    """Seconds per decode step in each autocomp op (LM head told apart by its weight shape) and outside them."""
    from torch.profiler import ProfilerActivity, profile

    tok = torch.zeros(batch, 1, dtype=torch.long)
    with torch.no_grad():
        fn(tok, torch.tensor([pos]), last_only=True)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                fn(tok, torch.tensor([pos]), last_only=True)
            total = time.perf_counter() - t0
    spent: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages(group_by_input_shape=True):
        if not ev.key.startswith("autocomp::"):
            continue
        name = ev.key.split("::", 1)[1]
        if name == "linear":
            shapes = ev.input_shapes or []
            name = "lm_head" if len(shapes) > 1 and shapes[1] and shapes[1][0] == vocab else "projections (linear)"
        elif name == "attention":
            name = "attention core"
        spent[name] += ev.cpu_time_total / 1e6 / steps
    out = dict(spent)
    out["other (inductor code)"] = total / steps - sum(out.values())
    return out


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    cfg = get_config(args.model)
    console.print(f"building {args.model} with random {args.dtype} weights ...")
    model = build_llama(args.model, args.dtype, seed=0)
    options = {"mode": "cache-only", "verbose": args.verbose}
    fns = variants(model, options)
    results: dict = {"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
                     "date": datetime.datetime.now().isoformat(timespec="seconds"), "runs": []}
    for batch in args.batch:
        prompt_len = args.prompt_len if batch == 1 else args.prompt_len_batched
        steps = args.decode_tokens if batch == 1 else args.decode_tokens_batched
        rounds = args.rounds if batch == 1 else args.rounds_batched
        prompt = torch.randint(0, cfg.vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
        samples: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in fns}
        tokens: dict[str, torch.Tensor] = {}
        console.print(f"batch {batch}: compiling (first call of each variant) ...")
        for name, fn in fns.items():
            t0 = time.perf_counter()
            generate(model, prompt, 3, forward=fn)
            console.print(f"  {name}: warm-up {time.perf_counter() - t0:.1f} s")
        for r in range(rounds):
            for name, fn in fns.items():
                g = generate(model, prompt, steps, forward=fn)
                samples[name]["prefill"].append(batch * prompt_len / g.prefill_s)
                samples[name]["decode"].extend(batch / s for s in g.decode_s)
                tokens[name] = g.tokens
            console.print(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {statistics.median(s['decode']):.2f} tok/s" for n, s in samples.items()))
        row = {"batch": batch, "prompt_len": prompt_len, "decode_steps": steps}
        for name, s in samples.items():
            row[name] = {"prefill_tok_s": statistics.median(s["prefill"]), "decode_tok_s": statistics.median(s["decode"]),
                         "decode_samples": len(s["decode"])}
        for name in ("inductor", "autocomp"):
            row[name]["tokens_match_eager"] = bool(torch.equal(tokens[name], tokens["eager"]))
        pos = prompt_len + steps // 2
        row["breakdown_eager_s"] = eager_breakdown(model, batch, pos)
        row["breakdown_autocomp_s"] = autocomp_breakdown(fns["autocomp"], batch, pos, cfg.vocab)
        results["runs"].append(row)
    last = reports()
    results["autocomp_replaced"] = [
        {"workload": d.workload, "count": d.count, "replaced": d.replaced, "speedup": d.speedup, "reason": d.reason}
        for rep in last for d in rep.decisions
    ]
    return results


def print_tables(res: dict) -> None:
    t = Table(title=f"{res['model']} {res['dtype']}, {res['threads']} threads: tokens/sec (median; batch totals)")
    for col in ("batch", "variant", "prefill tok/s", "decode tok/s", "decode vs eager", "decode vs inductor",
                "same tokens as eager"):
        t.add_column(col, justify="right")
    for run in res["runs"]:
        for name in ("eager", "inductor", "autocomp"):
            r = run[name]
            t.add_row(str(run["batch"]), name, f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.2f}",
                      f"{r['decode_tok_s'] / run['eager']['decode_tok_s']:.2f}x",
                      f"{r['decode_tok_s'] / run['inductor']['decode_tok_s']:.2f}x",
                      "" if name == "eager" else ("yes" if r["tokens_match_eager"] else "no"))
    console.print(t)
    for run in res["runs"]:
        b = Table(title=f"one decode step, batch {run['batch']}: where the time goes")
        b.add_column("variant")
        b.add_column("part")
        b.add_column("ms", justify="right")
        b.add_column("share", justify="right")
        for variant in ("eager", "autocomp"):
            parts = run[f"breakdown_{variant}_s"]
            total = sum(parts.values())
            for part, s in sorted(parts.items(), key=lambda kv: -kv[1]):
                b.add_row(variant, part, f"{s * 1e3:.2f}", f"{100 * s / total:.0f}%")
        console.print(b)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens at batch 1")
    p.add_argument("--prompt-len-batched", type=int, default=8,
                   help="prompt tokens per sequence at batch > 1 (bf16 GEMMs run at ~20 GFLOP/s on 2 AVX2 cores)")
    p.add_argument("--decode-tokens", type=int, default=32, help="generated tokens per round at batch 1")
    p.add_argument("--decode-tokens-batched", type=int, default=8, help="generated tokens per round at batch > 1")
    p.add_argument("--rounds", type=int, default=3, help="rounds at batch 1")
    p.add_argument("--rounds-batched", type=int, default=2, help="rounds at batch > 1")
    p.add_argument("--warm", type=int, default=0, metavar="BUDGET", help="warm the cache first with this budget")
    p.add_argument("--verbose", action="store_true", help="print the backend's replacement summaries")
    p.add_argument("--json", dest="json_path")
    args = p.parse_args()
    if args.warm:
        for batch in args.batch:
            warm(args.model, batch, args.prompt_len if batch == 1 else args.prompt_len_batched, args.warm)
    res = run(args)
    print_tables(res)
    for d in res["autocomp_replaced"]:
        status = f"replaced, {d['speedup']:.2f}x eager" if d["replaced"] else f"not replaced: {d['reason']}"
        console.print(f"  {d['count']:3d} x {d['workload']}: {status}")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(res, indent=2))
        console.print(f"wrote {args.json_path}")


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    main()
