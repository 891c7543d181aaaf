"""End-to-end tokens/sec: PyTorch eager vs torch.compile (inductor) vs torch.compile(backend="autocomp").

One process, one model (random weights, nothing downloaded), the variants interleaved round by
round so that machine noise hits them alike. Prefill tokens/sec counts the prompt tokens of the whole
batch; decode tokens/sec counts generated tokens of the whole batch (batch x steps / time). The
autocomp variant runs in cache-only mode: warm the cache first (`autocomp-compile warm`, or `--warm`).

    python benchmarks/e2e.py --model llama-3.2-1b --batch 1 --json benchmarks/results/e2e_cpu.json
    python benchmarks/e2e.py --model tiny-llama --batch 1 32 --warm 8
    python benchmarks/e2e.py --device cuda --batch 1 --warm 16 --cudagraphs --eager-prefill   # NVIDIA GPU
    python benchmarks/e2e.py --batch 1 --llama-cpp native q8_0 --weights ~/Llama-3.2-1B   # + llama.cpp, real weights
    python benchmarks/e2e.py --batch 1 --hf   # transformers' LlamaForCausalLM with a StaticCache, same weights

On a GPU every step is timed to the end of its device work; `--cudagraphs` adds inductor's and
autocomp's CUDA-graph variants (`mode="reduce-overhead"` and options={"cudagraphs": True}), and
`--eager-prefill` runs every variant's prompt through eager (only the decode graph is compiled).

A breakdown of one decode step follows: on the CPU, eager time by module (attention block, MLP,
LM head, the rest) and, for autocomp, the time inside each autocomp op and in the inductor code between;
on a GPU, device time per kernel (from the profiler) next to the step's wall time.
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

import autocomp_compile  # noqa: F401  (registers the backend)
from autocomp_compile.models import build_llama, config_from_hf, generate, get_config, load_pretrained
from autocomp_compile.models.generate import Generation, prefill_chunks
from autocomp_compile.passes.dynamo import reports
from autocomp_compile.workload import WorkloadError

import hf_llama  # benchmarks/ is on sys.path when this file runs as a script
import peer_llama_cpp

console = Console(width=140)


def warm(model: str, batch: int, prefill_lens: list[int], budget: int, target: str = "cpu") -> None:
    """Fill the cache for the decode (and prefill) kernels (in a child process: nothing else runs meanwhile)."""
    cmd = [sys.executable, "-m", "autocomp_compile.cli", "warm", "--model", model, "--batch", str(batch),
           "--target", target, "--budget", str(budget), "--quiet"]
    for n in prefill_lens:
        cmd += ["--prefill", str(n)]
    console.print(f"[bold]warming:[/] {' '.join(cmd[2:])}")
    subprocess.run(cmd, check=True)


def variants(model, options: dict, cudagraphs: bool = False) -> dict:
    fns = {
        "eager": model,
        "inductor": torch.compile(model, dynamic=False),
        "autocomp": torch.compile(model, backend="autocomp", dynamic=False, options=options),
    }
    if cudagraphs:
        fns["inductor+cudagraphs"] = torch.compile(model, dynamic=False, mode="reduce-overhead")
        fns["autocomp+cudagraphs"] = torch.compile(model, backend="autocomp", dynamic=False,
                                                   options={**options, "cudagraphs": True})
    return fns


Step = Callable[[Callable, torch.Tensor, torch.Tensor], torch.Tensor]


def compact_step(fn: Callable, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One forward of the compact model (or a compiled one) through `fn`: the last position's logits."""
    return fn(tokens, positions, last_only=True)


def gpu_breakdown(fn, batch: int, pos: int, device: str, step: Step = compact_step, steps: int = 5,
                  top: int = 8) -> dict[str, float]:
    """Seconds per decode step: device time of the `top` costliest kernels, of all kernels, and wall time."""
    from torch.profiler import ProfilerActivity, profile

    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos_t = torch.tensor([pos], device=device)
    with torch.no_grad():
        step(fn, tok, pos_t)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                step(fn, tok, pos_t)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
    kernels: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name[:60]] += ev.device_time_total / 1e6 / steps  # microseconds
    out = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:top])
    out["other kernels"] = sum(kernels.values()) - sum(out.values())
    out["= all GPU kernels"] = sum(kernels.values())
    out["= wall time of the step"] = wall / steps
    return out


