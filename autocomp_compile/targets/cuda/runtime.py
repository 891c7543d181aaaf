"""Load a cubin with the CUDA driver API and launch its kernels on torch tensors, on torch's current stream."""
from __future__ import annotations

import ctypes
import json
import operator
import re
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from autocomp_compile.targets.cuda import derived as derived_tensors
from autocomp_compile.workload import DTYPES

LAUNCH_PREFIX = "// autocomp-launch: "
_SCRATCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "u32": torch.int32}  # u32: same bits


_SMS_GRID = re.compile(r"sms\*([1-9][0-9]*)")  # a grid size of N blocks per SM


class CudaKernelError(RuntimeError):
    pass


def resolve_grid(grid: list[Any], sms: int) -> list[int]:
    """Grid sizes of a launch entry with "sms*N" replaced by N times the GPU's SM count."""
    return [g if isinstance(g, int) else sms * int(_SMS_GRID.fullmatch(g).group(1)) for g in grid]


MAX_BLOCK_THREADS = 1024
MAX_DYNAMIC_SMEM = 227 * 1024  # the most dynamic shared memory a block may have on any supported GPU (sm_90)
MAX_SCRATCH_ELEMENTS = 1 << 30
_ALIGNMENTS = (1, 2, 4, 8, 16)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_kernel_entry(k: Any, i: int, scratch: dict[str, Any]) -> None:
    """One entry of the launch line's "kernels" list (see launch_spec); raises CudaKernelError naming the field."""
    if not isinstance(k, dict):
        raise CudaKernelError(f"launch entry {i} must be an object, not {k!r}")
    if not {"name", "grid", "block", "args"} <= set(k):
        raise CudaKernelError(f"launch entry {k} needs name, grid, block and args")
    name = k["name"]
    if not isinstance(name, str) or not name:
        raise CudaKernelError(f"launch entry {i}: name must be a non-empty string, not {name!r}")
    for field in ("grid", "block"):
        if not isinstance(k[field], list) or len(k[field]) != 3:
            raise CudaKernelError(f"{field} of {name} must be a list of 3 sizes, not {k[field]!r}")
    for g in k["grid"]:
        if not ((_is_int(g) and g > 0) or (isinstance(g, str) and _SMS_GRID.fullmatch(g))):
            raise CudaKernelError(f"grid size {g!r} of {name} is neither a positive integer nor 'sms*N'")
    for b in k["block"]:
        if not (_is_int(b) and b > 0):
            raise CudaKernelError(f"block size {b!r} of {name} is not a positive integer")
    threads = k["block"][0] * k["block"][1] * k["block"][2]
    if threads > MAX_BLOCK_THREADS:
        raise CudaKernelError(f"block of {name} has {threads} threads, over {MAX_BLOCK_THREADS}")
    smem = k.get("smem", 0)
    if not (_is_int(smem) and 0 <= smem <= MAX_DYNAMIC_SMEM):
        raise CudaKernelError(f"smem of {name} must be an integer in [0, {MAX_DYNAMIC_SMEM}], not {smem!r}")
    for flag in ("cooperative", "pdl"):
        if not isinstance(k.get(flag, False), bool):
            raise CudaKernelError(f"{flag} of {name} must be true or false, not {k[flag]!r}")
    if not isinstance(k["args"], list) or not all(isinstance(a, str) and a for a in k["args"]):
        raise CudaKernelError(f"args of {name} must be a list of non-empty strings, not {k['args']!r}")
    for a in k["args"]:
        if a.startswith("$") and a[1:] not in scratch:
            raise CudaKernelError(f"{name} takes scratch buffer {a!r}, which the launch line's scratch does not declare")
        if a.startswith("="):
            try:
                int(a[1:])
            except ValueError:
                raise CudaKernelError(f"{name} takes constant {a!r}, which is not an integer") from None


