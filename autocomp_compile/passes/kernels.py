"""Loaded kernels that graph rewrites call: build a cached kernel, load it, check it, look it up by key.

Custom ops carry a kernel's cache key (a string) rather than a Python object, so that a compiled graph
that inductor cached on disk still finds its kernel in a new process: a key missing from this
process's registry is loaded from the kernel cache on first use.
"""
from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from autocomp_compile.evaluation.checks import compare
from autocomp_compile.evaluation.job import correctness_dims, dims_note
from autocomp_compile.references import InputFactory, empty_outputs, get_kind
from autocomp_compile.search.candidate import Candidate
from autocomp_compile.targets.base import Target, deterministic_variant, get_target
from autocomp_compile.workload import Workload, workload_from_dict

log = logging.getLogger(__name__)

KernelFn = Callable[[Sequence[torch.Tensor], Sequence[int]], None]


class KernelUnavailable(RuntimeError):
    """A kernel that cannot be built, loaded or trusted; the graph keeps the PyTorch computation."""


@dataclass
class BoundKernel:
    key: str
    workload: Workload
    run: KernelFn
    code_hash: str = ""  # of the cached code it was built from

    alignment: int = field(init=False)  # bytes the kernel's vector loads need of tensor addresses; 1: none
    order_dependent: bool = field(init=False)  # float atomics: not bit-reproducible, so not used in deterministic mode

    def __post_init__(self) -> None:
        self.alignment = int(getattr(self.run, "alignment", 1))
        self.order_dependent = bool(getattr(self.run, "order_dependent", False))

    def __call__(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], dims: Sequence[int] = ()) -> None:
        self.run([*inputs, *outputs], dims)


def build_loader(target: Target, workload: Workload, candidate: Candidate) -> tuple[str, tuple]:
    """Build `candidate` with the target's own build step; returns the `module:function` loader and its args."""
    evaluator = target.make_evaluator(workload)
    try:
        built = evaluator.build(candidate)
        if not built.ok or built.artifact is None:
            raise KernelUnavailable(f"build failed: {built.log.strip()[:500]}")
        return evaluator.loader(candidate, built.artifact)
    finally:
        evaluator.close()


def load_kernel(target: Target, workload: Workload, candidate: Candidate) -> KernelFn:
    """Build `candidate` and load it into this process."""
    return load_built(build_loader(target, workload, candidate))


def load_built(built: tuple[str, tuple]) -> KernelFn:
    """Load into this process the kernel that `build_loader` built (its loader and the loader's args)."""
    loader, args = built
    module, _, fn = loader.partition(":")
    try:
        return getattr(importlib.import_module(module), fn)(*args)
    except Exception as exc:  # a loader error of any kind means: do not use this kernel
        raise KernelUnavailable(f"load failed: {exc}") from exc


def check_loaded(kernel: KernelFn, workload: Workload, seed: int = 0, device: str = "cpu") -> None:
    """One fresh random input set against the reference, in this process, before the kernel enters a model;
    a kernel with runtime dims runs at its tuned values, its maxima and 1 (the model calls it at every KV
    length)."""
    spec = get_kind(workload.kind)
    factory = InputFactory(seed)
    inputs = factory.inputs(workload)
    if device != "cpu":
        inputs = {k: v.to(device) for k, v in inputs.items()}
    host = {k: v.cpu() for k, v in inputs.items()}
    for dims in correctness_dims(workload, 3 if workload.runtime_dims else 1, seed):
        outputs = empty_outputs(workload, device=device)
        try:
            kernel([*inputs.values(), *outputs.values()], dims)
        except Exception as exc:  # e.g. a CUDA launch error: the kernel is unusable here, PyTorch computes instead
            raise KernelUnavailable(f"failed in this process{dims_note(workload, dims)}: "
                                    f"{type(exc).__name__}: {exc}") from exc
        ref = spec.reference(host, workload.params, dict(zip(workload.runtime_dims, dims)))
        for name, out in outputs.items():
            mismatch = compare(name, out.cpu(), ref[name])
            if not mismatch.ok:
                raise KernelUnavailable(f"wrong result in this process{dims_note(workload, dims)}: {mismatch.message}")


