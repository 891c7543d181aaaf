"""Load a cubin with the CUDA driver API and launch its kernels on torch tensors, on torch's current stream."""
from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from autocomp_compile.targets.cuda import derived as derived_tensors

LAUNCH_PREFIX = "// autocomp-launch: "
_SCRATCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "u32": torch.int32}  # u32: same bits


_SMS_GRID = re.compile(r"sms\*([1-9][0-9]*)")  # a grid size of N blocks per SM


class CudaKernelError(RuntimeError):
    pass


def resolve_grid(grid: list[Any], sms: int) -> list[int]:
    """Grid sizes of a launch entry with "sms*N" replaced by N times the GPU's SM count."""
    return [g if isinstance(g, int) else sms * int(_SMS_GRID.fullmatch(g).group(1)) for g in grid]


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
        for g in k["grid"]:
            if not (isinstance(g, int) or (isinstance(g, str) and _SMS_GRID.fullmatch(g))):
                raise CudaKernelError(f"grid size {g!r} of {k['name']} is neither an integer nor 'sms*N'")
    if not spec.get("kernels"):
        raise CudaKernelError("launch line lists no kernels")
    if not isinstance(spec.get("order_dependent", False), bool):
        raise CudaKernelError(f"launch line's order_dependent must be true or false, not {spec['order_dependent']!r}")
    try:
        derived_tensors.check_spec(spec.get("derived", {}))
    except ValueError as exc:
        raise CudaKernelError(str(exc)) from None
    for k in spec["kernels"]:
        for a in k["args"]:
            if a.startswith("@") and a[1:] not in spec.get("derived", {}):
                raise CudaKernelError(f"{k['name']} takes derived tensor {a!r}, which the launch line does not define")
    return spec


_driver: Any = None  # cuda.bindings.driver, imported by the first CudaKernel (cuda-python is an optional extra)
_SUCCESS: Any = None


def _load_driver() -> Any:
    global _driver, _SUCCESS
    if _driver is None:
        from cuda.bindings import driver

        _driver, _SUCCESS = driver, driver.CUresult.CUDA_SUCCESS
    return _driver


