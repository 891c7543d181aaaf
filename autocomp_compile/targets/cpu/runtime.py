"""Load compiled CPU kernels with ctypes and call them on torch tensors' memory."""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Sequence

import torch

from autocomp_compile.targets.cpu.isa import supported_isas

ENTRY_POINT = "autocomp_kernel"


class KernelLoadError(RuntimeError):
    pass


class CpuKernel:
    """A loaded kernel: `kernel(tensors, dims)` runs it on contiguous CPU tensors (inputs, then outputs)."""

    def __init__(self, so_path: Path | str, n_tensors: int):
        supported_isas()  # on an AMX host: asks Linux for this process's tile state, which AMX kernels need
        try:
            self._lib = ctypes.CDLL(str(so_path))
            self._fn = getattr(self._lib, ENTRY_POINT)
        except (OSError, AttributeError) as exc:
            raise KernelLoadError(f"cannot load {ENTRY_POINT} from {so_path}: {exc}") from exc
        self._fn.restype = None
        self._fn.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64)]
        self._pointer_array = ctypes.c_void_p * n_tensors
        self._n = n_tensors

    def __call__(self, tensors: Sequence[torch.Tensor], dims: Sequence[int] = ()) -> None:
        if len(tensors) != self._n:
            raise ValueError(f"kernel takes {self._n} tensors, got {len(tensors)}")
        for i, t in enumerate(tensors):
            if t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"tensor {i} must be a contiguous CPU tensor")
        # this call's own arrays: ctypes releases the GIL during the call, so threads sharing the kernel would
        # otherwise overwrite each other's pointers
        ptrs = self._pointer_array(*[t.data_ptr() for t in tensors])
        dims_arr = (ctypes.c_int64 * max(1, len(dims)))(*dims)
        self._fn(ptrs, dims_arr)