def eager_breakdown(model, batch: int, pos: int, step: Step = compact_step, steps: int = 5) -> dict[str, float]:
    """Seconds per decode step spent in each module kind of the eager model, via forward hooks (the compact model
    and transformers' name their modules alike)."""
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
            step(model, tok, torch.tensor([pos]))
            total += time.perf_counter() - t0
    for h in handles:
        h.remove()
    out = {k: v / steps for k, v in spent.items()}
    out["other (norms, embedding, residuals)"] = total / steps - sum(out.values())
    return out


def autocomp_breakdown(fn, batch: int, pos: int, vocab: int, step: Step = compact_step,
                       steps: int = 5) -> dict[str, float]:
    """Seconds per decode step in each autocomp op (LM head told apart by its weight shape) and outside them."""
    from torch.profiler import ProfilerActivity, profile

    tok = torch.zeros(batch, 1, dtype=torch.long)
    with torch.no_grad():
        step(fn, tok, torch.tensor([pos]))
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                step(fn, tok, torch.tensor([pos]))
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


def run_variant(name: str, fns: dict, model, prompt: torch.Tensor, steps: int, prefill_fn,
                ggufs: dict[str, Path], gen: Callable[..., Generation] = generate,
                buckets: tuple[int, ...] = ()) -> Generation:
    """Greedy decoding by one variant (`gen`: `generate`, or `hf_llama.generate_hf` for transformers' model);
    llama.cpp's (in a child process) keeps the prompt's logits. The autocomp variants run the prompt padded to
    `buckets` (`generate(..., prefill_buckets=...)`), the others as it is."""
    if name not in ggufs:
        extra = {"prefill_buckets": buckets} if buckets and name.startswith("autocomp") else {}
        return gen(model, prompt, steps, forward=fns[name], prefill_forward=prefill_fn, **extra)
    # 8-bit weights without llama.cpp's AMX repacking: its AMX kernels died with SIGILL on the Xeon (see the module)
    r = peer_llama_cpp.time_llama_cpp(ggufs[name], prompt[0].tolist(), steps, threads=torch.get_num_threads(),
                                      extra_buffers=name == "llama.cpp")
    return Generation(torch.tensor([r.tokens]), r.prefill_s, r.decode_s, [torch.from_numpy(r.first_logits)[None]])


def load_model(args: argparse.Namespace):
    """The model every variant runs: `--weights` (a local Hugging Face directory, with `--model`'s shapes, so
    that `warm --model` fills the kernels it uses) or random weights."""
    if not args.weights:
        console.print(f"building {args.model} with random {args.dtype} weights ...")
        return build_llama(args.model, args.dtype, seed=0)
    console.print(f"loading {args.weights} ({args.dtype}) ...")
    return load_pretrained(args.weights, args.dtype, max_seq_len=get_config(args.model).max_seq_len)


