"""The `autocomp-compile` command: optimize one workload, run the demo, list targets."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any, Iterable, NoReturn, Sequence

from autocomp_compile.evaluation.job import EvalSettings
from autocomp_compile.executors import ExecutorError
from autocomp_compile.kernels_cache.store import CacheError
from autocomp_compile.references import KINDS
from autocomp_compile.models.llama import CONFIGS as MODELS
from autocomp_compile.passes import ALL_KINDS, DEFAULT_KINDS
from autocomp_compile.paths import cache_dir
from autocomp_compile.search.artifacts import RunConflict
from autocomp_compile.search.beam import SearchConfig, summarize
from autocomp_compile.targets.base import TargetError, get_target, target_names
from autocomp_compile.workload import DTYPES, Workload, WorkloadError, make_workload, torch_dtype



# CLI option -> workload parameter; which kinds accept it is decided by the kind itself.
SHAPE_OPTIONS = {
    "batch": int, "hidden": int, "intermediate": int, "vocab": int, "heads": int, "kv_heads": int,
    "head_dim": int, "kv_len": int, "max_kv_len": int, "seq_len": int, "rows": int, "m": int, "n": int, "k": int,
    "eps": float, "phase": str,
}
FLOAT_OPTIONS = ("dropout", "timing_ms", "timeout")  # --eps is checked by the workload


class UsageError(Exception):
    pass


def _add_search_options(p: argparse.ArgumentParser, budget: int) -> None:
    d = SearchConfig()
    p.add_argument("--target", default="cpu", help=f"one of {target_names()} (default: cpu)")
    p.add_argument("--dtype", default="bf16", help=f"one of {sorted(DTYPES)} (default: bf16)")
    p.add_argument("--budget", type=int, default=budget, help=f"candidates to evaluate per workload (default: {budget})")
    p.add_argument("--beam-size", type=int, default=d.beam_size)
    p.add_argument("--iterations", type=int, default=d.iterations)
    p.add_argument("--plans", type=int, default=d.plans_per_parent, help="plans per parent per iteration")
    p.add_argument("--impls", type=int, default=d.impls_per_plan, help="implementations per plan")
    p.add_argument("--dropout", type=float, default=d.dropout, help="menu dropout probability (default: 0.7)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--patience", type=int, default=d.patience, help="stop after this many iterations without gain")
    p.add_argument("--min-depth", type=int, default=d.min_depth,
                   help=f"iterations the budget is spread over at least (default: {d.min_depth})")
    p.add_argument("--finalists", type=int, default=d.finalists,
                   help=f"the fastest correct kernels timed again against each other before one wins (default: "
                        f"{d.finalists}; 1: no run-off)")
    p.add_argument("--sets", type=int, default=EvalSettings().correctness_sets, help="fresh random input sets per candidate")
    p.add_argument("--timing-ms", type=float, default=EvalSettings().timing_budget_ms, help="timing budget per candidate")
    p.add_argument("--timeout", type=float, default=EvalSettings().timeout_s, help="seconds per candidate before it fails")
    p.add_argument("--output-dir", default="output", help="run directories go here (default: ./output)")
    p.add_argument("--json", dest="json_path", help="write the results to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the kernel cache")
    p.add_argument("--deterministic", action="store_true",
                   help="only bit-reproducible kernels: no declared float atomics, and each candidate (CPU, CUDA) run twice "
                        "more on the same inputs must give the same bits; CUDA caches them apart from the others. What "
                        "torch.compile uses under torch.use_deterministic_algorithms(True)")
    p.add_argument("--reuse", type=int, default=3, help="cached schedules of similar workloads to replay (>= 0; 0: none)")
    p.add_argument("--models", type=_model_names, default=None, help="LLM models, comma-separated provider::model (e.g. openai::gpt-4.1,"
                   "anthropic::claude-sonnet-4-5); default: the offline menu-driven proposer")
    p.add_argument("--api-base", default=None, help="OpenAI-compatible server for the models (vLLM, Ollama, ...)")
    p.add_argument("--prompts", default=None, help="folder of prompt markdown to use instead of the built-in one")
    p.add_argument("--skip-planning", action="store_true", help="LLM: plan and code in one call")
    p.add_argument("--repair", action="store_true", help="LLM: one more call per failed candidate, with its error")
    p.add_argument("--wandb", action="store_true",
                   help="log each search's best latency per round to Weights & Biases (offline without WANDB_API_KEY)")
    p.add_argument("--wandb-project", default="autocomp-compile")
    p.add_argument("--edits", action="store_true", help="LLM: implement plans as OLD/NEW edits of the parent (long kernels)")
    p.add_argument("--extra-menu", action="store_true",
                   help="LLM: one call per parent for extra menu items of the model's own")
    p.add_argument("--no-translate", action="store_true",
                   help="LLM: start from the target's naive kernel only, without asking for a translation first")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, like the command's own (the usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autocomp-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    opt = sub.add_parser("optimize", help="search for a fast, correct kernel for one workload")
    opt.add_argument("--workload", required=True, help=f"one of {sorted(KINDS)}")
    for name, typ in SHAPE_OPTIONS.items():
        opt.add_argument(_flag(name), dest=name, type=typ, default=None)
    opt.add_argument("--run-name", help="run directory name under --output-dir (default: hash of the settings)")
    _add_search_options(opt, budget=64)

    demo = sub.add_parser("demo", help="optimize the Llama-3.2-1B decode kernels and print a table")
    demo.add_argument("--batch", type=int, default=1)
    demo.add_argument("--kv-len", type=int, default=1024)
    _add_search_options(demo, budget=32)

    warm = sub.add_parser("warm", help="fill the kernel cache for a model's kernels (idempotent, resumable)")
    warm.add_argument("--model", default="llama-3.2-1b", choices=sorted(MODELS))
    warm.add_argument("--batch", type=int, default=1)
    warm.add_argument("--max-seq-len", type=int, default=None,
                      help="KV-cache length the model is compiled with (default: the model's, 2048 for Llama-3.2-1B)")
    warm.add_argument("--prefill", type=int, action="append", default=[], metavar="N",
                      help="also the kernels of prefilling N tokens (repeatable)")
    warm.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                      help=f"kernel kinds to warm, comma-separated (default: {','.join(DEFAULT_KINDS)}; also rmsnorm)")
    warm.add_argument("--workers", type=int, default=None,
                      help="parallel compiler processes, at least 1 (default: all cores)")
    warm.add_argument("--executor", choices=["local", "ray"], default="local",
                      help="local: search here, one workload after another; ray: one Ray task per workload")
    warm.add_argument("--ray-address", default=None,
                      help="Ray cluster to join (e.g. ray://head:10001 or auto; default: start a local one)")
    _add_search_options(warm, budget=64)

    cache = sub.add_parser("cache", help="inspect and move the kernel cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    cache_sub.add_parser("ls", help="one line per cached kernel").add_argument("--target")
    cache_sub.add_parser("show", help="one entry, with its code").add_argument("key")
    exp = cache_sub.add_parser("export", help="write the cache (or one target's part) to a file")
    exp.add_argument("file")
    exp.add_argument("--target")
    cache_sub.add_parser("import", help="verify and add the entries of an exported file").add_argument("file")
    cache_sub.add_parser(
        "rm", help="delete the entries with these keys (or unique starts of keys), so that the next warm or "
        "compile searches their workloads again").add_argument("keys", nargs="+", metavar="key")
    clear = cache_sub.add_parser("clear", help="delete entries (asks first, or --yes)")
    clear.add_argument("--target")
    clear.add_argument("--yes", action="store_true", help="delete without asking (needed where stdin is no terminal)")

    sub.add_parser("targets", help="list targets and whether each can run here")
    return parser


def _settings(args: argparse.Namespace) -> tuple[SearchConfig, EvalSettings]:
    for name in FLOAT_OPTIONS:
        if not math.isfinite(getattr(args, name)):
            raise UsageError(f"{_flag(name)} must be a finite number, got {getattr(args, name)}")
    try:
        config = SearchConfig(
            budget=args.budget, beam_size=args.beam_size, iterations=args.iterations, plans_per_parent=args.plans,
            impls_per_plan=args.impls, dropout=args.dropout, seed=args.seed, patience=args.patience,
            min_depth=args.min_depth, finalists=args.finalists,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.sets < 1 or args.timing_ms <= 0 or args.timeout <= 0:
        raise UsageError("--sets must be >= 1 and --timing-ms, --timeout positive")
    return config, EvalSettings(args.sets, args.timing_ms, args.timeout, args.seed,
                                deterministic=args.deterministic)


def _make_dir(path: str | Path, what: str) -> None:
    """Create folder `path` now, so that a path that cannot be a folder fails before any work."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot create this folder ({exc.strerror or exc})") from None