def check_launch_spec(spec: Any) -> None:
    """Raise CudaKernelError (naming the bad field) unless `spec` is a well-formed launch description."""
    if not isinstance(spec, dict):
        raise CudaKernelError(f"launch line must be a JSON object, not {type(spec).__name__}")
    scratch = spec.get("scratch", {})
    if not isinstance(scratch, dict):
        raise CudaKernelError(f"launch line's scratch must be an object of name: [n, dtype], not {scratch!r}")
    for name, entry in scratch.items():
        if not (isinstance(entry, list) and len(entry) == 2):
            raise CudaKernelError(f"scratch {name!r} must be [n, dtype], not {entry!r}")
        n, dt = entry
        if not (_is_int(n) and 0 < n <= MAX_SCRATCH_ELEMENTS):
            raise CudaKernelError(f"scratch {name!r} size must be an integer in [1, {MAX_SCRATCH_ELEMENTS}], not {n!r}")
        if not isinstance(dt, str) or dt not in _SCRATCH_DTYPES:
            raise CudaKernelError(f"scratch {name!r} dtype must be one of {sorted(_SCRATCH_DTYPES)}, not {dt!r}")
    kernels = spec.get("kernels")
    if not isinstance(kernels, list) or not kernels:
        raise CudaKernelError("launch line lists no kernels (kernels must be a non-empty list)")
    for i, k in enumerate(kernels):
        _check_kernel_entry(k, i, scratch)
    align = spec.get("align", 1)
    if not (_is_int(align) and align in _ALIGNMENTS):
        raise CudaKernelError(f"launch line's align must be one of {list(_ALIGNMENTS)}, not {align!r}")
    if not isinstance(spec.get("order_dependent", False), bool):
        raise CudaKernelError(f"launch line's order_dependent must be true or false, not {spec['order_dependent']!r}")
    derived = spec.get("derived", {})
    if not isinstance(derived, dict):
        raise CudaKernelError(f"launch line's derived must be an object, not {derived!r}")
    try:
        derived_tensors.check_spec(derived)
    except (ValueError, TypeError) as exc:
        raise CudaKernelError(f"launch line's derived: {exc}") from None
    for k in kernels:
        for a in k["args"]:
            if a.startswith("@") and a[1:] not in derived:
                raise CudaKernelError(f"{k['name']} takes derived tensor {a!r}, which the launch line does not define")


