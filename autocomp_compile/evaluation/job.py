"""The job a worker runs for one candidate: fresh-input correctness checks, then interleaved timing.

Runs inside `IsolatedWorker`; `state` persists between jobs in that process.
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from autocomp_compile.evaluation.checks import compare, time_interleaved, time_interleaved_cuda
from autocomp_compile.references import (
    GuardedOutputs, InputFactory, as_bits, empty_outputs, fill_stale, get_kind,
)
from autocomp_compile.workload import Workload


# The clock the timing loops read; a candidate that swaps it is rejected (see check_and_time).
_PERF_COUNTER, _PERF_COUNTER_NS = time.perf_counter, time.perf_counter_ns


@dataclass(frozen=True)
class EvalSettings:
    correctness_sets: int = 3  # fresh random input sets per candidate
    timing_budget_ms: float = 1000.0  # wall time for the interleaved timing loop
    timeout_s: float = 180.0  # per candidate, correctness and timing together
    seed: int = 0
    time_baseline: bool = True
    device: str = "cpu"  # where kernels run; inputs are drawn on the CPU and copied there
    # A workload moving at least roofline_min_mb (too much for any cache) that a candidate finishes faster
    # than roofline_factor x the measured memory read bandwidth allows is not trusted (CPU DRAM, GPU HBM).
    roofline_min_mb: float = 64.0
    roofline_factor: float = 2.5  # generous: the bandwidth probe moves 29-41 GB/s within an hour here
    # Only bit-reproducible kernels pass: none that declares float atomics (a launch line's "order_dependent"),
    # and each candidate runs `repeat_runs` more times on its last input set, matching its own output exactly.
    deterministic: bool = False
    repeat_runs: int = 2


def _timer(device: str) -> Callable[..., dict]:
    return time_interleaved_cuda if device.startswith("cuda") else time_interleaved


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _load(loader: str, args: tuple) -> Callable[[list[torch.Tensor], list[int]], None]:
    module, name = loader.split(":")
    return getattr(importlib.import_module(module), name)(*args)


def _openmp_level() -> int:
    """omp_get_level() of the calling thread in the process's libgomp (torch's, which the kernels share), or 0
    when there is none."""
    try:
        return int(ctypes.CDLL("libgomp.so.1").omp_get_level())
    except (OSError, AttributeError):
        return 0


def check_and_time(
    state: dict[str, Any], w: Workload, loader: str, loader_args: tuple, settings: EvalSettings
) -> dict[str, Any]:
    """Returns a dict of EvalResult fields."""
    threads = torch.get_num_threads()
    result = _check_and_time(state, w, loader, loader_args, settings)
    if _openmp_level() != 0:
        # a parallel region left open (GOMP_parallel_start without its end): torch would run on one thread from
        # here on while reporting two; the evaluator replaces this worker
        return dict(correct=False, stage="harness_modified",
                    message="the candidate left an OpenMP parallel region open after it returned")
    if torch.get_num_threads() != threads:
        # torch and the kernels share one libgomp: a candidate's omp_set_num_threads would time every later
        # candidate (and the baseline) on fewer threads
        now = torch.get_num_threads()
        torch.set_num_threads(threads)
        return dict(correct=False, stage="harness_modified",
                    message=f"the candidate changed the process's OpenMP thread count ({threads} -> {now})")
    return result


def _check_and_time(
    state: dict[str, Any], w: Workload, loader: str, loader_args: tuple, settings: EvalSettings
) -> dict[str, Any]:
    try:
        kernel = _load(loader, loader_args)
    except Exception as exc:  # noqa: BLE001 - any load failure fails this candidate only
        return dict(correct=False, stage="load", message=str(exc))
    if settings.deterministic and getattr(kernel, "order_dependent", False):
        return dict(correct=False, stage="nondeterministic",
                    message="the kernel adds floats with atomics (its launch line says order_dependent): its "
                            "results depend on the order blocks finish in, and deterministic kernels were asked for")
    spec = get_kind(w.kind)
    factory: InputFactory = state.setdefault("inputs", InputFactory(settings.seed))
    factory.gen.manual_seed(settings.seed)
    worst = 0.0
    inputs: dict[str, torch.Tensor] = {}
    last_dims: list[int] = []
    snapshot: dict[str, torch.Tensor] = {}
    dev = settings.device
    stale = torch.Generator().manual_seed(settings.seed + 31337)
    for s, set_dims in enumerate(correctness_dims(w, settings.correctness_sets, settings.seed)):
        host_inputs = factory.inputs(w, variant=s)
        snapshot = factory.snapshot(host_inputs)
        ref = spec.reference(host_inputs, w.params, dict(zip(w.runtime_dims, set_dims)))
        inputs = host_inputs if dev == "cpu" else {k: v.to(dev) for k, v in host_inputs.items()}
        outs = GuardedOutputs(w, device=dev)  # NaN-poisoned: an output the kernel never writes fails the check
        if s == 1:
            fill_stale(outs, stale)  # finite values, as a model's reused buffer: the kernel must write them anyway
        try:
            kernel([inputs[t.name] for t in w.inputs] + [outs[t.name] for t in w.outputs], set_dims)
            _sync(dev)
        except Exception as exc:  # noqa: BLE001 - e.g. a CUDA launch or illegal-address error
            return dict(correct=False, stage="runtime", message=f"{type(exc).__name__}: {exc}")
        at = dims_note(w, set_dims)
        overrun = outs.overrun()
        if overrun:
            return dict(correct=False, stage="out_of_bounds", message=f"input set {s}{at}: {overrun}")
        modified = modified_input(inputs, snapshot)
        if modified:
            return dict(correct=False, stage="inputs_modified", message=modified)
        for name, out in outs.items():
            m = compare(name, out.cpu(), ref[name])
            worst = max(worst, m.max_abs_error)
            if not m.ok:
                return dict(correct=False, stage="correctness", message=f"input set {s}{at}: {m.message}",
                            max_abs_error=m.max_abs_error)
        last_dims = set_dims
    if settings.deterministic:
        try:
            differs = _repeat_differs(kernel, w, inputs, {k: v.cpu() for k, v in outs.items()}, last_dims,
                                      settings.repeat_runs, dev)
        except Exception as exc:  # noqa: BLE001 - as in the checked runs above
            return dict(correct=False, stage="runtime", message=f"{type(exc).__name__}: {exc}")
        if differs:
            return dict(correct=False, stage="nondeterministic", message=differs)
    dims = [w.runtime_dims[k] for k in w.runtime_dims]  # timing runs at the tuned values
    outs = GuardedOutputs(w, device=dev)
    args = [inputs[t.name] for t in w.inputs] + [outs[t.name] for t in w.outputs]
    refresh = ActivationRefresher(w, inputs, settings.seed)
    cold = ColdInputs(w, inputs, exclude=refresh.names, reuse=state.setdefault("cold_inputs", {})) \
        if dev == "cpu" else None
    fns: dict[str, Callable[[], None]] = {"candidate": lambda: kernel(args, dims)}
    # Before every call, outside the timed region: fresh activations, the next cold copy, and outputs poisoned as
    # for the checked calls (a kernel that computed only when it found NaN in its output passed at ~30x).
    prepare = {"candidate": _calls(refresh, cold.bind(args) if cold else None, outs.fill_nan)}
    if settings.time_baseline:
        base_outs = empty_outputs(w, device=dev)
        base_inputs = dict(inputs)
        fns["baseline"] = lambda: spec.eager(base_inputs, base_outs, w.params, w.runtime_dims)
        prepare["baseline"] = _calls(refresh, cold.bind(base_inputs) if cold else None,
                                     *(functools.partial(t.fill_, float("nan")) for t in base_outs.values()))
    out_name = w.outputs[0].name

    def check_call(where: str) -> dict[str, Any] | None:
        """The last call's output against the reference of the inputs it should have read (the values written
        before it, the weights' originals), its guard margins, its inputs; None when all is right."""
        expected = {**snapshot, **refresh.written()}
        overrun = outs.overrun()
        if overrun:
            return dict(correct=False, stage="out_of_bounds", message=f"{where}: {overrun}")
        modified = modified_input({t.name: args[i] for i, t in enumerate(w.inputs)}, expected)
        if modified:
            return dict(correct=False, stage="inputs_modified", message=f"{where}: {modified}")
        got = compare("out(timed)", outs[out_name].cpu(), spec.reference(expected, w.params, w.runtime_dims)[out_name])
        if not got.ok:
            return dict(correct=False, stage="correctness", message=f"{where}: {got.message}")
        return None

    spot_failures: list[dict[str, Any]] = []

    def spot_check() -> None:
        """A timed call picked at random, checked outside the timed region: a kernel counting its calls cannot
        know which (it passed at ~27x doing only the checked calls' work before)."""
        if not spot_failures:
            failure = check_call("a timed call")
            if failure:
                spot_failures.append(failure)

    timing = _timer(dev)(fns, budget_ms=settings.timing_budget_ms, prepare=prepare, checks={"candidate": spot_check})
    if spot_failures:
        return spot_failures[0]
    if cold:  # checked below on one of the copies the timed calls read, picked at random: like any timed call
        cold.use(args, cold.random_copy(settings.seed))
    if time.perf_counter is not _PERF_COUNTER or time.perf_counter_ns is not _PERF_COUNTER_NS:
        return dict(correct=False, stage="harness_modified", message="the candidate replaced the harness's timer")
    cand = timing["candidate"]
    beyond = _beyond_roofline(state, w, cand.median_ms, settings)
    if beyond:
        return dict(correct=False, stage="beyond_roofline", message=beyond, latency_ms=cand.median_ms)
    # The timed calls' own output must be right for the inputs of the last call: with activations that
    # change before every call, a kernel that caches results (by pointer or by value) is caught here, and
    # with the output holding stale finite values, so is one that skips the work when it finds no NaN there.
    overrun = outs.overrun()
    if overrun:
        return dict(correct=False, stage="out_of_bounds", message=f"during timing: {overrun}")
    refresh()
    fill_stale(outs, stale)
    kernel(args, dims)
    _sync(dev)
    failure = check_call("after timing")
    if failure:
        return failure
    return dict(
        correct=True,
        stage="ok",
        max_abs_error=worst,
        latency_ms=cand.median_ms,
        latency_p99_ms=cand.p99_ms,
        runs=cand.runs,
        baseline_ms=timing["baseline"].median_ms if "baseline" in timing else None,
        extra={"repeatable": True} if settings.deterministic else {},
    )


