"""Load a cubin with the CUDA driver API and launch its kernels on torch tensors, on torch's current stream."""
from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any, Sequence

import torch

LAUNCH_PREFIX = "// autocomp-launch: "
_SCRATCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "u32": torch.int32}  # u32: same bits


class CudaKernelError(RuntimeError):
    pass


def launch_spec(source: str) -> dict[str, Any]:
    """The launch description on a source's first line (see codegen)."""
    first = source.split("\n", 1)[0]
    if not first.startswith(LAUNCH_PREFIX):
        raise CudaKernelError(f"source must start with '{LAUNCH_PREFIX}{{...}}'")
    try:
        spec = json.loads(first[len(LAUNCH_PREFIX):])
    except json.JSONDecodeError as exc:
        raise CudaKernelError(f"bad launch line: {exc}") from None
    for k in spec.get("kernels", []):
        if not {"name", "grid", "block", "args"} <= set(k):
            raise CudaKernelError(f"launch entry {k} needs name, grid, block and args")
    if not spec.get("kernels"):
        raise CudaKernelError("launch line lists no kernels")
    return spec


def _check(result: Any, what: str) -> Any:
    from cuda.bindings import driver

    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise CudaKernelError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    return rest[0] if len(rest) == 1 else rest


def _check_coresident(fn: Any, k: dict[str, Any]) -> None:
    """A kernel with a grid barrier deadlocks unless every block is resident at once: refuse it here."""
    from cuda.bindings import driver

    per_sm = _check(driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(fn, k["block"][0], k.get("smem", 0)),
                    f"cuOccupancyMaxActiveBlocksPerMultiprocessor({k['name']})")
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    blocks = k["grid"][0] * k["grid"][1] * k["grid"][2]
    if blocks > int(per_sm) * sms:
        raise CudaKernelError(f"{k['name']}: its grid barrier needs all {blocks} blocks resident, but only "
                              f"{per_sm} per SM x {sms} SMs fit")


class CudaKernel:
    """Callable on CUDA tensors (inputs then outputs, in workload order) and runtime dims."""

    def __init__(self, cubin_path: str | Path, source_spec: str, tensor_names: Sequence[str], dim_names: Sequence[str]):
        from cuda.bindings import driver

        torch.cuda.init()
        torch.empty(1, device="cuda")  # make torch's primary context current on this thread
        _check(driver.cuInit(0), "cuInit")
        self.spec = json.loads(source_spec)
        self.names = list(tensor_names)
        self.dim_names = list(dim_names)
        self._module = _check(driver.cuModuleLoadData(Path(cubin_path).read_bytes()), "cuModuleLoadData")
        self._functions = [_check(driver.cuModuleGetFunction(self._module, k["name"].encode()), f"cuModuleGetFunction({k['name']})")
                           for k in self.spec["kernels"]]
        for fn, k in zip(self._functions, self.spec["kernels"]):
            if k.get("smem", 0) > 48 * 1024:
                _check(driver.cuFuncSetAttribute(fn, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, k["smem"]), "cuFuncSetAttribute")
        for fn, k in zip(self._functions, self.spec["kernels"]):
            if k.get("cooperative"):
                _check_coresident(fn, k)
        self._cached_key: tuple | None = None
        self._cached: list[Any] = []
        self._scratch = {
            # zeroed: kernels that accumulate into scratch (the one-kernel MLP) rely on it and clear it after use
            name: torch.zeros(int(n), dtype=_SCRATCH_DTYPES[dt], device="cuda") for name, (n, dt) in self.spec.get("scratch", {}).items()
        }

    def _params(self, tensors: Sequence[torch.Tensor], dims: Sequence[int]) -> list[Any]:
        """ctypes kernel-parameter arrays for every launch (kept alive with their values)."""
        by_name = dict(zip(self.names, tensors))
        dim_by_name = dict(zip(self.dim_names, dims))
        prepared = []
        for k in self.spec["kernels"]:
            values: list[Any] = []
            for a in k["args"]:
                if a.startswith("$"):
                    values.append(ctypes.c_void_p(self._scratch[a[1:]].data_ptr()))
                elif a.startswith("#"):
                    values.append(ctypes.c_int64(int(dim_by_name[a[1:]])))
                elif a.startswith("="):
                    values.append(ctypes.c_int64(int(a[1:])))
                else:
                    t = by_name[a]
                    if not t.is_cuda or not t.is_contiguous():
                        raise ValueError(f"tensor {a!r} must be a contiguous CUDA tensor")
                    values.append(ctypes.c_void_p(t.data_ptr()))
            array = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
            prepared.append((values, array))
        return prepared

    def __call__(self, tensors: Sequence[torch.Tensor], dims: Sequence[int] = ()) -> None:
        from cuda.bindings import driver

        # Parameter arrays depend only on the pointers and dims: reuse them across calls (launch overhead).
        key = (tuple(t.data_ptr() for t in tensors), tuple(int(d) for d in dims))
        if self._cached_key != key:
            self._cached = self._params(tensors, dims)
            self._cached_key = key
        stream = driver.CUstream(torch.cuda.current_stream().cuda_stream)
        for fn, k, (_, array) in zip(self._functions, self.spec["kernels"], self._cached):
            gx, gy, gz = k["grid"]
            bx, by, bz = k["block"]
            _check(driver.cuLaunchKernel(fn, gx, gy, gz, bx, by, bz, k.get("smem", 0), stream, ctypes.addressof(array), 0),
                   f"cuLaunchKernel({k['name']})")


def load(cubin_path: str, source: str, tensor_names: Sequence[str], dim_names: Sequence[str]) -> CudaKernel:
    """Loader used by the evaluation worker (`module:function` with picklable args)."""
    return CudaKernel(cubin_path, json.dumps(launch_spec(source)), tensor_names, dim_names)