def _check_writable(path: str | Path, what: str) -> None:
    """Fail now, not after a long search, when file `path` cannot be written; the file is left as it was."""
    p = Path(path)
    existed = p.exists()
    try:
        with open(p, "a"):
            pass
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot write this file ({exc.strerror or exc})") from None
    if not existed:
        p.unlink()


def _check_prompts(folder: str, target: str) -> None:
    from autocomp_compile.agents.llm import PromptDocs

    if not Path(folder).is_dir():
        raise UsageError(f"--prompts {folder}: no such folder")
    try:
        PromptDocs.load(target, folder)
    except OSError as exc:
        raise UsageError(f"--prompts: {exc}") from None


def _check_workloads(args: argparse.Namespace, workloads: Sequence[Workload]) -> None:
    """A one-line error for a workload the target has no kernel for (before its search starts)."""
    from autocomp_compile.optimize import check_supported

    target = get_target(args.target, deterministic=args.deterministic)
    for w in workloads:
        check_supported(target, w)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # in sys.modules without a spec (a stand-in module): importable
        return True


def _check_run_options(args: argparse.Namespace, workloads: Sequence[Workload] = ()) -> None:
    """Everything in a search command's options that can fail, checked before any work: numbers, the target
    and `workloads` on it, then folders and files (created only once the rest passed)."""
    from autocomp_compile.agents.llm import LLM_LANGUAGES
    from autocomp_compile.targets.base import require_available

    _settings(args)
    if args.reuse < 0:
        raise UsageError(f"--reuse must be >= 0, got {args.reuse}")
    target = get_target(args.target, deterministic=args.deterministic)
    require_available(target)
    _check_workloads(args, workloads)
    if getattr(args, "models", "") and target.language not in LLM_LANGUAGES:
        raise UsageError(f"--models: the LLM proposer writes {' and '.join(sorted(LLM_LANGUAGES))} kernels, not "
                         f"{target.language!r} ones; search --target {args.target} without --models (menu proposer)")
    if args.prompts:
        _check_prompts(args.prompts, args.target)
    if args.wandb and not _importable("wandb"):
        raise UsageError("--wandb needs wandb: pip install wandb")
    _make_dir(cache_dir(), "AUTOCOMP_CACHE_DIR")  # builds go there, with --no-cache too
    _make_dir(args.output_dir, "--output-dir")
    if args.json_path:
        _check_writable(args.json_path, "--json")