def correctness_dims(w: Workload, sets: int, seed: int) -> list[list[int]]:
    """The runtime dims of each correctness set: set 0 the tuned values, then the maxima (a kernel that clamps
    to its tuned values fails there), all ones, and random values in [1, max], so that a kernel that bakes in
    its tuned values fails. A set that repeats an earlier one is left out. Empty lists when `w` has no
    runtime dims."""
    if not w.runtime_dims:
        return [[] for _ in range(sets)]
    gen = torch.Generator().manual_seed(seed + 104729)
    tuned = list(w.runtime_dims.values())
    maxima = [runtime_dim_max(w, name) for name in w.runtime_dims]
    chosen: list[list[int]] = []
    for dims in (tuned, maxima, [1] * len(tuned)):
        if dims not in chosen:
            chosen.append(dims)
    while len(chosen) < sets:
        chosen.append([int(torch.randint(1, m + 1, (1,), generator=gen)) for m in maxima])
    return chosen[:sets]


def runtime_dim_max(w: Workload, name: str) -> int:
    """The largest value runtime dim `name` may take: the workload's `max_<name>` parameter (attention decode's
    `max_kv_len`), or the tuned value when the workload declares no maximum."""
    value = w.params.get(f"max_{name}", w.runtime_dims[name])
    return value if isinstance(value, int) and value >= w.runtime_dims[name] else w.runtime_dims[name]


