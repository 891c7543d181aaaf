"""Host-side checks of the CUDA runtime, driven without a GPU: CudaKernel is set up on "cpu" with a recording
driver (as in test_cuda_target.py), so its per-call checks, scratch buffers and launch-line parsing run here."""
from __future__ import annotations

import ctypes
import json

import pytest
import torch

from autocomp_compile import make_workload
from autocomp_compile.targets.cuda import codegen, runtime
from autocomp_compile.targets.cuda.runtime import CudaKernelError, launch_spec
from autocomp_compile.targets.cuda.target import CudaTarget

from .test_cuda_target import CASES, _source

driver = pytest.importorskip("cuda.bindings.driver", reason="cuda-python (cuda-bindings) is not installed")


class _Recording:
    def __init__(self):
        self.calls = []

    def cuLaunchKernel(self, *args):
        self.calls.append(("plain", args))
        return ("ok",)

    def cuLaunchKernelEx(self, cfg, fn, params, extra):
        self.calls.append(("ex", (cfg, fn, params, extra)))
        return ("ok",)


def _pointers(address: int, n: int) -> list[int]:
    slots = (ctypes.c_void_p * n).from_address(address)
    return [ctypes.c_int64.from_address(s).value for s in slots]


@pytest.fixture
def fake_driver(monkeypatch):
    fake = _Recording()
    monkeypatch.setattr(runtime, "_driver", fake)
    monkeypatch.setattr(runtime, "_SUCCESS", "ok")
    return fake


def _kernel(spec, names, dims=(), stream=None, device="cpu", **setup):
    kernel = object.__new__(runtime.CudaKernel)
    kernel.spec, kernel.names, kernel.dim_names, kernel.alignment = spec, list(names), list(dims), spec.get("align", 1)
    stream = stream if callable(stream) else (lambda s=stream or driver.CUstream(0): s)
    kernel._setup([f"fn_{k['name']}" for k in spec["kernels"]], (9, 0), stream, device, **setup)
    return kernel


def _mlp():
    w = make_workload("mlp", "bf16", batch=1, hidden=128, intermediate=256)
    spec = launch_spec(codegen.generate(w, codegen.legalize(w, dict(naive=False, vec=True, fuse=True, warps=4, pdl=True))))
    return w, spec


# ---------------------------------------------------------------- bug 1: the cache key covers more than addresses


def test_a_transposed_view_at_the_same_address_is_checked(fake_driver):
    w, spec = _mlp()
    kernel = _kernel(spec, [t.name for t in w.tensors])
    tensors = [torch.zeros(t.shape, dtype=torch.bfloat16) for t in w.tensors]
    kernel(tensors)
    x, wg, wu, wd, out = tensors
    assert not wd.t().is_contiguous() and wd.t().data_ptr() == wd.data_ptr()
    with pytest.raises(ValueError, match="w_down.*contiguous"):
        kernel([x, wg, wu, wd.t(), out])
    n = len(fake_driver.calls)
    kernel(tensors)  # the good call still launches
    assert len(fake_driver.calls) == n + 2


def test_another_dtype_at_the_same_address_is_checked(fake_driver):
    w, spec = _mlp()
    shapes = [(t.shape, t.dtype) for t in w.tensors]
    kernel = _kernel(spec, [t.name for t in w.tensors], tensor_specs=shapes)
    tensors = [torch.zeros(t.shape, dtype=torch.bfloat16) for t in w.tensors]
    kernel(tensors)
    as_half = tensors[1].view(torch.float16)  # same address, same shape, another dtype
    with pytest.raises(ValueError, match=r"w_gate.*bfloat16.*float16"):
        kernel([tensors[0], as_half, *tensors[2:]])


# ---------------------------------------------------------------- bug 2: shapes, dtypes, dims, devices


def test_tensor_specs_reject_a_wrong_shape_or_dtype_naming_the_tensor(fake_driver):
    w, spec = _mlp()
    kernel = _kernel(spec, [t.name for t in w.tensors], tensor_specs=[(t.shape, t.dtype) for t in w.tensors])
    good = [torch.zeros(t.shape, dtype=torch.bfloat16) for t in w.tensors]
    kernel(good)
    wrong_shape = torch.zeros(w.tensors[4].shape[0], w.tensors[4].shape[1] * 2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"'out'.*shape \[1, 128\].*\[1, 256\]"):
        kernel([*good[:4], wrong_shape])
    with pytest.raises(ValueError, match=r"'x'.*dtype torch.bfloat16, got torch.float32"):
        kernel([good[0].float(), *good[1:]])
    with pytest.raises(ValueError, match="takes 5 tensors"):
        kernel(good[:4])


_DIM_SPEC = {"kernels": [{"name": "k", "grid": [1, 1, 1], "block": [32, 1, 1], "args": ["kv", "#kv_len"]}]}