def _proposers(args: argparse.Namespace, config: SearchConfig) -> list[Any] | None:
    """LLM proposers when --models is given (credentials checked here, before any work); else None (offline)."""
    models = [m.strip() for m in getattr(args, "models", "").split(",") if m.strip()]
    if not models:
        return None
    from autocomp_compile.agents.llm import LLMProposer
    from autocomp_compile.agents.llm_client import LLMClient, LLMConfigError

    try:
        client = LLMClient(models, api_base=args.api_base)
    except LLMConfigError as exc:
        raise UsageError(str(exc)) from None
    return [LLMProposer(client, dropout=config.dropout, prompts_dir=args.prompts, skip_planning=args.skip_planning,
                        repair=args.repair, translate=not args.no_translate, edits=args.edits,
                        extra_menu=args.extra_menu)]


def _open_cache():
    """The kernel cache; a cache folder that cannot hold it is a usage error naming the folder."""
    from autocomp_compile.kernels_cache import KernelCache

    try:
        return KernelCache()
    except (OSError, sqlite3.Error) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise UsageError(f"kernel cache in {cache_dir()}: cannot open it ({why}); "
                         "set AUTOCOMP_CACHE_DIR to a writable folder") from None


def _cache(args: argparse.Namespace):
    return None if getattr(args, "no_cache", False) else _open_cache()