def dims_note(w: Workload, dims: list[int]) -> str:
    """The runtime dims of an input set for its failure message, e.g. " (kv_len=20)"; "" when there are none."""
    return " (" + ", ".join(f"{k}={v}" for k, v in zip(w.runtime_dims, dims)) + ")" if dims else ""


def modified_input(inputs: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    """Why `inputs` differ from `expected` (host tensors), or "" when every expected input is unchanged."""
    for name, before in expected.items():
        if not torch.equal(inputs[name].cpu(), before):
            return f"input {name!r} was modified by the kernel"
    return ""


def _repeat_differs(kernel: Callable[[list[torch.Tensor], list[int]], None], w: Workload,
                    inputs: dict[str, torch.Tensor], first: dict[str, torch.Tensor], dims: list[int], runs: int,
                    dev: str) -> str:
    """Why `kernel` is not bit-reproducible on `inputs` (whose outputs were `first`), or "" when `runs` more
    runs all match `first` exactly. Undeclared float atomics show up here when their order changes the output's
    bits: usually with fp32 outputs, rarely with bf16 ones (rounding to bf16 hides most fp32 differences)."""
    for r in range(runs):
        outs = empty_outputs(w, device=dev)
        kernel([inputs[t.name] for t in w.inputs] + [outs[t.name] for t in w.outputs], dims)
        _sync(dev)
        for name, out in outs.items():
            now, before = as_bits(out.cpu()), as_bits(first[name])
            if not torch.equal(now, before):
                return (f"not bit-reproducible: run {r + 2} on the same inputs changed output {name!r} "
                        f"({int((now != before).sum())} of {now.numel()} elements differ), and deterministic "
                        f"kernels were asked for")
    return ""


def _beyond_roofline(state: dict[str, Any], w: Workload, latency_ms: float, settings: EvalSettings) -> str:
    """Why a latency is physically implausible for this workload on this machine, or "" when it is not.

    The roofline is the memory read bandwidth measured in this worker: DRAM on the CPU, HBM on a GPU (timed
    with the L2 flushed, so a workload this large streams from HBM)."""
    moved = w.bytes_moved()
    gpu = settings.device.startswith("cuda")
    if (settings.device != "cpu" and not gpu) or moved < settings.roofline_min_mb * 1e6 or latency_ms <= 0:
        return ""
    key = "hbm_read_gbps" if gpu else "read_gbps"
    if key not in state:
        if not gpu:
            from autocomp_compile.targets.cpu.bandwidth import measure_read_bandwidth

            state[key] = measure_read_bandwidth()
        else:
            from autocomp_compile.targets.cuda.bandwidth import measure_hbm_read_bandwidth

            state[key] = measure_hbm_read_bandwidth(gigabytes=1.0, repeats=10)
    implied = moved / (latency_ms * 1e6)
    limit = settings.roofline_factor * state[key]
    if implied <= limit:
        return ""
    return (f"{latency_ms:.4f} ms implies {implied:.1f} GB/s for {moved / 1e6:.0f} MB, above {settings.roofline_factor}x "
            f"the measured read bandwidth ({state[key]:.1f} GB/s): not trusted")


def _calls(*fns: Callable[[], Any] | None) -> Callable[[], None]:
    """One function calling `fns` in order (None entries left out)."""
    chosen = [f for f in fns if f is not None]

    def run() -> None:
        for f in chosen:
            f()

    return run


class ColdInputs:
    """Copies of the inputs a decode step streams from memory (weights, KV caches), handed out in turn before
    every timed call (CPU), so that each call finds its copy evicted from the last-level cache.

    In a model, one decode step reads gigabytes of weights, so no layer finds its weights in cache; timed alone in
    a loop, a weight that fits the LLC (300 MB on some servers) would be served from it, and a search would tune
    for a cache the model never has. The copies together hold at least twice the LLC (at most MAX_COPIES), and
    every timed call, candidate or baseline, takes the next one. Activations stay hot, as a decode step leaves
    them."""

    MAX_COPIES = 256

    def __init__(self, w: Workload, inputs: dict[str, torch.Tensor], exclude: Sequence[str] = (),
                 llc_bytes: int | None = None, reuse: dict[str, Any] | None = None):
        """`reuse`: a dict kept across candidates of one workload (the worker's state), whose buffers are
        refilled instead of allocated again (first-touch page faults made a 600 MB set of copies cost 0.6 s)."""
        from autocomp_compile.targets.cpu.isa import last_level_cache_bytes

        self.names = [s.name for s in w.inputs if s.name not in exclude
                      and (s.role == "weight" or s.name.endswith("_cache"))]
        self.positions = {s.name: i for i, s in enumerate(w.inputs)}
        nbytes = sum(inputs[n].numel() * inputs[n].element_size() for n in self.names)
        llc = last_level_cache_bytes() if llc_bytes is None else llc_bytes
        copies = min(self.MAX_COPIES, -(-2 * llc // nbytes)) if nbytes else 1
        self.originals = {n: inputs[n] for n in self.names}
        key = (w.signature(), tuple(self.names), copies)
        buffers = reuse.get("sets") if reuse is not None and reuse.get("key") == key else None
        if buffers is None:
            buffers = [{n: torch.empty_like(t) for n, t in self.originals.items()} for _ in range(copies - 1)]
            if reuse is not None:
                reuse.clear()  # another workload's buffers go
                reuse.update(key=key, sets=buffers)
        for copy in buffers:
            for n, t in copy.items():
                t.copy_(self.originals[n])
        self.sets = [self.originals] + buffers
        self.calls = 0

    def bind(self, args: list[torch.Tensor] | dict[str, torch.Tensor]) -> Callable[[], None]:
        """A function that puts the next copy into `args`: a kernel's argument list (inputs in the workload's
        order first) or an inputs dict."""
        def swap() -> None:
            self.use(args, self.calls % len(self.sets))
            self.calls += 1
        return swap

    def use(self, args: list[torch.Tensor] | dict[str, torch.Tensor], index: int = 0) -> None:
        """Put copy `index` into `args` (0: the original tensors)."""
        for name, t in self.sets[index].items():
            args[self.positions[name] if isinstance(args, list) else name] = t  # type: ignore[index]

    def random_copy(self, seed: int) -> int:
        """A copy the timed calls read, not the originals where there are copies: a kernel that does the work
        only for buffers it saw in the correctness calls (the last set's are the originals) cannot pass."""
        if len(self.sets) == 1:
            return 0
        gen = torch.Generator().manual_seed(seed)
        return 1 + int(torch.randint(len(self.sets) - 1, (1,), generator=gen))


class ActivationRefresher:
    """Writes new values into the activation inputs (not the weights) before every timed call, outside the timed
    region, so that no two timed calls see the same inputs at the same addresses: every activation of up to
    MAX_ELEMENTS (decode activations), and the smallest one where all are larger (a prefill GEMM's x; KV
    caches and prefill attention's other inputs keep their values)."""

    MAX_ELEMENTS = 1 << 16
    WINDOWS = 1024

    def __init__(self, w: Workload, inputs: dict[str, torch.Tensor], seed: int):
        gen = torch.Generator().manual_seed(seed + 7919)
        activations = [spec for spec in w.inputs if spec.role == "input"]
        chosen = [spec for spec in activations if spec.numel <= self.MAX_ELEMENTS]
        if not chosen and activations:
            chosen = [min(activations, key=lambda spec: spec.numel)]
        self.targets = []
        for spec in chosen:
            t = inputs[spec.name]
            slack = min(spec.numel * 3, 1 << 22)
            pool = torch.randn(spec.numel + slack, generator=gen).to(t.dtype).to(t.device)
            offsets = torch.randint(0, slack + 1, (self.WINDOWS,), generator=gen).tolist()
            self.targets.append((spec.name, spec.shape, t.view(-1), pool, offsets))
        self.names = [spec.name for spec in chosen]
        self.calls = 0

    def __call__(self) -> None:
        i = self.calls % self.WINDOWS
        self.calls += 1
        for _, _, flat, pool, offsets in self.targets:
            flat.copy_(pool[offsets[i] : offsets[i] + flat.numel()])

    def written(self) -> dict[str, torch.Tensor]:
        """Host copies of the values the last call wrote (what the inputs hold unless something changed them)."""
        i = (self.calls - 1) % self.WINDOWS
        return {name: pool[offsets[i] : offsets[i] + flat.numel()].view(shape).cpu().clone()
                for name, shape, flat, pool, offsets in self.targets}


def time_functions(
    state: dict[str, Any], w: Workload, kernels: dict[str, tuple[str, tuple]], budget_ms: float, with_eager: bool,
    compiled_eager: bool, device: str = "cpu", read_probe_mb: int = 0,
) -> dict[str, Any]:
    """Benchmark job: time several loaded kernels (and eager / inductor baselines) interleaved on one input set.

    `read_probe_mb` > 0 adds "read_probe", a streaming read of that many MB (CPU only): interleaved with
    the kernels, it gives the memory bandwidth available in the same time window. Raises RuntimeError when a
    kernel's output, checked after the timing, is wrong.
    """
    timing, wrong = _time_kernels(state, w, kernels, budget_ms, with_eager, compiled_eager, device, read_probe_mb)
    for name, message in wrong.items():
        raise RuntimeError(f"{name} computed a wrong result in the benchmark: {message}")
    return timing


def run_off(state: dict[str, Any], w: Workload, kernels: dict[str, tuple[str, tuple]], budget_ms: float,
            device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """The search's last job: its finalists (already checked and timed one by one) timed again, interleaved with
    each other and eager, as `time_functions` times them. Returns {"timing": {name: {median_ms, p99_ms, runs}},
    "wrong": {name: why}}, where "wrong" names the finalists whose output, checked after the timing, was wrong."""
    timing, wrong = _time_kernels(state, w, kernels, budget_ms, True, False, device, 0, seed)
    return {"timing": timing, "wrong": wrong}


def _time_kernels(
    state: dict[str, Any], w: Workload, kernels: dict[str, tuple[str, tuple]], budget_ms: float, with_eager: bool,
    compiled_eager: bool, device: str, read_probe_mb: int, seed: int = 0,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The timings of `time_functions`, and why each kernel whose output was wrong after the timing was."""
    spec = get_kind(w.kind)
    factory: InputFactory = state.setdefault("inputs", InputFactory(0))
    factory.gen.manual_seed(seed)
    host_inputs = factory.inputs(w)
    snapshot = factory.snapshot(host_inputs)
    inputs = {k: v.to(device) for k, v in host_inputs.items()}
    dims = [w.runtime_dims[k] for k in w.runtime_dims]
    fns: dict[str, Callable[[], None]] = {}
    prepare: dict[str, Callable[[], None]] = {}
    # As the search timed them: before every call of every variant, fresh activations, the next cold copy (CPU)
    # and outputs poisoned, so that no variant is timed on inputs or outputs it has seen.
    refresh = ActivationRefresher(w, inputs, seed=seed)
    cold = ColdInputs(w, inputs, exclude=refresh.names) if device == "cpu" else None
    ours: dict[str, tuple[Callable[[], None], dict[str, torch.Tensor], list[torch.Tensor]]] = {}
    for name, (loader, args) in kernels.items():
        kern = _load(loader, args)
        outs = empty_outputs(w, device=device)
        targs = [inputs[t.name] for t in w.inputs] + [outs[t.name] for t in w.outputs]
        fns[name] = lambda kern=kern, targs=targs: kern(targs, dims)
        prepare[name] = _calls(refresh, cold.bind(targs) if cold else None,
                               *(functools.partial(t.fill_, float("nan")) for t in outs.values()))
        ours[name] = (fns[name], outs, targs)
    if with_eager:
        eo = empty_outputs(w, device=device)
        eager_inputs = dict(inputs)
        fns["eager"] = lambda: spec.eager(eager_inputs, eo, w.params, w.runtime_dims)
        prepare["eager"] = _calls(refresh, cold.bind(eager_inputs) if cold else None)
    if compiled_eager:

        def eager_fn(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            o = empty_outputs(w, 0.0, device=device)
            spec.eager(t, o, w.params, w.runtime_dims)
            return o

        compiled = torch.compile(eager_fn, dynamic=False)
        for _ in range(3):  # compile before anything is timed
            compiled(inputs)
        compiled_inputs = dict(inputs)
        fns["inductor"] = lambda: compiled(compiled_inputs)
        prepare["inductor"] = _calls(refresh, cold.bind(compiled_inputs) if cold else None)
    if read_probe_mb:
        from autocomp_compile.targets.cpu.bandwidth import ReadProbe

        fns["read_probe"] = ReadProbe(read_probe_mb)
    timing = _timer(device)(fns, budget_ms=budget_ms, prepare=prepare)
    # Each kernel's output once more, on fresh activations into stale outputs: a benchmark never reports a
    # kernel that stopped computing.
    out_name = w.outputs[0].name
    wrong: dict[str, str] = {}
    for name, (fn, outs, targs) in ours.items():
        refresh()
        if cold:
            cold.use(targs, cold.random_copy(seed))
        fill_stale(outs, torch.Generator().manual_seed(seed))
        fn()
        _sync(device)
        expected = {**snapshot, **refresh.written()}
        got = compare(name, outs[out_name].cpu(), spec.reference(expected, w.params, w.runtime_dims)[out_name])
        if not got.ok:
            wrong[name] = got.message
    return {name: dict(median_ms=t.median_ms, p99_ms=t.p99_ms, runs=t.runs) for name, t in timing.items()}, wrong