@pytest.mark.parametrize("bad", [0, -5, 3000, 2.5, True, "7"])
def test_runtime_dims_must_be_integers_in_range(fake_driver, bad):
    kernel = _kernel(json.loads(json.dumps(_DIM_SPEC)), ["kv"], ["kv_len"], dim_bounds=[2048])
    kv = torch.zeros(8)
    kernel([kv], [16])
    with pytest.raises(ValueError, match="kv_len"):
        kernel([kv], [bad])
    kernel([kv], [2048])
    assert _pointers(fake_driver.calls[-1][1][9], 2)[1] == 2048


@pytest.mark.parametrize("bad", [0, -5])
def test_runtime_dims_must_be_positive_without_a_bound(fake_driver, bad):
    kernel = _kernel(json.loads(json.dumps(_DIM_SPEC)), ["kv"], ["kv_len"])
    with pytest.raises(ValueError, match="kv_len"):
        kernel([torch.zeros(8)], [bad])
    kernel([torch.zeros(8)], [1 << 20])


class _OnDevice(torch.Tensor):
    """A CPU tensor that reports itself on another device (no GPU here to make a real one)."""

    where = torch.device("cuda", 1)

    @property
    def device(self):
        return self.where


def test_a_tensor_on_another_cuda_device_is_rejected(fake_driver):
    kernel = _kernel(json.loads(json.dumps(_DIM_SPEC)), ["kv"], ["kv_len"], device="cuda:0")
    kv = torch.Tensor._make_subclass(_OnDevice, torch.zeros(8))
    assert kv.device == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="'kv' must be on cuda:0, got cuda:1"):
        kernel([kv], [4])


def test_a_cpu_tensor_is_rejected_by_a_cuda_kernel(fake_driver):
    kernel = _kernel(json.loads(json.dumps(_DIM_SPEC)), ["kv"], ["kv_len"], device="cuda:0")
    with pytest.raises(ValueError, match="'kv' must be on cuda:0, got cpu"):
        kernel([torch.zeros(8)], [4])


def test_load_accepts_specs_and_bounds():
    import inspect

    params = inspect.signature(runtime.load).parameters
    assert params["tensor_specs"].default is None and params["dim_bounds"].default is None


# ---------------------------------------------------------------- bug 3: launch-line validation


def _line(spec) -> str:
    return runtime.LAUNCH_PREFIX + json.dumps(spec) + "\n"


def _one(**entry):
    k = {"name": "k", "grid": [1, 1, 1], "block": [32, 1, 1], "args": []}
    k.update(entry)
    return k


BAD = [
    ([1, 2], "JSON object"),
    ("text", "JSON object"),
    ({}, "kernels"),
    ({"kernels": {"name": "k"}}, "kernels"),
    ({"kernels": [7]}, "launch entry 0"),
    ({"kernels": [_one(grid=[1, 1])]}, "grid"),
    ({"kernels": [_one(grid=[0, 1, 1])]}, "grid"),
    ({"kernels": [_one(grid=[True, 1, 1])]}, "grid"),
    ({"kernels": [_one(grid=[1.5, 1, 1])]}, "grid"),
    ({"kernels": [_one(grid="sms*2")]}, "grid"),
    ({"kernels": [_one(block=[32, 1])]}, "block"),
    ({"kernels": [_one(block=[0, 1, 1])]}, "block"),
    ({"kernels": [_one(block=[True, 1, 1])]}, "block"),
    ({"kernels": [_one(block=[1024, 2, 1])]}, "block"),
    ({"kernels": [_one(smem=-1)]}, "smem"),
    ({"kernels": [_one(smem=227 * 1024 + 1)]}, "smem"),
    ({"kernels": [_one(smem=1.0)]}, "smem"),
    ({"kernels": [_one(args="x")]}, "args"),
    ({"kernels": [_one(args=["x", 3])]}, "args"),
    ({"kernels": [_one(cooperative=1)]}, "cooperative"),
    ({"kernels": [_one(pdl="yes")]}, "pdl"),
    ({"kernels": [_one()], "align": 3}, "align"),
    ({"kernels": [_one()], "align": True}, "align"),
    ({"kernels": [_one()], "scratch": [1]}, "scratch"),
    ({"kernels": [_one()], "scratch": {"h": [0, "fp32"]}}, "scratch 'h'"),
    ({"kernels": [_one()], "scratch": {"h": [(1 << 30) + 1, "fp32"]}}, "scratch 'h'"),
    ({"kernels": [_one()], "scratch": {"h": [16, "fp64"]}}, "scratch 'h'"),
    ({"kernels": [_one()], "scratch": {"h": [16]}}, "scratch 'h'"),
    ({"kernels": [_one()], "scratch": {"h": [True, "fp32"]}}, "scratch 'h'"),
    ({"kernels": [_one(args=["$h"])]}, r"\$h"),
    ({"kernels": [_one(args=["=x"])]}, "=x"),
    ({"kernels": [_one()], "order_dependent": 1}, "order_dependent"),
    ({"kernels": [_one()], "derived": [1]}, "derived"),
]