def _llm_counts(proposers: list[Any]) -> dict[str, Any]:
    """Model calls answered and failed so far by the proposers' clients, and how many rejections each recorded."""
    from autocomp_compile.optimize import model_calls

    calls, failures = model_calls(proposers)
    return {"calls": calls, "failures": failures, "rejected": [len(getattr(p, "rejected", [])) for p in proposers]}


def _llm_summary(proposers: list[Any], before: dict[str, Any]) -> dict[str, Any]:
    """One search's model calls since `before` (`_llm_counts`): answered, failed, and the first failure's message."""
    now = _llm_counts(proposers)
    errors = [r["reason"] for p, n in zip(proposers, before["rejected"]) for r in getattr(p, "rejected", [])[n:]
              if r["reason"].startswith(f"{r['model']}: ")]  # a failed call, not an unusable answer
    return {"calls": now["calls"] - before["calls"], "failures": now["failures"] - before["failures"],
            "first_error": errors[0].splitlines()[0] if errors else None}


def _report_llm(label: str, llm: dict[str, Any]) -> None:
    """One line when model calls failed (`_llm_summary`): all of them, or how many, with the first error."""
    from rich.markup import escape

    from autocomp_compile.report import console

    if not llm["failures"]:
        return
    first = f"; first error: {escape(llm['first_error'])}" if llm["first_error"] else ""
    if llm["calls"]:
        line = f"[yellow]{label}: {llm['failures']} of {llm['calls'] + llm['failures']} model calls failed{first}"
    else:
        line = f"[red]{label}: all {llm['failures']} model call(s) failed, no model proposed a kernel{first}"
    console.print(line, soft_wrap=True)


def _naive_failure(result: Any) -> str | None:
    """Why the naive kernel failed, when it did: its stage, the first line of its message and the line of its stderr
    that names the cause: a compiler's first `error:` line, else the last line (the exception that ended the worker,
    e.g. an allocation that failed)."""
    r = result.root.result if result.root is not None else None
    if r is None or r.correct:
        return None
    stderr = [line.strip() for line in (r.stderr or "").splitlines() if line.strip()]
    cause = next((line for line in stderr if "error:" in line), stderr[-1] if stderr else None)
    lines = (r.message or "").strip().splitlines()[:1] + ([cause] if cause else [])
    return (f"the naive kernel failed at {r.stage}" + "".join(f": {line.strip()}" for line in lines))[:400]


def _status(rows: list[dict[str, Any]]) -> int:
    """0 when every workload has a correct kernel, except where every model call failed and the best kernel is a
    starting point (the naive kernel or a reuse seed): the search the user asked for did not happen."""
    from autocomp_compile.optimize import nothing_searched

    def searched(r: dict[str, Any]) -> bool:
        llm = r.get("llm") or {}
        return not nothing_searched(llm.get("calls", 0), llm.get("failures", 0), r.get("best_iteration"))

    return 0 if all(r["correct"] and searched(r) for r in rows) else 1


