"""Weights in the layout a kernel reads best ("prepacked"), made once per weight and kept while it lives.

A launch line may name derived tensors, e.g. ``"derived": {"w_down_t": ["transpose", "w_down"]}``, and pass
them as ``@w_down_t``: the runtime then hands the kernel ``w_down.t().contiguous()``. Copies are cached by the
source's storage (a weak reference: the copy is dropped once the weight's memory is freed, and a new tensor at
the same address can never hit a stale entry), its view geometry and its version counter (an in-place update of
the weight makes a new copy). The cost is the copy's memory for as long as the weight lives, which the
README states where it matters (the decode MLP's down projection: one more copy of it per layer).
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef

DERIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "transpose": lambda t: t.t().contiguous(),
}


def check_spec(derived: dict[str, Any], tensor_names: list[str] | None = None) -> None:
    """Raise ValueError unless every entry is [known derivation, source tensor name]."""
    for name, entry in derived.items():
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in DERIVATIONS and isinstance(entry[1], str)):
            raise ValueError(f"derived tensor {name!r}: expected [one of {sorted(DERIVATIONS)}, source], got {entry!r}")
        if tensor_names is not None and entry[1] not in tensor_names:
            raise ValueError(f"derived tensor {name!r} is made from {entry[1]!r}, which the workload does not have")


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor has no version counter: its copy is made again on every call
        return None


class DerivedCache:
    """Derived copies keyed by (derivation, source storage, offset, shape, strides, dtype)."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[int | None, torch.Tensor]] = {}
        # by tensor object, a fast path: (weak reference, data address, version, copy)
        self._recent: dict[tuple[str, int], tuple[weakref.ref, int, int, torch.Tensor]] = {}
        self.made = 0  # copies computed (tests and benchmarks read it)

    def get(self, how: str, source: torch.Tensor) -> torch.Tensor:
        recent = self._recent.get((how, id(source)))
        if (recent is not None and recent[0]() is source and recent[1] == source.data_ptr()
                and recent[2] == _version(source)):
            return recent[3]  # the same tensor object, not updated since: ~5x cheaper than the storage key
        derived = self._lookup(how, source)
        version = _version(source)
        if version is not None:
            self._recent[(how, id(source))] = (weakref.ref(source), source.data_ptr(), version, derived)
        return derived

    def _lookup(self, how: str, source: torch.Tensor) -> torch.Tensor:
        key = (how, StorageWeakRef(source.untyped_storage()), source.storage_offset(), tuple(source.shape),
               source.stride(), source.dtype)
        version = _version(source)
        hit = self._entries.get(key)
        if hit is not None and version is not None and hit[0] == version:
            return hit[1]
        self._drop_expired()
        derived = DERIVATIONS[how](source)
        self.made += 1
        self._entries[key] = (version, derived)
        return derived

    def _drop_expired(self) -> None:
        for key in [k for k in self._entries if k[1].expired()]:
            del self._entries[key]
        for key in [k for k, v in self._recent.items() if v[0]() is None]:
            del self._recent[key]

    def __len__(self) -> int:
        self._drop_expired()
        return len(self._entries)


CACHE = DerivedCache()  # one per process: every kernel reading the same weight shares its copy