def weights_mismatch(weights: str, model: str) -> str | None:
    """Why the checkpoint in `weights` is not a `model` (its shapes differ; checked before any warm-up), or None."""
    try:
        found = config_from_hf(json.loads((Path(weights) / "config.json").read_text()))
    except (OSError, ValueError, WorkloadError) as exc:
        return f"cannot read {Path(weights) / 'config.json'}: {exc}"
    expected = get_config(model)
    shapes = ("hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "layers")
    differ = [f"{k} {getattr(found, k)} != {getattr(expected, k)}" for k in shapes
              if getattr(found, k) != getattr(expected, k)]
    return f"not a {model}: {', '.join(differ)}" if differ else None


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = load_model(args).to(args.device)
    cfg = model.config
    gen, step, impl = generate, compact_step, "compact (autocomp_compile.models)"
    if args.hf:  # transformers' model on the same weight tensors; the compact model is only their holder now
        import transformers

        model = hf_llama.hf_llama(model)
        gen, step = hf_llama.generate_hf, hf_llama.decode_step(model)
        impl = f"transformers {transformers.__version__} LlamaForCausalLM, StaticCache of {cfg.max_seq_len}"
    # Every variant compiles the same forward, so all their graphs (prefill and decode, every batch) share one
    # dynamo cache; past its limit dynamo would run eager silently and the table would call that "inductor".
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    options = {"mode": "cache-only", "verbose": args.verbose}
    fns = variants(model, options, args.cudagraphs)
    ggufs = llama_cpp_models(model, args) if args.llama_cpp is not None else {}
    results: dict = {"model": args.model, "implementation": impl,
                     "weights": args.weights or "random (seed 0)", "dtype": args.dtype,
                     "device": describe_device(args.device),
                     "threads": torch.get_num_threads(), "eager_prefill": args.eager_prefill,
                     "autocomp_prefill_buckets": args.prefill_buckets,
                     "date": datetime.datetime.now().isoformat(timespec="seconds"), "runs": [],
                     "torch": torch.__version__}
    if ggufs:
        import importlib.metadata

        results["llama_cpp_python"] = importlib.metadata.version("llama-cpp-python")
    for batch in args.batch:
        prompt_len = args.prompt_len if batch == 1 else args.prompt_len_batched
        steps = args.decode_tokens if batch == 1 else args.decode_tokens_batched
        rounds = args.rounds if batch == 1 else args.rounds_batched
        prompt = torch.randint(0, cfg.vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
        prompt = prompt.to(args.device)
        prefill_fn = model if args.eager_prefill else None
        buckets = tuple(args.prefill_buckets) if prefill_fn is None else ()
        samples: dict[str, dict[str, list[float]]] = {}
        tokens: dict[str, torch.Tensor] = {}
        llama_cpp_logits: dict[str, torch.Tensor] = {}
        failed: dict[str, str] = {}
        console.print(f"batch {batch}: compiling (first call of each variant) ...")
        names = list(fns)
        for name in ggufs:
            if batch == 1:
                names.append(name)
            else:
                failed[name] = "not run: the llama.cpp variants decode one sequence (batch 1)"
        for name in names:
            t0 = time.perf_counter()
            try:
                run_variant(name, fns, model, prompt, 3, prefill_fn, ggufs, gen, buckets)
            except Exception as exc:  # noqa: BLE001 - one variant failing must not lose the others
                failed[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
                console.print(f"  [red]{name}: failed[/] {failed[name]}")
                continue
            samples[name] = {"prefill": [], "decode": []}
            console.print(f"  {name}: warm-up {time.perf_counter() - t0:.1f} s")
        row: dict = {"batch": batch, "prompt_len": prompt_len, "decode_steps": steps, "failed": failed}
        if buckets:
            row["autocomp_prefill_chunks"] = [dataclasses.asdict(c) for c in
                                              prefill_chunks(prompt_len, buckets, cfg.max_seq_len)]
        results["runs"].append(row)
        for r in range(rounds):
            for name in list(samples):
                try:
                    g = run_variant(name, fns, model, prompt, steps, prefill_fn, ggufs, gen, buckets)
                except Exception as exc:  # noqa: BLE001 - e.g. llama.cpp's child crashing: the others go on
                    failed[name] = f"round {r + 1}: {type(exc).__name__}: {str(exc)[:300]}"
                    console.print(f"  [red]{name}: failed[/] {failed[name]}")
                    del samples[name]
                    row.pop(name, None)
                    continue
                samples[name]["prefill"].append(batch * prompt_len / g.prefill_s)
                samples[name]["decode"].extend(batch / s for s in g.decode_s)
                tokens[name] = g.tokens
                if name in ggufs:
                    llama_cpp_logits[name] = g.logits[0]
            console.print(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {statistics.median(s['decode']):.2f} tok/s" for n, s in samples.items()))
            for name, s in samples.items():
                # with --eager-prefill every variant's prompt ran through eager: its prefill rate is eager's, not its own
                own_prefill = name == "eager" or name in ggufs or not args.eager_prefill
                row[name] = {"prefill_tok_s": statistics.median(s["prefill"]) if own_prefill else None,
                             "decode_tok_s": statistics.median(s["decode"]), "decode_samples": len(s["decode"])}
                if name != "eager" and "eager" in tokens:
                    same = tokens[name] == tokens["eager"]
                    row[name]["tokens_match_eager"] = bool(same.all())
                    row[name]["token_agreement_with_eager"] = float(same.float().mean())
            if args.json_path:  # after every round: an interrupted run keeps what it measured
                write_json(results, args.json_path)
        # Greedy tokens diverge after the first near-tie of random bf16 logits, so compare logits once: the
        # first ones the compiled graph computes (the first decode step after an eager prefill, else the prefill).
        first = 1 if args.eager_prefill else 0
        ref = gen(model, prompt, 2, forward=model, keep_logits=True).logits[first]
        for name in samples:
            if name in ggufs:  # its prompt's logits, against eager's
                got = llama_cpp_logits[name].to(ref.device)
                ref0 = generate(model, prompt, 1, forward=model, keep_logits=True).logits[0]
                row[name]["first_logits_rel_err_vs_eager"] = float((got - ref0).abs().max() / ref0.abs().max())
            elif name != "eager":
                got = run_variant(name, fns, model, prompt, 2, prefill_fn, {}, partial(gen, keep_logits=True),
                                  buckets).logits[first]
                row[name]["first_logits_rel_err_vs_eager"] = float((got - ref).abs().max() / ref.abs().max())
        pos = prompt_len + steps // 2
        if args.breakdown and args.device == "cpu":
            row["breakdown_eager_s"] = eager_breakdown(model, batch, pos, step)
            if "autocomp" in samples:
                row["breakdown_autocomp_s"] = autocomp_breakdown(fns["autocomp"], batch, pos, cfg.vocab, step)
        elif args.breakdown:
            for name in samples:
                try:
                    row[f"breakdown_{name}_s"] = gpu_breakdown(fns[name], batch, pos, args.device, step)
                except Exception as exc:  # noqa: BLE001 - the profiler is a diagnostic, not the result
                    console.print(f"  [yellow]{name}: no GPU breakdown[/] ({type(exc).__name__}: {exc})")
        if args.json_path:
            write_json(results, args.json_path)
    last = reports()
    results["autocomp_replaced"] = [
        {"workload": d.workload, "count": d.count, "replaced": d.replaced, "speedup": d.speedup, "reason": d.reason}
        for rep in last for d in rep.decisions
    ]
    return results


def llama_cpp_models(model, args: argparse.Namespace) -> dict[str, Path]:
    """The variant name and GGUF file of each `--llama-cpp` weight type: in `--gguf-dir` if there (from an earlier
    run on the same weights), else written there (or to a temporary directory, removed at exit)."""
    if args.gguf_dir:
        root = Path(args.gguf_dir)
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="e2e_gguf_")
        atexit.register(tmp.cleanup)
        root = Path(tmp.name)
    files = {}
    for weights in args.llama_cpp or ["native"]:
        # named after everything that makes the file: a file found under the name is reused
        origin = "random" if not args.weights else \
            f"{Path(args.weights).name}-{hashlib.sha256(str(Path(args.weights).resolve()).encode()).hexdigest()[:8]}"
        path = root / f"{args.model}-{origin}-{args.dtype}{'' if weights == 'native' else '-' + weights}.gguf"
        if path.is_file():
            console.print(f"llama.cpp reads {path} (written by an earlier run from the same weights)")
        else:
            console.print(f"writing the model for llama.cpp: {path} ...")
            peer_llama_cpp.write_gguf(model, path, weights)
        files["llama.cpp" if weights == "native" else f"llama.cpp {weights}"] = path
    return files


def describe_device(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def write_json(res: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(res, indent=2))


def print_tables(res: dict) -> None:
    impl = " (transformers)" if res.get("implementation", "").startswith("transformers") else ""
    t = Table(title=f"{res['model']}{impl} {res['dtype']} on {res['device']}: tokens/sec (median; batch totals)")
    for col in ("batch", "variant", "prefill tok/s", "decode tok/s", "decode vs eager", "decode vs inductor",
                "tokens equal to eager's", "logits rel. err"):
        t.add_column(col, justify="right")
    for run in res["runs"]:
        names = [n for n in run if isinstance(run[n], dict) and "decode_tok_s" in run[n]]
        for name in names:
            r = run[name]
            prefill = "(eager)" if res.get("eager_prefill") and name != "eager" else f"{r['prefill_tok_s']:.1f}"
            vs = {b: (f"{r['decode_tok_s'] / run[b]['decode_tok_s']:.2f}x" if b in run else "-")
                  for b in ("eager", "inductor")}
            t.add_row(str(run["batch"]), name, prefill, f"{r['decode_tok_s']:.2f}", vs["eager"], vs["inductor"],
                      "" if name == "eager" else f"{100 * r.get('token_agreement_with_eager', float('nan')):.0f}%",
                      f"{r['first_logits_rel_err_vs_eager']:.1e}" if "first_logits_rel_err_vs_eager" in r else "")
        for name, why in run.get("failed", {}).items():
            t.add_row(str(run["batch"]), name, "failed", why[:60], "", "", "", "")
    console.print(t)
    for run in res["runs"]:
        if not any(key.startswith("breakdown_") for key in run):
            continue
        b = Table(title=f"one decode step, batch {run['batch']}: where the time goes")
        b.add_column("variant")
        b.add_column("part")
        b.add_column("ms", justify="right")
        b.add_column("share", justify="right")
        for key, parts in run.items():
            if not key.startswith("breakdown_"):
                continue
            variant = key[len("breakdown_"):-len("_s")]
            total = parts.get("= wall time of the step") or sum(parts.values())
            for part, s in sorted(parts.items(), key=lambda kv: -kv[1]):
                b.add_row(variant, part, f"{s * 1e3:.3f}", f"{100 * s / total:.0f}%")
        console.print(b)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--weights", metavar="DIR", help="a local Hugging Face directory of that model (config.json and "
                   "*.safetensors; nothing is downloaded); default: random weights")
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
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the model runs; cuda warms and uses the CUDA target")
    p.add_argument("--cudagraphs", action="store_true",
                   help="also time inductor and autocomp under CUDA graphs (GPU only)")
    p.add_argument("--eager-prefill", action="store_true",
                   help="run every variant's prompt through eager; only decode graphs are compiled")
    p.add_argument("--prefill-buckets", type=int, nargs="+", default=[], metavar="N",
                   help="run the autocomp variants' prompts padded to these lengths (generate's prefill_buckets: "
                   "one compiled graph and one set of warmed kernels per bucket); the others run them unpadded")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false", help="skip the per-step breakdown")
    p.add_argument("--verbose", action="store_true", help="print the backend's replacement summaries")
    p.add_argument("--llama-cpp", nargs="*", choices=peer_llama_cpp.WEIGHT_TYPES, metavar="WEIGHTS",
                   help="add llama.cpp (llama-cpp-python, in a child process) on the same weights, CPU, batch 1: "
                   "'native' (the default; the model's dtype, like for like) and/or 'q8_0' (8-bit weights)")
    p.add_argument("--gguf-dir", metavar="DIR", help="with --llama-cpp: where the GGUF files are kept and reused "
                   "(default: a temporary directory); files are named after --model and --weights' folder, and one "
                   "found there is reused")
    p.add_argument("--hf", action="store_true", help="run transformers' LlamaForCausalLM (decoding over a StaticCache) "
                   "on the same weights instead of the compact model")
    p.add_argument("--json", dest="json_path")
    args = p.parse_args()
    if args.hf:
        if importlib.util.find_spec("transformers") is None:
            p.error("--hf needs transformers: pip install 'transformers>=5'")
        import transformers

        if int(transformers.__version__.split(".")[0]) < 5:
            p.error(f"--hf needs transformers >= 5 (its config and cache API), found {transformers.__version__}")
        if args.llama_cpp is not None:
            p.error("--hf and --llama-cpp: compare llama.cpp with the compact model (the same weights), not both")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU visible to torch")
    if args.cudagraphs and args.device != "cuda":
        p.error("--cudagraphs needs --device cuda")
    if args.weights:
        why = weights_mismatch(args.weights, args.model)
        if why:
            p.error(f"--weights {args.weights}: {why}")
    if args.llama_cpp is not None:
        if args.device != "cpu":
            p.error("--llama-cpp runs on the CPU only")
        missing = peer_llama_cpp.missing_packages()
        if missing:
            p.error(f"--llama-cpp needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    if args.prefill_buckets:
        if args.hf or args.eager_prefill:
            p.error("--prefill-buckets pads the compact model's compiled prefill: not with --hf or --eager-prefill")
        longest = get_config(args.model).max_seq_len
        if not all(1 <= n <= longest for n in args.prefill_buckets):
            p.error(f"--prefill-buckets must lie in [1, {longest}] (the model's max_seq_len)")
    if args.warm:
        for batch in args.batch:
            prompt_len = None if args.eager_prefill else (args.prompt_len if batch == 1 else args.prompt_len_batched)
            lens = [] if prompt_len is None else [prompt_len]
            if args.prefill_buckets and prompt_len:
                lens = sorted({c.padded for c in prefill_chunks(prompt_len, args.prefill_buckets,
                                                                  get_config(args.model).max_seq_len)})
            warm(args.model, batch, lens, args.warm, target=args.device)
    res = run(args)
    print_tables(res)
    for d in res["autocomp_replaced"]:
        status = f"replaced, {d['speedup']:.2f}x eager" if d["replaced"] else f"not replaced: {d['reason']}"
        console.print(f"  {d['count']:3d} x {d['workload']}: {status}")
    if args.json_path:
        write_json(res, args.json_path)
        console.print(f"wrote {args.json_path}")


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    main()