def _write_json(path: str, rows: list[dict[str, Any]], one_object: bool = False) -> None:
    """The rows as a JSON list (one object for `optimize`). A file is replaced whole (through a symlink, its
    target), so that an interrupted run leaves the rows finished so far, never a cut file; anything else (a
    pipe, /dev/stdout) is written to."""
    text = json.dumps(rows[0] if one_object and rows else rows, indent=2, default=str)
    target = Path(path).resolve()
    if target.exists() and not target.is_file():
        Path(path).write_text(text)
        return
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


def _run(workloads: list[Workload], args: argparse.Namespace, run_name: str | None = None,
         one_object: bool = False) -> list[dict[str, Any]]:
    from autocomp_compile.optimize import cache_hit, optimize
    from autocomp_compile.report import console, results_table, run_off_line, search_progress
    from autocomp_compile.targets.base import require_available
    from autocomp_compile.targets.cpu.bandwidth import measure_read_bandwidth

    target = get_target(args.target, deterministic=args.deterministic)
    require_available(target)
    config, settings = _settings(args)
    proposers = _proposers(args, config)
    cache = _cache(args)
    read_gbps = measure_read_bandwidth() if target.name == "cpu" else None
    if read_gbps:
        console.print(f"{target.describe()}: measured memory read bandwidth {read_gbps:.1f} GB/s", soft_wrap=True)
    rows = []
    short = [f"{w.kind}" + (f" ({w.params['phase']})" if "phase" in w.params else "") for w in workloads]
    for i, w in enumerate(workloads):
        label = short[i] if short.count(short[i]) == 1 else w.name  # workloads of one kind: their shapes tell apart
        if len(workloads) > 1:
            label = f"[{i + 1}/{len(workloads)}] {label}"
        cached = cache is not None and cache_hit(cache, target, w, settings) is not None
        logger = None
        if getattr(args, "wandb", False) and not cached:
            from autocomp_compile.tracking import WandbLogger

            try:
                logger = WandbLogger(args.wandb_project, w.name, {"workload": w.describe(), "budget": config.budget,
                                                                   "target": target.name, "models": args.models},
                                     directory=args.output_dir)
            except RuntimeError as exc:
                raise UsageError(str(exc)) from None
        llm_before = _llm_counts(proposers or [])
        with search_progress(label, config.budget, enabled=not args.quiet and not cached) as progress:
            from autocomp_compile.tracking import chain

            result = optimize(w, target, config, settings, args.output_dir, run_name, progress=chain(progress, logger),
                              cache=cache, reuse=args.reuse, proposers=proposers)
        if logger is not None:
            logger.finish()
        row = summarize(result, w)
        line = run_off_line(label, row["run_off"])
        if line:
            from rich.markup import escape

            console.print(escape(line), soft_wrap=True)
        if proposers:
            row["llm"] = _llm_summary(proposers, llm_before)
            _report_llm(label, row["llm"])
        row["label"] = label + (" (cached)" if result.from_cache else "")
        row["target"] = target.fingerprint()
        row["read_gbps"] = read_gbps
        if row["best_ms"]:
            row["achieved_gbps"] = row["bytes_moved"] / (row["best_ms"] * 1e6)
            # A cached latency was measured another day: comparing it with today's bandwidth means nothing.
            row["percent_of_read_bw"] = 100 * row["achieved_gbps"] / read_gbps if read_gbps and not cached else None
        rows.append(row)
        if args.json_path:
            _write_json(args.json_path, rows, one_object)
        if not result.best:
            from rich.markup import escape

            console.print(f"[red]{label}: no correct kernel found ({result.stop_reason})")
            why = _naive_failure(result)
            if why:
                console.print(f"[red]{label}: {escape(why)}", soft_wrap=True)
    from rich.console import Console

    simulated = " - SIMULATED latencies (emulator + cost model)" if target.fingerprint().get("simulated") else ""
    Console(width=max(120, Console().width)).print(results_table(rows, f"autocomp-compile on {target.name} ({args.dtype}){simulated}"))
    return rows


