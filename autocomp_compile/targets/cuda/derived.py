"""Weights in the layout a kernel reads best ("prepacked"), made once per weight and kept while it lives.

A launch line may name derived tensors, e.g. ``"derived": {"w_down_t": ["transpose", "w_down"]}``, and pass
them as ``@w_down_t``: the runtime then hands the kernel a contiguous ``w_down.t()``. Copies are cached by the
source's storage (a weak reference: a copy is dropped once its weight's memory is freed, and a new tensor at
the same address never hits a stale entry), its view geometry and its version counter. After an in-place update
of the weight (a new version) the copy is refreshed in place on the kernel's next call from Python, so its
address never changes while the weight lives. A CUDA graph's replay runs no Python: a graph that captured a
kernel reading a copy sees a weight update only once the copy is refreshed, by an eager call of that kernel or
by ``CACHE.refresh()``; call it after updating weights in place and before replaying.

On CUDA, copies are made on a side stream, ordered after the current one. CUDA-graph trees (torch.compile's
"reduce-overhead") route the current stream's allocations into the graph's private pool while they warm up;
a copy that outlives the graph must not live there. A copy cannot be made or refreshed while a graph is being
captured (MadeDuringCapture; the backend's ops then compute that call with PyTorch): run the model once eagerly
first (the graph trees' warm-up does).

What the version counter does not see, the cache does not see either: writes through ``weight.data``, into an
inference-mode tensor, or from outside PyTorch. Call ``CACHE.refresh(force=True)`` after such an update (copies
keep their addresses, so captured graphs stay valid; ``CACHE.clear()`` drops them, which a captured graph that
still reads them must never see).
The cost is the copy's memory for as long as the weight lives (the decode MLP's down projection: one more copy
of it per layer, 32 MB per Llama-3.2-1B layer).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef

VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {  # the derived tensor is a contiguous copy of the view
    "transpose": lambda t: t.t(),
}
SWEEP_EVERY = 256  # calls between drops of copies whose weights were freed (and on every new copy)


class MadeDuringCapture(RuntimeError):
    """A derived weight was needed while a CUDA graph was being captured, and there is no copy to use."""


def check_spec(derived: dict[str, Any], tensor_names: list[str] | None = None) -> None:
    """Raise ValueError unless every entry is [known derivation, source tensor name]."""
    for name, entry in derived.items():
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in VIEWS and isinstance(entry[1], str)):
            raise ValueError(f"derived tensor {name!r}: expected [one of {sorted(VIEWS)}, source], got {entry!r}")
        if tensor_names is not None and entry[1] not in tensor_names:
            raise ValueError(f"derived tensor {name!r} is made from {entry[1]!r}, which the workload does not have")


def derive(how: str, source: torch.Tensor) -> torch.Tensor:
    """The derived tensor, uncached (the CPU emulator of the tests uses this)."""
    return VIEWS[how](source).contiguous()


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor has no version counter: treated as never updated
        return 0


def _key(how: str, source: torch.Tensor) -> tuple:
    """A copy's cache key: the derivation, the source's storage (weakly), offset, shape, strides and dtype."""
    return (how, StorageWeakRef(source.untyped_storage()), source.storage_offset(), tuple(source.shape),
            source.stride(), source.dtype)


class DerivedCache:
    """Derived copies keyed by (derivation, source storage, offset, shape, strides, dtype)."""

    def __init__(self) -> None:
        self._entries: dict[tuple, list] = {}  # key -> [version, copy]
        # by tensor object, a fast path: (weak reference, data address, version, copy)
        self._recent: dict[tuple[str, int], tuple[weakref.ref, int, int, torch.Tensor]] = {}
        self._side_streams: dict[int, Any] = {}
        self._calls = 0
        self.made = 0  # copies made (tests and benchmarks read these)
        self.refreshed = 0  # copies refreshed after an in-place update of their weight

    def get(self, how: str, source: torch.Tensor) -> torch.Tensor:
        self._calls += 1
        if self._calls % SWEEP_EVERY == 0:
            self._drop_expired()
        recent = self._recent.get((how, id(source)))
        version = _version(source)
        if recent is not None and recent[0]() is source and recent[1] == source.data_ptr() and recent[2] == version:
            return recent[3]  # the same tensor object, not updated since: ~5x cheaper than the storage key
        key = _key(how, source)
        entry = self._entries.get(key)
        if entry is None:
            self._drop_expired()
            entry = self._entries[key] = [version, self._make(how, source, None)]
            self.made += 1
        elif entry[0] != version:
            self._make(how, source, entry[1])
            entry[0] = version
            self.refreshed += 1
        self._recent[(how, id(source))] = (weakref.ref(source), source.data_ptr(), version, entry[1])
        return entry[1]

    def _make(self, how: str, source: torch.Tensor, into: torch.Tensor | None) -> torch.Tensor:
        """A new copy (into=None) or `into` refreshed, on a side stream ordered after the current one on CUDA."""
        view = VIEWS[how](source)
        if not source.is_cuda:
            return view.contiguous() if into is None else into.copy_(view)
        if torch.cuda.is_current_stream_capturing():
            raise MadeDuringCapture("a derived weight (e.g. a transposed copy) cannot be made or refreshed while a "
                                    "CUDA graph is being captured: run the model once before capturing")
        current = torch.cuda.current_stream(source.device)
        side = self._side_streams.get(source.device.index)
        if side is None:
            side = self._side_streams[source.device.index] = torch.cuda.Stream(source.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            result = view.contiguous() if into is None else into.copy_(view)
        current.wait_stream(side)
        result.record_stream(current)  # allocated on the side stream, used on this one
        source.record_stream(side)
        return result

    def _drop_expired(self) -> None:
        for key in [k for k in self._entries if k[1].expired()]:
            del self._entries[key]
        for key in [k for k, v in self._recent.items() if v[0]() is None]:
            del self._recent[key]

    def refresh(self, force: bool = False) -> int:
        """Bring every live copy whose weight was updated in place (every live copy, with `force`) up to date now,
        in place; returns how many were refreshed. For CUDA graphs, whose replays run no Python."""
        count = 0
        for (how, _), (ref, _, version, copy) in list(self._recent.items()):
            source = ref()
            if source is None or not (force or _version(source) != version):
                continue
            self._make(how, source, copy)
            entry = self._entries.get(_key(how, source))
            if entry is not None:
                entry[0] = _version(source)
            self._recent[(how, id(source))] = (ref, source.data_ptr(), _version(source), copy)
            count += 1
        self.refreshed += count
        return count

    def clear(self) -> None:
        """Forget every copy: the next call makes new ones (after a weight update the version counter missed)."""
        self._entries.clear()
        self._recent.clear()

    def __len__(self) -> int:
        self._drop_expired()
        return len(self._entries)


CACHE = DerivedCache()  # one per process: every kernel reading the same weight shares its copy