@pytest.mark.parametrize("spec, field", BAD, ids=[str(i) for i in range(len(BAD))])
def test_launch_spec_rejects_a_malformed_field_naming_it(spec, field):
    with pytest.raises(CudaKernelError, match=field):
        launch_spec(_line(spec))


def test_launch_spec_accepts_a_full_entry():
    spec = {"kernels": [_one(grid=["sms*2", 1, 1], block=[256, 4, 1], smem=227 * 1024, cooperative=True, pdl=False,
                             args=["x", "$h", "#n", "=4"])],
            "scratch": {"h": [1 << 30, "bf16"]}, "align": 16, "order_dependent": False}
    assert launch_spec(_line(spec)) == spec


@pytest.mark.parametrize("name, i", CASES)
def test_every_generated_launch_line_passes(name, i):
    _, _, src = _source(name, i)
    launch_spec(src)


# ---------------------------------------------------------------- bug 4: scratch per stream


def test_each_stream_has_its_own_zeroed_scratch(fake_driver):
    w, spec = _mlp()
    current = {"s": driver.CUstream(1)}
    kernel = _kernel(spec, [t.name for t in w.tensors], stream=lambda: current["s"])
    tensors = [torch.zeros(t.shape, dtype=torch.bfloat16) for t in w.tensors]
    kernel(tensors)
    h1 = _pointers(fake_driver.calls[-2][1][9], 4)[3]
    current["s"] = driver.CUstream(2)
    kernel(tensors)
    h2 = _pointers(fake_driver.calls[-2][1][9], 4)[3]
    assert h1 != h2 and h2 == kernel._scratch["h"].data_ptr()
    assert not kernel._scratch["h"].any()
    current["s"] = driver.CUstream(1)
    kernel(tensors)
    assert _pointers(fake_driver.calls[-2][1][9], 4)[3] == h1 == kernel._scratch["h"].data_ptr()
    # the PDL launch (cuLaunchKernelEx) gets the stream's own scratch too
    cfg, _, params, _ = fake_driver.calls[-1][1]
    assert cfg.hStream == driver.CUstream(1) and _pointers(params, 3)[0] == h1


def test_a_kernel_without_scratch_keeps_its_parameters_across_streams(fake_driver):
    current = {"s": driver.CUstream(1)}
    kernel = _kernel(json.loads(json.dumps(_DIM_SPEC)), ["kv"], ["kv_len"], stream=lambda: current["s"])
    kv = torch.zeros(8)
    kernel([kv], [4])
    cached = kernel._addresses
    current["s"] = driver.CUstream(2)
    kernel([kv], [4])
    assert kernel._addresses is cached and fake_driver.calls[-1][1][8] is current["s"]


# ---------------------------------------------------------------- bug 6: compute capability


@pytest.mark.parametrize("cc, ok", [((7, 0), False), ((6, 1), False), ((7, 5), True), ((9, 0), True)])
def test_available_requires_compute_capability_7_5(monkeypatch, cc, ok):
    from autocomp_compile.targets.cuda import target

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: cc)
    monkeypatch.setattr(target, "nvrtc_available", lambda: True)
    got, why = target.CudaTarget().available()
    assert got is ok
    if not ok:
        assert f"{cc[0]}.{cc[1]}" in why and "7.5" in why


def test_the_evaluator_loads_kernels_with_the_workloads_shapes_and_bounds(fake_driver, tmp_path):
    """The loader arguments (also what the backend's kernels are loaded with) carry every tensor's shape and
    dtype and decode's max_kv_len, and the runtime enforces them."""
    from autocomp_compile.targets.cuda.target import CudaEvaluator

    w = make_workload("attention", "bf16", batch=1, heads=4, kv_heads=2, head_dim=64, kv_len=20, max_kv_len=64)
    cand = CudaTarget().lower(w)
    _, (_, _, names, dims, specs, bounds) = CudaEvaluator(w, tmp_path, None, "sm_90").loader(cand, tmp_path / "k")
    assert bounds == [64] and specs[1] == ([1, 2, 64, 64], "bf16")
    kernel = _kernel(launch_spec(cand.code), names, dims, tensor_specs=specs, dim_bounds=bounds)
    tensors = [torch.zeros(t.shape, dtype=torch.bfloat16) for t in w.tensors]
    kernel(tensors, [64])
    with pytest.raises(ValueError, match="kv_len"):
        kernel(tensors, [65])
    with pytest.raises(ValueError, match="dtype"):
        kernel([t.float() for t in tensors], [20])