def _flag(name: str) -> str:
    """The command-line flag of option `name` (kv_len: --kv-len)."""
    return f"--{name.replace('_', '-')}"


def _flags(names: Iterable[str]) -> str:
    return ", ".join(_flag(n) for n in sorted(names))


def cmd_optimize(args: argparse.Namespace) -> int:
    from autocomp_compile.references import get_kind

    params = {name: getattr(args, name) for name in SHAPE_OPTIONS if getattr(args, name) is not None}
    valid = get_kind(args.workload).defaults
    foreign = set(params) - set(valid)
    if foreign:
        raise UsageError(f"{_flags(foreign)}: not a shape option of {args.workload} (its shape options: "
                         f"{_flags(valid)})")
    workload = make_workload(args.workload, args.dtype, **params)
    for name in sorted(k for k, v in params.items() if workload.params[k] != v):
        form = f"{workload.params['phase']} " if "phase" in workload.params else ""
        print(f"autocomp-compile: note: {_flag(name)} does not apply to {form}{workload.kind}; ignored",
              file=sys.stderr)
    _check_run_options(args, [workload])
    return _status(_run([workload], args, args.run_name, one_object=True))


def cmd_demo(args: argparse.Namespace) -> int:
    from autocomp_compile.references import llama_decode_workloads

    workloads = llama_decode_workloads(args.dtype, batch=args.batch, kv_len=args.kv_len)
    _check_run_options(args, workloads)
    return _status(_run(workloads, args))


def cmd_warm(args: argparse.Namespace) -> int:
    """Optimize every kernel of the model that the cache lacks; a second run finds them all cached."""
    from autocomp_compile.models.workloads import model_workloads

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds:
        raise UsageError(f"--kinds: name at least one of {list(ALL_KINDS)}")
    unknown = sorted(set(kinds) - set(ALL_KINDS))
    if unknown:
        raise UsageError(f"--kinds: unknown {unknown}; choose from {list(ALL_KINDS)}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers} (leave it out for all cores)")
    if args.no_cache:
        raise UsageError("warm stores its results in the kernel cache; drop --no-cache")
    torch_dtype(args.dtype)  # an unknown name: one line, before any work
    _check_model_shape_options(args)
    if args.executor == "ray" and (args.models or args.wandb):  # before tracing: nothing is done for either
        raise UsageError("--executor ray runs the offline proposer without a W&B log: LLM proposers (--models) and "
                         "--wandb run with --executor local")
    _check_run_options(args)  # the target too: before tracing on its device
    workloads = model_workloads(args.model, args.dtype, batch=args.batch, prefill_lens=args.prefill,
                                max_seq_len=args.max_seq_len, kinds=kinds,
                                device="cuda" if args.target == "cuda" else "cpu")
    if not workloads:
        raise UsageError(f"no kernels of kinds {kinds} found in {args.model}: nothing to warm")
    _check_workloads(args, workloads)
    if args.workers:
        os.environ["AUTOCOMP_BUILD_WORKERS"] = str(args.workers)
    rows = _run(workloads, args) if args.executor == "local" else _run_on_ray(workloads, args)
    return _status(rows)


def _check_model_shape_options(args: argparse.Namespace) -> None:
    """warm's --batch, --max-seq-len and --prefill, named in the error (before the model is traced)."""
    from autocomp_compile.models import get_config

    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise UsageError(f"--max-seq-len must be >= 1, got {args.max_seq_len}")
    longest = args.max_seq_len or get_config(args.model).max_seq_len
    bad = [n for n in args.prefill if not 1 <= n <= longest]
    if bad:
        raise UsageError(f"--prefill must be in [1, {longest}] (the KV-cache length, --max-seq-len), got {bad}")