def _stream_getter(device: int) -> Callable[[], Any]:
    """A function returning torch's current stream on `device` as a driver stream handle, cheaply: the raw
    handle (no torch.cuda.Stream object), its CUstream wrapper made once per stream."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    handles: dict[int, Any] = {}

    def current() -> Any:
        h = raw(device) if raw is not None else torch.cuda.current_stream(device).cuda_stream
        s = handles.get(h)
        if s is None:
            s = handles[h] = _driver.CUstream(h)
        return s

    return current


def _check(result: Any, what: str) -> Any:
    from cuda.bindings import driver

    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise CudaKernelError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    return rest[0] if len(rest) == 1 else rest


def _check_coresident(fn: Any, k: dict[str, Any], sms: int) -> None:
    """A kernel with a grid barrier deadlocks unless every block is resident at once: refuse it here."""
    from cuda.bindings import driver

    per_sm = _check(driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(fn, k["block"][0], k.get("smem", 0)),
                    f"cuOccupancyMaxActiveBlocksPerMultiprocessor({k['name']})")
    blocks = k["grid"][0] * k["grid"][1] * k["grid"][2]
    if blocks > int(per_sm) * sms:
        raise CudaKernelError(f"{k['name']}: its grid barrier needs all {blocks} blocks resident, but only "
                              f"{per_sm} per SM x {sms} SMs fit")


def launch_attributes(k: dict[str, Any], compute_capability: tuple[int, int]) -> list[Any]:
    """Driver launch attributes for launch entry `k`: cooperative (all blocks co-resident, which a grid barrier
    needs) and programmatic stream serialization (the kernel may start before the previous one ends; it waits
    with griddepcontrol.wait), the latter only where the GPU has it (sm_90+)."""
    from cuda.bindings import driver

    attrs = []
    if k.get("cooperative"):
        a = driver.CUlaunchAttribute()
        a.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_COOPERATIVE
        a.value.cooperative = 1
        attrs.append(a)
    if k.get("pdl") and compute_capability >= (9, 0):
        a = driver.CUlaunchAttribute()
        a.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        a.value.programmaticStreamSerializationAllowed = 1
        attrs.append(a)
    return attrs


def launch_config(k: dict[str, Any], attrs: list[Any]) -> Any:
    """A cuLaunchKernelEx configuration for launch entry `k` (the stream is set at each launch)."""
    from cuda.bindings import driver

    cfg = driver.CUlaunchConfig()
    cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = k["grid"]
    cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = k["block"]
    cfg.sharedMemBytes = k.get("smem", 0)
    cfg.attrs = attrs
    cfg.numAttrs = len(attrs)
    return cfg


class CudaKernel:
    """Callable on CUDA tensors (inputs then outputs, in workload order) and runtime dims."""

    def __init__(self, cubin_path: str | Path, source_spec: str, tensor_names: Sequence[str], dim_names: Sequence[str]):
        driver = _load_driver()
        torch.cuda.init()
        torch.empty(1, device="cuda")  # make torch's primary context current on this thread
        _check(driver.cuInit(0), "cuInit")
        self.spec = json.loads(source_spec)
        device = torch.cuda.current_device()
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        for k in self.spec["kernels"]:
            k["grid"] = resolve_grid(k["grid"], sms)
        self.alignment = int(self.spec.get("align", 1))  # callers (passes/ops.py) fall back to PyTorch below it
        # float atomics: callers fall back to PyTorch under torch.use_deterministic_algorithms(True)
        self.order_dependent = bool(self.spec.get("order_dependent", False))
        self.names = list(tensor_names)
        self.dim_names = list(dim_names)
        self._module = _check(driver.cuModuleLoadData(Path(cubin_path).read_bytes()), "cuModuleLoadData")
        functions = [_check(driver.cuModuleGetFunction(self._module, k["name"].encode()), f"cuModuleGetFunction({k['name']})")
                     for k in self.spec["kernels"]]
        for fn, k in zip(functions, self.spec["kernels"]):
            # any dynamic shared memory: the default cap is 48 KB minus the kernel's static shared memory
            if k.get("smem", 0) > 0:
                _check(driver.cuFuncSetAttribute(fn, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, k["smem"]), "cuFuncSetAttribute")
            if k.get("cooperative"):
                _check_coresident(fn, k, sms)  # after the shared-memory limit, which occupancy depends on
        self._setup(functions, torch.cuda.get_device_capability(), _stream_getter(device), "cuda")

    def _setup(self, functions: list[Any], compute_capability: tuple[int, int], stream: Callable[[], Any],
               device: str) -> None:
        """Everything a launch needs, computed once: launch tuples, configurations, scratch buffers."""
        self._functions = functions
        self._device = device
        derived = self.spec.get("derived", {})
        derived_tensors.check_spec(derived, self.names)
        # (name, derivation, index of the source among the call's tensors), resolved once: read on every call
        self._derived = [(name, how, self.names.index(src)) for name, (how, src) in derived.items()]
        self._stream = stream
        self._launches = [(fn, *k["grid"], *k["block"], k.get("smem", 0), k["name"])
                          for fn, k in zip(functions, self.spec["kernels"])]
        # launches with attributes go through cuLaunchKernelEx with a configuration per stream (it holds the
        # stream); the others through cuLaunchKernel
        self._attributes = [launch_attributes(k, compute_capability) for k in self.spec["kernels"]]
        self._plain: list[Any] = [None] * len(self._launches)
        self._configs: dict[Any, list[Any]] = {}
        self._any_config = any(self._attributes)
        # (key, parameter addresses, parameter arrays, derived tensors they point into): replaced whole, never
        # changed, so that threads calling one kernel at once each launch with their own arrays
        self._prepared: tuple[Any, list[int], list[Any], dict[str, torch.Tensor]] = (None, [], [], {})
        self._scratch = {
            # zeroed: kernels that accumulate into scratch (the one-kernel MLP) rely on it and clear it after use
            name: torch.zeros(int(n), dtype=_SCRATCH_DTYPES[dt], device=device)
            for name, (n, dt) in self.spec.get("scratch", {}).items()
        }

    def _derived_tensors(self, tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The launch line's derived tensors (e.g. a transposed weight) for these inputs, from the process cache."""
        return {name: derived_tensors.CACHE.get(how, tensors[i]) for name, how, i in self._derived}

    def _params(self, tensors: Sequence[torch.Tensor], dims: Sequence[int],
                derived: dict[str, torch.Tensor]) -> list[Any]:
        """ctypes kernel-parameter arrays for every launch (kept alive with their values)."""
        by_name = {**dict(zip(self.names, tensors)), **{"@" + n: t for n, t in derived.items()}}
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
                    if t.device.type != self._device or not t.is_contiguous():
                        raise ValueError(f"tensor {a!r} must be a contiguous CUDA tensor")
                    if t.data_ptr() % self.alignment:
                        raise ValueError(f"tensor {a!r} must start on a {self.alignment}-byte boundary for this "
                                         f"kernel's vector loads (a view at an odd offset? pass a copy)")
                    values.append(ctypes.c_void_p(t.data_ptr()))
            array = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
            prepared.append((values, array))
        return prepared

    def __call__(self, tensors: Sequence[torch.Tensor], dims: Sequence[int] = ()) -> None:
        # Parameter arrays depend only on the pointers and dims: reuse them across calls. This is the
        # per-call host cost of every kernel in a model, so it avoids imports, f-strings and re-reading the spec.
        key = (tuple([t.data_ptr() for t in tensors]), tuple(map(int, dims)) if dims else ())
        derived: dict[str, torch.Tensor] = {}
        if self._derived:  # looked up on every call: a weight updated in place gets its copy refreshed
            derived = self._derived_tensors(tensors)
            key += tuple([t.data_ptr() for t in derived.values()])
        prepared = self._prepared
        if prepared[0] != key:
            params = self._params(tensors, dims, derived)
            prepared = self._prepared = (key, [ctypes.addressof(array) for _, array in params], params, derived)
        stream = self._stream()
        configs = self._plain
        if self._any_config:
            configs = self._configs.get(stream) or self._configs_for(stream)
        drv = _driver
        for (fn, gx, gy, gz, bx, by, bz, smem, name), cfg, params in zip(self._launches, configs, prepared[1]):
            if cfg is None:
                result = drv.cuLaunchKernel(fn, gx, gy, gz, bx, by, bz, smem, stream, params, 0)
            else:
                result = drv.cuLaunchKernelEx(cfg, fn, params, 0)
            if result[0] != _SUCCESS:
                _check(result, f"launch of {name}")

    @property
    def _addresses(self) -> list[int]:
        """The kernel-parameter addresses of the last call's pointers (reused while they stay the same)."""
        return self._prepared[1]

    def _configs_for(self, stream: Any) -> list[Any]:
        """cuLaunchKernelEx configurations (None for plain launches) on `stream`, made once per stream."""
        configs = []
        for k, attrs in zip(self.spec["kernels"], self._attributes):
            cfg = launch_config(k, attrs) if attrs else None
            if cfg is not None:
                cfg.hStream = stream
            configs.append(cfg)
        self._configs[stream] = configs
        return configs


def load(cubin_path: str, source: str, tensor_names: Sequence[str], dim_names: Sequence[str]) -> CudaKernel:
    """Loader used by the evaluation worker (`module:function` with picklable args)."""
    return CudaKernel(cubin_path, json.dumps(launch_spec(source)), tensor_names, dim_names)