class KernelRegistry:
    """Process-wide map from cache key to loaded kernel: the one added last under that key. A cache key names a
    workload on a machine, not a kernel: a search that finds a faster kernel replaces the entry under the same key,
    and two cache directories hold their own kernels under it; graphs compiled since (which add their entry's
    kernel) and before (which call the key) then run the newer one, a correct kernel of the same workload."""

    def __init__(self) -> None:
        self._kernels: dict[str, BoundKernel] = {}
        self._failed: dict[tuple[str, str], str] = {}  # (key, cache directory asked) -> why it did not load
        self._lock = threading.Lock()

    def add(self, key: str, target: Target, workload: Workload, candidate: Candidate, check: bool = True) -> BoundKernel:
        with self._lock:
            known = self._kernels.get(key)
            if known is not None and known.code_hash == candidate.code_hash:
                return known
            fn = load_kernel(target, workload, candidate)
            if check:
                check_loaded(fn, workload, device="cuda" if target.name == "cuda" else "cpu")
            bound = BoundKernel(key, workload, fn, candidate.code_hash)
            self._kernels[key] = bound
            return bound

    def get(self, key: str, cache_dir: str | Path | None = None) -> BoundKernel | None:
        """The kernel for `key`, loading it from the kernel cache (`cache_dir`, default the user's) when this
        process has not yet."""
        bound = self._kernels.get(key)
        if bound is not None or self.failure(key, cache_dir) is not None:
            return bound
        try:
            return self._load_from_cache(key, cache_dir)
        except (KernelUnavailable, LookupError) as exc:
            where = f"kernel cache {cache_dir}" if cache_dir else "the default kernel cache"
            why = self._failed[self._failure_key(key, cache_dir)] = f"{exc} ({where})"
            log.warning("autocomp: kernel %s unavailable: %s", key, why)
            return None

    def failure(self, key: str, cache_dir: str | Path | None = None) -> str | None:
        """Why `key` did not load from `cache_dir` in this process (None: it did, or was never asked). Asking
        with another cache directory tries again."""
        return self._failed.get(self._failure_key(key, cache_dir))

    @staticmethod
    def _failure_key(key: str, cache_dir: str | Path | None) -> tuple[str, str]:
        return key, str(cache_dir or "")

    def _load_from_cache(self, key: str, cache_dir: str | Path | None) -> BoundKernel:
        from autocomp_compile.evaluation.job import EvalSettings
        from autocomp_compile.kernels_cache.store import CacheError, KernelCache
        from autocomp_compile.optimize import check_imported

        try:
            with KernelCache.in_directory(cache_dir) as cache:
                entry = cache.show(key)
                if entry is None:
                    raise LookupError("not in the kernel cache")
                target, workload = get_target(entry.target), workload_from_dict(entry.workload)
                if entry.fingerprint.get("deterministic"):  # stored by the target's deterministic variant
                    target = deterministic_variant(target)
                if entry.unchecked:  # imported: evaluated in an isolated worker before it runs in this process
                    entry = check_imported(cache, target, workload, entry, EvalSettings())
                    if entry is None:
                        raise KernelUnavailable("an imported kernel that did not pass its check on this machine")
        except (CacheError, OSError) as exc:  # read-only, missing under a read-only path, locked: PyTorch runs it
            raise KernelUnavailable(f"cannot open the kernel cache: {exc}") from None
        return self.add(key, target, workload, entry.candidate())

    def keys(self) -> list[str]:
        return list(self._kernels)

    def clear(self) -> None:
        with self._lock:
            self._kernels.clear()
            self._failed.clear()


REGISTRY = KernelRegistry()