def _run_on_ray(workloads: list[Workload], args: argparse.Namespace) -> list[dict[str, Any]]:
    """warm --executor ray: one Ray task per workload the cache lacks; winners cached as tasks finish.

    "Cached" and the schedule-reuse donors are decided for the fingerprints of the cluster's nodes (which
    measure and are cached under their own), not the driver's: the driver may be another machine."""
    from autocomp_compile.executors import NodeTarget, RayExecutor, SearchJob
    from autocomp_compile.optimize import cache_hit, result_from_cache
    from autocomp_compile.report import console, results_table
    from autocomp_compile.search.candidate import Candidate

    config, settings = _settings(args)
    cache = _cache(args)
    executor = RayExecutor(args.ray_address)
    node_fps = executor.node_fingerprints(args.target, args.deterministic)
    node_targets = {node: NodeTarget(args.target, fp) for node, fp in node_fps.items()}
    rows: list[dict[str, Any] | None] = [None] * len(workloads)
    jobs, job_index = [], []
    for i, w in enumerate(workloads):
        # An imported entry not yet checked cannot be evaluated here for a node: it is no hit, but a reuse donor
        # (the node evaluates it as a seed).
        hit = next((h for t in node_targets.values() if (h := cache_hit(cache, t, w, settings, check=False)) is not None),
                   None)
        if hit is not None:
            rows[i] = summarize(result_from_cache(hit), w)
            rows[i]["label"] = f"{w.kind} (cached)"
            continue

        def make_job(node: str, w: Workload = w) -> SearchJob:
            donors = cache.nearest(node_targets[node], w, args.reuse) if args.reuse else []
            return SearchJob.make(w, args.target, config, settings, args.output_dir, donors)

        jobs.append(make_job)
        job_index.append(i)
    if jobs:
        console.print(f"{executor.describe()}: {len(jobs)} search(es), {len(workloads) - len(jobs)} already cached")
        for done, (j, out) in enumerate(executor.map(jobs), 1):
            i = job_index[j]
            w = workloads[i]
            if "error" in out:
                rows[i] = {"workload": w.describe(), "label": f"{w.kind} (failed)", "correct": False,
                           "error": out["error"], "bytes_moved": w.bytes_moved()}
                console.print(f"[red][{done}/{len(jobs)}] {w.name}: the search failed: {out['error']}", soft_wrap=True)
                continue
            row = out["row"]
            row["label"] = f"{w.kind} on {out['host']}"
            row["target"] = out["fingerprint"]
            if out["best"] is not None:
                cache.put(NodeTarget(args.target, out["fingerprint"]), w, Candidate.from_dict(out["best"]),
                          provenance={"executor": "ray", "host": out["host"], "run": out.get("run"),
                                      "reused": row.get("reused", [])})
            rows[i] = row
            speed = f"{row['speedup']:.2f}x eager" if row.get("speedup") else "no correct kernel"
            console.print(f"[{done}/{len(jobs)}] {w.name}: {speed} ({out['host']})")
    from rich.console import Console

    done_rows = [r for r in rows if r is not None]
    Console(width=max(120, Console().width)).print(results_table(done_rows, f"warm on Ray ({args.dtype})"))
    if args.json_path:
        _write_json(args.json_path, done_rows)
    return done_rows