def launch_spec(source: str) -> dict[str, Any]:
    """The launch description on a source's first line (see codegen), checked (CudaKernelError if malformed)."""
    first = source.split("\n", 1)[0]
    if not first.startswith(LAUNCH_PREFIX):
        raise CudaKernelError(f"source must start with '{LAUNCH_PREFIX}{{...}}'")
    try:
        spec = json.loads(first[len(LAUNCH_PREFIX):])
    except json.JSONDecodeError as exc:
        raise CudaKernelError(f"bad launch line: {exc}") from None
    check_launch_spec(spec)
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

    threads = k["block"][0] * k["block"][1] * k["block"][2]
    per_sm = _check(driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(fn, threads, k.get("smem", 0)),
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


def _torch_dtype(dtype: Any) -> torch.dtype:
    """A tensor spec's dtype: a torch dtype or a workload dtype name ("bf16", "fp32")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r} in a tensor spec (expected one of {sorted(DTYPES)} or a torch dtype)")


class CudaKernel:
    """Callable on CUDA tensors (inputs then outputs, in workload order) and runtime dims.

    `tensor_specs` (optional): each tensor's expected (shape, dtype), in `tensor_names` order; `dim_bounds`
    (optional): each runtime dim's largest allowed value (None: no bound), in `dim_names` order. Dims must be
    integers >= 1 in any case. Checked, with contiguity, device and alignment, whenever a call's tensors (address,
    dtype, shape, contiguity) or dims differ from the previous call's."""

    def __init__(self, cubin_path: str | Path, source_spec: str, tensor_names: Sequence[str], dim_names: Sequence[str],
                 tensor_specs: Sequence[tuple[Sequence[int], Any]] | None = None,
                 dim_bounds: Sequence[int | None] | None = None):
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
        self._setup(functions, torch.cuda.get_device_capability(), _stream_getter(device), f"cuda:{device}",
                    tensor_specs, dim_bounds)

    def _setup(self, functions: list[Any], compute_capability: tuple[int, int], stream: Callable[[], Any],
               device: str, tensor_specs: Sequence[tuple[Sequence[int], Any]] | None = None,
               dim_bounds: Sequence[int | None] | None = None) -> None:
        """Everything a launch needs, computed once: launch tuples, configurations, what scratch buffers to make."""
        self._functions = functions
        dev = torch.device(device)
        self._device, self._device_index = dev.type, dev.index  # index None: any (the CPU emulator's "cpu")
        self._scratch_device = device
        if tensor_specs is not None and len(tensor_specs) != len(self.names):
            raise ValueError(f"{len(tensor_specs)} tensor specs for {len(self.names)} tensors {self.names}")
        self._tensor_specs = None if tensor_specs is None else [
            (tuple(int(d) for d in shape), _torch_dtype(dt)) for shape, dt in tensor_specs]
        if dim_bounds is not None and len(dim_bounds) != len(self.dim_names):
            raise ValueError(f"{len(dim_bounds)} dim bounds for {len(self.dim_names)} dims {self.dim_names}")
        self._dim_bounds = [None] * len(self.dim_names) if dim_bounds is None else [
            None if b is None else int(b) for b in dim_bounds]
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
        # scratch buffers, one set per stream (kernels on two streams at once must not share `$h` or a grid
        # barrier's counter): made zeroed on a stream's first call, since kernels that accumulate into scratch
        # (the one-kernel MLP) rely on it and clear it after use
        self._scratch_layout = [(name, int(n), _SCRATCH_DTYPES[dt]) for name, (n, dt) in self.spec.get("scratch", {}).items()]
        self._scratches: dict[Any, dict[str, torch.Tensor]] = {}
        self._scratch_lock = threading.Lock()

    def _scratch_for(self, stream: Any) -> dict[str, torch.Tensor]:
        """The scratch buffers of `stream`, made (zeroed, on torch's current stream: the one launched on) once."""
        scratch = self._scratches.get(stream)
        if scratch is None:
            with self._scratch_lock:
                scratch = self._scratches.get(stream)
                if scratch is None:
                    scratch = {name: torch.zeros(n, dtype=dt, device=self._scratch_device)
                               for name, n, dt in self._scratch_layout}
                    self._scratches[stream] = scratch
        return scratch

    @property
    def _scratch(self) -> dict[str, torch.Tensor]:
        """The scratch buffers of the current stream."""
        return self._scratch_for(self._stream())

    def _derived_tensors(self, tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The launch line's derived tensors (e.g. a transposed weight) for these inputs, from the process cache."""
        return {name: derived_tensors.CACHE.get(how, tensors[i]) for name, how, i in self._derived}

    def _check_call(self, tensors: Sequence[torch.Tensor], dims: Sequence[Any]) -> list[int]:
        """Raise ValueError unless the call's tensors and dims are what the kernel takes; the dims as ints."""
        if len(tensors) != len(self.names):
            raise ValueError(f"kernel takes {len(self.names)} tensors {self.names}, got {len(tensors)}")
        if len(dims) != len(self.dim_names):
            raise ValueError(f"kernel takes {len(self.dim_names)} runtime dims {self.dim_names}, got {len(dims)}")
        for i, (name, t) in enumerate(zip(self.names, tensors)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"tensor {name!r} must be a torch.Tensor, got {type(t).__name__}")
            if t.device.type != self._device or (self._device_index is not None and t.device.index != self._device_index):
                want = self._device if self._device_index is None else f"{self._device}:{self._device_index}"
                raise ValueError(f"tensor {name!r} must be on {want}, got {t.device}")
            if self._tensor_specs is not None:
                shape, dtype = self._tensor_specs[i]
                if t.dtype != dtype:
                    raise ValueError(f"tensor {name!r} must have dtype {dtype}, got {t.dtype}")
                if tuple(t.shape) != shape:
                    raise ValueError(f"tensor {name!r} must have shape {list(shape)}, got {list(t.shape)}")
        values = []
        for name, d, bound in zip(self.dim_names, dims, self._dim_bounds):
            if isinstance(d, bool):
                raise ValueError(f"runtime dim {name!r} must be an integer, got {d!r}")
            try:
                v = operator.index(d)
            except TypeError:
                raise ValueError(f"runtime dim {name!r} must be an integer, got {d!r}") from None
            if v < 1 or (bound is not None and v > bound):
                raise ValueError(f"runtime dim {name!r} must be in [1, {bound if bound is not None else 'inf'}], "
                                 f"got {v}")
            values.append(v)
        return values

    def _params(self, tensors: Sequence[torch.Tensor], dims: Sequence[int],
                derived: dict[str, torch.Tensor], scratch: dict[str, torch.Tensor] | None = None) -> list[Any]:
        """ctypes kernel-parameter arrays for every launch (kept alive with their values), after checking the call."""
        dims = self._check_call(tensors, dims)
        if scratch is None:
            scratch = self._scratch_for(self._stream()) if self._scratch_layout else {}
        by_name = {**dict(zip(self.names, tensors)), **{"@" + n: t for n, t in derived.items()}}
        dim_by_name = dict(zip(self.dim_names, dims))
        prepared = []
        for k in self.spec["kernels"]:
            values: list[Any] = []
            for a in k["args"]:
                if a.startswith("$"):
                    values.append(ctypes.c_void_p(scratch[a[1:]].data_ptr()))
                elif a.startswith("#"):
                    values.append(ctypes.c_int64(int(dim_by_name[a[1:]])))
                elif a.startswith("="):
                    values.append(ctypes.c_int64(int(a[1:])))
                else:
                    t = by_name[a]
                    if t.device.type != self._device or not t.is_contiguous():
                        raise ValueError(f"tensor {a!r} must be a contiguous {self._device} tensor "
                                         f"(got {t.device}, strides {t.stride()} for shape {list(t.shape)})")
                    if t.data_ptr() % self.alignment:
                        raise ValueError(f"tensor {a!r} must start on a {self.alignment}-byte boundary for this "
                                         f"kernel's vector loads (a view at an odd offset? pass a copy)")
                    values.append(ctypes.c_void_p(t.data_ptr()))
            array = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
            prepared.append((values, array))
        return prepared

    def __call__(self, tensors: Sequence[torch.Tensor], dims: Sequence[int] = ()) -> None:
        # Parameter arrays depend only on the tensors, dims and (for scratch) the stream: reuse them across calls.
        # This is the per-call host cost of every kernel in a model, so it avoids imports, f-strings and
        # re-reading the spec. The key holds each tensor's address, dtype, shape and contiguity (a `w.t()` view or
        # another dtype at the same address is checked anew; a non-contiguous tensor is never cached, so
        # contiguity and shape stand for the strides). No device: with unified addressing an address is on one
        # device only.
        key = (tuple([(t.data_ptr(), t.dtype, t.shape, t.is_contiguous()) for t in tensors]), tuple(dims) if dims else ())
        derived: dict[str, torch.Tensor] = {}
        if self._derived:  # looked up on every call: a weight updated in place gets its copy refreshed
            derived = self._derived_tensors(tensors)
            key += tuple([t.data_ptr() for t in derived.values()])
        stream = self._stream()
        if self._scratch_layout:  # each stream has its own scratch: the parameters point into it
            key += (stream,)
        prepared = self._prepared
        if prepared[0] != key:
            params = self._params(tensors, dims, derived, self._scratch_for(stream) if self._scratch_layout else {})
            prepared = self._prepared = (key, [ctypes.addressof(array) for _, array in params], params, derived)
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


def load(cubin_path: str, source: str, tensor_names: Sequence[str], dim_names: Sequence[str],
         tensor_specs: Sequence[tuple[Sequence[int], Any]] | None = None,
         dim_bounds: Sequence[int | None] | None = None) -> CudaKernel:
    """Loader used by the evaluation worker (`module:function` with picklable args). `tensor_specs`: each tensor's
    expected (shape, dtype name such as "bf16"), `dim_bounds`: each runtime dim's maximum (see CudaKernel)."""
    return CudaKernel(cubin_path, json.dumps(launch_spec(source)), tensor_names, dim_names, tensor_specs, dim_bounds)