def cmd_cache(args: argparse.Namespace) -> int:
    if getattr(args, "target", None) is not None and args.target not in target_names():
        raise UsageError(f"unknown target {args.target!r}; choose one of {target_names()}")  # `clear --target cuad`
    cache = _open_cache()
    if args.cache_command == "ls":
        entries = cache.entries(args.target)
        for e in entries:
            speed = f"{e.speedup:.2f}x" if e.speedup else "-"
            measured = "SIMULATED" if e.fingerprint.get("simulated") else "measured"  # an emulator's cost model
            if e.unchecked:
                measured = "unchecked"  # imported: the file's latency until its first use here evaluates it
            print(f"{e.key}  {e.target:5s} {e.kind:10s} {e.workload['dtype']:5s} {e.latency_ms:9.4f} ms {measured:9s} "
                  f"{speed:>7s}  {json.dumps(e.workload['params'], sort_keys=True)}")
        print(f"{len(entries)} kernel(s) in {cache.path}", file=sys.stderr)
    elif args.cache_command == "show":
        e = cache.show(args.key)
        if e is None:
            raise UsageError(f"no cache entry with key {args.key!r}")
        meta = {k: v for k, v in e.__dict__.items() if k != "code"}
        print(json.dumps(meta, indent=2, default=str))
        print(e.code)
    elif args.cache_command == "export":
        _check_writable(args.file, "cache export")
        print(f"exported {cache.export(args.file, args.target)} kernel(s) to {args.file}")
    elif args.cache_command == "import":
        versions = {}
        for name in target_names():
            versions[name] = get_target(name).fingerprint().get("codegen", "")
        imported, refused, seeds_only, kept = cache.import_(args.file, versions)
        for why in refused:
            print(f"refused {why}", file=sys.stderr)
        older = f" ({seeds_only} from another code-generator version: schedule-reuse seeds, never hits)" if seeds_only else ""
        same = f", {kept} not imported (the cache's kernel for the same key is as fast or faster)" if kept else ""
        checked = ("; an imported kernel is checked (run against the reference and timed) on this machine before "
                   "its first use") if imported else ""
        print(f"imported {imported} kernel(s){older}{same}, refused {len(refused)}{checked}")
        return 0 if not refused else 1
    elif args.cache_command == "clear":
        return _clear(cache, args.target, args.yes)
    elif args.cache_command == "rm":
        entries = [cache.show(key) for key in args.keys]  # every key is checked before anything is deleted
        missing = [key for key, e in zip(args.keys, entries) if e is None]
        if missing:
            raise UsageError(f"no cache entry with key {', '.join(map(repr, missing))}; nothing deleted")
        for e in {e.key: e for e in entries}.values():
            cache.remove(e.key)
            print(f"deleted {e.key}  {e.target} {e.kind} {e.workload['dtype']} {json.dumps(e.workload['params'], sort_keys=True)}")
    return 0


def _clear(cache: Any, target: str | None, yes: bool) -> int:
    """`cache clear`: search results take minutes to hours to make again, so the deletion is confirmed first."""
    n = len(cache.entries(target))
    what = f"{n} kernel(s){f' of target {target}' if target else ''} from {cache.path}"
    if n and not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"cache clear would delete {what}; add --yes (`cache export FILE` first keeps a copy)")
        if input(f"delete {what}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    print(f"deleted {cache.clear(target)} kernel(s)")
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    for name in target_names():
        target = get_target(name)
        ok, why = target.available()
        detail = target.describe() if ok and hasattr(target, "describe") else why
        print(f"{name:6s} {'available' if ok else 'unavailable'}: {detail}")
    return 0


def _model_names(value: str) -> str:
    """--models: at least one name (an empty value is a mistake, not a request for the offline proposer)."""
    if not any(m.strip() for m in value.split(",")):
        raise argparse.ArgumentTypeError(f"no model names in {value!r}; name provider::model, or leave --models out "
                                         "for the offline proposer")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "models", "") is None:  # not given: the offline proposer
        args.models = ""
    handlers = {"optimize": cmd_optimize, "demo": cmd_demo, "warm": cmd_warm, "cache": cmd_cache, "targets": cmd_targets}
    try:
        return handlers[args.command](args)
    except (UsageError, WorkloadError, TargetError, RunConflict, CacheError, ExecutorError) as exc:
        print(f"autocomp-compile: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the command cannot read or write (the early checks name most of them)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"autocomp-compile: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autocomp-compile: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
