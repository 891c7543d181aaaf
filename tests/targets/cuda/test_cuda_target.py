"""CUDA target: every schedule variant used here compiles (NVRTC, else nvcc) and is correct against the
PyTorch reference when the CPU emulator runs it; on a GPU, each is correct there too and the search improves
on the naive kernel."""
from __future__ import annotations

import random
import shutil

import pytest
import torch

from autocomp_compile import EvalSettings, SearchConfig, get_target, make_workload, optimize
from autocomp_compile.agents.schedule import ScheduleProposer
from autocomp_compile.evaluation.checks import compare
from autocomp_compile.references import InputFactory, empty_outputs, get_kind
from autocomp_compile.search.candidate import Candidate
from autocomp_compile.targets.cuda import codegen
from autocomp_compile.targets.cuda.build import build, nvrtc_available
from autocomp_compile.targets.cuda.runtime import CudaKernelError, launch_attributes, launch_config, launch_spec, load, resolve_grid

from . import emulator

HAS_COMPILER = nvrtc_available() or shutil.which("nvcc") is not None
HAS_GPU = torch.cuda.is_available() and nvrtc_available()
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="neither NVRTC (cuda-python) nor nvcc is installed")
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU emulator of CUDA kernels compiles with g++")
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU here (or no cuda-python): runtime checks need one")

WORKLOADS = {
    "gemm_fp32_odd": make_workload("gemm", "fp32", m=3, n=100, k=72),
    "gemm_bf16": make_workload("gemm", "bf16", m=2, n=96, k=256),
    "mlp_bf16": make_workload("mlp", "bf16", batch=1, hidden=128, intermediate=256),
    "mlp_fp32": make_workload("mlp", "fp32", batch=2, hidden=64, intermediate=96),
    "mlp_bf16_h512": make_workload("mlp", "bf16", batch=1, hidden=512, intermediate=128),  # lanes tile its rows
    "gemm_bf16_prefill": make_workload("gemm", "bf16", m=40, n=96, k=96),
    "mlp_bf16_prefill": make_workload("mlp", "bf16", batch=20, hidden=64, intermediate=96),
    "rmsnorm_bf16": make_workload("rmsnorm", "bf16", rows=3, hidden=40),
    "rmsnorm_bf16_vec": make_workload("rmsnorm", "bf16", rows=4, hidden=2048),
    "attn_decode_bf16": make_workload("attention", "bf16", heads=8, kv_heads=2, head_dim=64, kv_len=100, max_kv_len=128),
    "attn_decode_fp32_d48": make_workload("attention", "fp32", heads=4, kv_heads=2, head_dim=48, kv_len=37, max_kv_len=64),
    "attn_prefill_bf16": make_workload("attention", "bf16", phase="prefill", heads=4, kv_heads=2, head_dim=64, seq_len=19),
}
VARIANTS = {
    "gemv": [{}, dict(naive=False), dict(naive=False, vec=True, rows=4, unroll=4, warps=8, ksplit=2, x_smem=True, fuse=True),
             dict(naive=False, vec=True, rows=2, unroll=2, warps=4, fuse=False),
             dict(naive=False, vec=True, rows=1, unroll=2, warps=4, ksplit=4, fuse=True, stream_loads=True, l2_prefetch=True),
             dict(naive=False, vec=True, unroll=4, warps=8, fuse_down=True, chunk=32),
             dict(naive=False, vec=True, unroll=1, warps=1, fuse_down=True, chunk=128, stream_loads=True),
             dict(naive=False, vec=True, unroll=8, warps=16, fuse_down=True, chunk=16),
             dict(naive=False, vec=True, unroll=4, warps=8, persistent=True, per_sm=1, l2_prefetch=True),
             dict(naive=False, vec=True, unroll=1, warps=4, persistent=True, per_sm=4, stream_loads=True),
             dict(naive=False, vec=True, rows=2, unroll=4, warps=8, fuse=True, stream_loads=True, pdl=True,
                  down_warps=16, down_ksplit=8, down_unroll=8, down_rows=1),
             dict(naive=False, vec=True, unroll=2, warps=4, fuse=True, l2_prefetch=True, pdl=True, down_rows=2),
             dict(naive=False, down_t=True, warps=4, chunk=32),
             dict(naive=False, down_t=True, warps=16, chunk=16, stream_loads=True)],
    "attention": [{}, dict(naive=False), dict(naive=False, gqa_share=True, splits=4, warps=4, q_block=2),
                  dict(naive=False, splits=16, warps=2, q_block=4),
                  dict(naive=False, mma=True), dict(naive=False, mma=True, warps=1)],  # tensor cores: bf16 prefill
    "rmsnorm": [{}, dict(naive=False), dict(naive=False, vec=True, threads=512)],
}
MMA_VARIANTS = [dict(naive=False, mma=True),
                dict(naive=False, mma=True, tile_m=128, tile_n=128, warps=8, stages=4, ldmatrix=True),
                dict(naive=False, mma=True, tile_m=16, tile_n=32, warps=2, stages=1)]  # tensor cores: bf16 only


def _variants(name: str) -> list[dict]:
    """The schedules tested on workload `name`: prefill shapes get the naive and default GEMV kernels and the
    tensor-core ones; decode shapes every GEMV schedule (and in bf16 the tensor-core ones too)."""
    w = WORKLOADS[name]
    fam = codegen.family(w.kind)
    if fam != "gemv":
        return VARIANTS[fam]
    gemv = VARIANTS["gemv"][:2] if name.endswith("_prefill") else VARIANTS["gemv"]
    return gemv + (MMA_VARIANTS if w.dtype == "bf16" else [])


CASES = [(name, i) for name in WORKLOADS for i in range(len(_variants(name)))]


def _source(name: str, i: int) -> tuple:
    w = WORKLOADS[name]
    knobs = codegen.legalize(w, _variants(name)[i])
    return w, knobs, codegen.generate(w, knobs)


def test_launch_line_parses_and_rejects_garbage():
    w, _, src = _source("mlp_bf16", 2)
    spec = launch_spec(src)
    assert [k["name"] for k in spec["kernels"]] == ["gate_up", "down"]
    assert spec["scratch"]["h"][0] == 256
    with pytest.raises(CudaKernelError):
        launch_spec("__global__ void k() {}")
    with pytest.raises(CudaKernelError):
        launch_spec('// autocomp-launch: {"kernels": []}\n')
    with pytest.raises(CudaKernelError, match="sms"):
        launch_spec('// autocomp-launch: {"kernels": [{"name": "k", "grid": ["sms*x", 1, 1], "block": [32, 1, 1], '
                    '"args": []}]}\n')
    assert resolve_grid(["sms*3", 2, 1], sms=132) == [396, 2, 1]


def test_legalize_keeps_shapes_legal():
    w = WORKLOADS["gemm_fp32_odd"]  # k = 72: 4 fp32 per 16-byte vector divides it, ksplit 8 * 4 does not
    k = codegen.legalize(w, dict(naive=False, vec=True, ksplit=8, warps=8))
    assert k["vec"] and 72 % (k["ksplit"] * 4) == 0
    k = codegen.legalize(make_workload("gemm", "bf16", m=1, n=8, k=12), dict(naive=False, vec=True))
    assert not k["vec"]  # 12 is not a multiple of 8 bf16
    assert codegen.legalize(WORKLOADS["attn_decode_bf16"], dict(q_block=4))["q_block"] == 1


def test_menu_items_change_the_schedule():
    target = get_target("cuda")
    for w in WORKLOADS.values():
        knobs = codegen.legalize(w, dict(naive=False))
        for item in target.menu(w):
            if item.applies(knobs):
                assert target.legalize(w, item.apply(dict(knobs), random.Random(1))) != knobs or item.id in (
                    "split_k", "block_rows", "unroll_loads", "stage_x_smem", "down_split_k", "down_unroll", "mma_tile_m", "mma_tile_n",
                    "mma_stages"), item.id


@needs_compiler
@pytest.mark.parametrize("name,i", CASES)
def test_every_variant_compiles(name, i, tmp_path):
    w, knobs, src = _source(name, i)
    b = build(src, "sm_90", tmp_path)
    assert b.ok, f"{name} {knobs}:\n{b.log}"


@pytest.fixture(scope="module")
def emulator_builds(tmp_path_factory):
    return tmp_path_factory.mktemp("emulator")


@needs_gxx
@pytest.mark.parametrize("name,i", CASES)
def test_every_variant_is_correct_on_the_cpu_emulator(name, i, emulator_builds):
    """The same check as on a GPU, with the kernels run by the CPU emulator (tests/targets/cuda/emulator.py)."""
    w, knobs, src = _source(name, i)
    m = emulator.check(w, src, emulator_builds, seed=100 + i)
    assert m.ok, f"{name} {knobs}: {m.message}"


@needs_gxx
def test_the_emulator_catches_a_wrong_split_k_reduction(emulator_builds):
    w, knobs, src = _source("mlp_bf16", 2)
    assert knobs["ksplit"] > 1
    wrong = src.replace("tot[j] += red[warp + s][j][m][r];", "tot[j] += red[warp][j][m][r];")
    assert wrong != src
    assert not emulator.check(w, wrong, emulator_builds).ok


@needs_gxx
@pytest.mark.parametrize("mutation", [
    ("o[m][q][e] += h * to_f32(de[e]);", "o[m][q][e] += h * to_f32(de[0]);"),  # wrong column of the down row
    ("for (int r = warp; r < C; r += ", "for (int r = warp + 1; r < C; r += "),  # a row of every warp skipped
    ("red_add_f32x4(acc + m * H", "if (blockIdx.x) red_add_f32x4(acc + m * H"),  # a block's partial sums dropped
    ("if (warp >= S) {", "if (warp > S) {"),  # a warp's partial output left out of the block's sum
    ("[((m * NQ + q) * HV + v) * 32 + lane]", "[((m * NQ + q) * HV) * 32 + lane]"),  # staged x read at the wrong place
])
def test_the_emulator_catches_a_wrong_streaming_mlp(mutation, emulator_builds):
    w = WORKLOADS["mlp_bf16_h512"]
    knobs = codegen.legalize(w, dict(naive=False, down_t=True, warps=4, chunk=32))
    src = codegen.generate(w, knobs)
    assert knobs["down_t"] and emulator.check(w, src, emulator_builds).ok
    wrong = src.replace(*mutation)
    assert wrong != src
    assert not emulator.check(w, wrong, emulator_builds).ok


@needs_gxx
@pytest.mark.parametrize("case,knobs,staging", [
    ("mlp_bf16", dict(naive=False, vec=True, unroll=4, warps=8, fuse_down=True, chunk=32),
     "for (int i = threadIdx.x; i < M * H; i += NT) xs[i] = to_f32(x[i]);"),
    ("mlp_bf16_h512", dict(naive=False, down_t=True, warps=4, chunk=32),
     "for (int i = threadIdx.x; i < F; i += NT) {"),
])
def test_the_emulator_gives_each_block_fresh_static_shared_memory(case, knobs, staging, emulator_builds):
    """A kernel that stages the activation into static shared memory in its first block only reads NaN in the
    others (a GPU leaves them undefined); an emulator that kept the previous block's values would pass it."""
    w = WORKLOADS[case]
    src = codegen.generate(w, codegen.legalize(w, knobs))
    assert launch_spec(src)["kernels"][0]["grid"][0] > 1 and emulator.check(w, src, emulator_builds).ok
    wrong = src.replace(staging, "if (blockIdx.x == 0) " + staging)
    assert wrong != src
    assert not emulator.check(w, wrong, emulator_builds).ok


def test_the_streaming_mlp_reads_the_down_projection_transposed():
    w = make_workload("mlp", "bf16", batch=1, hidden=2048, intermediate=8192)
    knobs = codegen.legalize(w, dict(naive=False, down_t=True, warps=8, chunk=64, rows=4, fuse=True))
    assert {k: v for k, v in knobs.items() if v != codegen.NAIVE_KNOBS["gemv"][k]} == dict(
        naive=False, vec=True, down_t=True, warps=8)  # only its own knobs survive (chunk 64 is the default)
    spec = launch_spec(codegen.generate(w, knobs))
    assert spec["derived"] == {"w_down_t": ["transpose", "w_down"]}
    (k,) = spec["kernels"]
    assert k["grid"][0] == 8192 // 64 and "@w_down_t" in k["args"]
    assert not codegen.legalize(make_workload("mlp", "bf16", batch=4, hidden=2048, intermediate=8192),
                                dict(naive=False, down_t=True))["down_t"]  # 4 rows of partial output: too many registers


@needs_compiler
def test_compile_error_is_reported(tmp_path):
    b = build('// autocomp-launch: {"kernels":[]}\nextern "C" __global__ void k() { undefined_fn(); }', "sm_90", tmp_path)
    assert not b.ok and "undefined_fn" in b.log


@needs_gpu
@pytest.mark.parametrize("name,i", CASES)
def test_every_variant_is_correct_on_gpu(name, i, tmp_path):
    w, knobs, src = _source(name, i)
    b = build(src, f"sm_{torch.cuda.get_device_capability()[0]}{torch.cuda.get_device_capability()[1]}", tmp_path)
    assert b.ok, b.log
    kernel = load(str(b.cubin_path), src, [t.name for t in w.tensors], list(w.runtime_dims))
    factory = InputFactory(i)
    spec = get_kind(w.kind)
    for _ in range(2):
        host = factory.inputs(w)
        ref = spec.reference(host, w.params, w.runtime_dims)
        dev = {k: v.cuda() for k, v in host.items()}
        outs = empty_outputs(w, device="cuda")
        kernel([dev[t.name] for t in w.inputs] + [outs[t.name] for t in w.outputs], list(w.runtime_dims.values()))
        torch.cuda.synchronize()
        m = compare("out", outs["out"].cpu(), ref["out"])
        assert m.ok, f"{name} {knobs}: {m.message}"


@needs_gpu
def test_search_on_gpu_beats_naive(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMP_CACHE_DIR", str(tmp_path / "cache"))
    w = make_workload("gemm", "bf16", m=1, n=4096, k=4096)
    r = optimize(w, "cuda", SearchConfig(budget=10, seed=0), EvalSettings(timing_budget_ms=50), tmp_path / "out",
                 proposers=[ScheduleProposer(dropout=0.3)])
    assert r.best is not None and r.best.correct
    assert r.best.latency_ms < r.root.latency_ms
    assert r.root.result.baseline_ms is not None


def test_cuda_target_reports_why_unavailable():
    ok, why = get_target("cuda").available()
    assert ok == HAS_GPU
    if not ok:
        assert why


def test_lowered_kernel_is_a_candidate():
    t = get_target("cuda")
    c = t.lower(WORKLOADS["mlp_bf16"])
    assert isinstance(c, Candidate) and c.knobs["naive"] and c.language == "cuda"
    assert launch_spec(c.code)["kernels"][0]["name"] == "gate"


def test_l2_prefetch_passes_the_down_weights_to_the_first_kernel():
    w, knobs, src = _source("mlp_bf16", 4)
    assert knobs["l2_prefetch"] and knobs["stream_loads"]
    first = launch_spec(src)["kernels"][0]
    assert first["args"] == ["x", "w_gate", "w_up", "w_down", "$h"]  # the kernel's parameter order
    assert "const elem_t *__restrict__ wb, const elem_t *__restrict__ pf, float *__restrict__ out" in src
    assert "prefetch.global.L2::evict_last" in src and "__ldcs" in src


def test_one_kernel_mlp_is_one_launch_with_zeroed_scratch():
    w = make_workload("mlp", "bf16", batch=2, hidden=2048, intermediate=8192)
    knobs = codegen.legalize(w, dict(naive=False, vec=True, fuse_down=True, chunk=64, warps=8, l2_prefetch=True))
    assert knobs["fuse_down"] and knobs["fuse"] and not knobs["l2_prefetch"]
    spec = launch_spec(codegen.generate(w, knobs))
    assert [k["name"] for k in spec["kernels"]] == ["mlp_fused"]
    assert spec["kernels"][0]["grid"] == [8192 // 64, 1, 1] and spec["kernels"][0]["block"] == [256, 1, 1]
    assert spec["scratch"] == {"acc": [2 * 2048, "fp32"], "count": [1, "u32"]}


@pytest.mark.parametrize("params,knobs", [
    (dict(batch=1, hidden=2048, intermediate=8192), dict(vec=False)),  # needs 16-byte loads
    (dict(batch=8, hidden=2048, intermediate=8192), {}),  # too many rows for the registers
    (dict(batch=4, hidden=4096, intermediate=8192), {}),  # activation does not fit in shared memory
    (dict(batch=1, hidden=64, intermediate=200), {}),  # intermediate not a multiple of 16
])
def test_one_kernel_mlp_is_refused_where_it_cannot_run(params, knobs):
    w = make_workload("mlp", "bf16", **params)
    out = codegen.legalize(w, {"naive": False, "vec": True, "fuse_down": True, **knobs})
    assert not out["fuse_down"]
    assert [k["name"] for k in launch_spec(codegen.generate(w, out))["kernels"]][-1] == "down"


def test_persistent_mlp_is_one_cooperative_launch_with_dynamic_shared_memory():
    w = make_workload("mlp", "bf16", batch=1, hidden=2048, intermediate=8192)
    knobs = codegen.legalize(w, dict(naive=False, vec=True, persistent=True, fuse_down=True, per_sm=2, warps=8,
                                     l2_prefetch=True))
    assert knobs["persistent"] and not knobs["fuse_down"] and knobs["l2_prefetch"]
    src = codegen.generate(w, knobs)
    (k,) = launch_spec(src)["kernels"]
    assert k["name"] == "mlp_persistent" and k["cooperative"] and k["grid"] == ["sms*2", 1, 1]
    assert k["smem"] == (2048 + 8192) * 4  # over 48 KB: the runtime raises the kernel's limit
    assert launch_spec(src)["scratch"] == {"h": [8192, "fp32"], "barrier": [2, "u32"]}
    assert "prefetch.global.L2::evict_last" in src
    too_big = make_workload("mlp", "bf16", batch=8, hidden=2048, intermediate=8192)
    assert not codegen.legalize(too_big, dict(naive=False, vec=True, persistent=True))["persistent"]
    # 4 x (3072 + 8192) floats = 176 KB: more than an A100 block may have
    a100_too_big = make_workload("mlp", "bf16", batch=4, hidden=3072, intermediate=8192)
    assert not codegen.legalize(a100_too_big, dict(naive=False, vec=True, persistent=True))["persistent"]


def test_down_stage_inherits_the_gate_up_schedule_until_it_has_its_own():
    w = make_workload("mlp", "bf16", batch=1, hidden=2048, intermediate=8192)
    same = codegen.legalize(w, dict(naive=False, vec=True, fuse=True, warps=8, ksplit=2, unroll=4))
    assert all(same[f"down_{n}"] == 0 for n in codegen.STAGE_KNOBS)
    gate_up, down = launch_spec(codegen.generate(w, same))["kernels"]
    assert gate_up["block"] == down["block"] == [256, 1, 1] and down["grid"] == [2048 // 4, 1, 1]
    own = codegen.legalize(w, dict(same, down_warps=16, down_ksplit=8))
    assert (own["down_warps"], own["down_ksplit"], own["down_rows"], own["down_unroll"]) == (16, 8, 1, 4)
    gate_up, down = launch_spec(codegen.generate(w, own))["kernels"]
    assert gate_up["block"] == [256, 1, 1] and down["block"] == [512, 1, 1] and down["grid"] == [2048 // 2, 1, 1]
    # an explicit down split must divide the intermediate dimension into 16-byte vectors: 8 * 8 does not divide 96
    odd = codegen.legalize(make_workload("mlp", "bf16", batch=1, hidden=64, intermediate=96),
                           dict(naive=False, vec=True, fuse=True, down_warps=8, down_ksplit=8))
    assert 96 % (odd["down_ksplit"] * 8) == 0 and odd["down_ksplit"] == 4
    # the other MLP forms have no separate down stage
    fused = codegen.legalize(w, dict(naive=False, vec=True, fuse_down=True, down_warps=16))
    assert fused["fuse_down"] and fused["down_warps"] == 0


def test_pdl_lets_the_down_kernel_start_early_and_wait_for_h():
    w = make_workload("mlp", "bf16", batch=1, hidden=2048, intermediate=8192)
    knobs = codegen.legalize(w, dict(naive=False, vec=True, fuse=True, pdl=True, warps=8))
    assert knobs["pdl"]
    src = codegen.generate(w, knobs)
    gate_up, down = launch_spec(src)["kernels"]
    assert down.get("pdl") and not gate_up.get("pdl")
    first, second = src.split('void __launch_bounds__(256) down(')
    assert "griddepcontrol.launch_dependents" in first and "griddepcontrol.wait" not in first
    wait = second.index("griddepcontrol.wait")
    assert second.index("prefetch.global.L2") < wait < second.index("#define XV")  # weights first, h after
    for other in (dict(fuse=False), dict(fuse_down=True), dict(persistent=True), dict(naive=True)):
        assert not codegen.legalize(w, {**dict(naive=False, vec=True, fuse=True, pdl=True), **other})["pdl"], other
    assert not codegen.legalize(WORKLOADS["gemm_bf16"], dict(naive=False, pdl=True))["pdl"]


def test_launch_attributes_ask_for_cooperative_and_programmatic_launches():
    pytest.importorskip("cuda.bindings.driver", reason="cuda-python (cuda-bindings) is not installed")
    from cuda.bindings import driver

    ids = driver.CUlaunchAttributeID
    down = {"name": "down", "grid": [512, 1, 1], "block": [256, 1, 1], "smem": 0, "args": [], "pdl": True}
    assert launch_attributes(down, (8, 0)) == []  # no programmatic launches before Hopper: plain stream order
    (attr,) = launch_attributes(down, (9, 0))
    assert attr.id == ids.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    assert attr.value.programmaticStreamSerializationAllowed == 1
    persistent = {"name": "p", "grid": [128, 1, 1], "block": [256, 1, 1], "smem": 40960, "args": [], "cooperative": True}
    attrs = launch_attributes(persistent, (8, 0))
    assert [a.id for a in attrs] == [ids.CU_LAUNCH_ATTRIBUTE_COOPERATIVE]
    cfg = launch_config(persistent, attrs)
    assert (cfg.gridDimX, cfg.blockDimX, cfg.sharedMemBytes, cfg.numAttrs) == (128, 256, 40960, 1)
    assert launch_attributes({"name": "k", "grid": [1, 1, 1], "block": [32, 1, 1], "args": []}, (9, 0)) == []


class _RecordingDriver:
    """Stands in for cuda.bindings.driver in the launch loop: records launches, returns success or an error."""

    def __init__(self, result):
        self.calls, self.result = [], result

    def cuLaunchKernel(self, *args):
        self.calls.append(("plain", args))
        return (self.result,)

    def cuLaunchKernelEx(self, cfg, fn, params, extra):
        self.calls.append(("ex", (cfg, fn, params, extra)))
        return (self.result,)


def _pointers(address: int, n: int) -> list[int]:
    """The values behind a kernel-parameter array (n pointers to 8-byte values)."""
    import ctypes

    slots = (ctypes.c_void_p * n).from_address(address)
    return [ctypes.c_int64.from_address(s).value for s in slots]


def test_launch_loop_passes_grid_stream_and_parameters_without_a_gpu(monkeypatch):
    """The per-call launch path of CudaKernel, driven on the CPU with a recording driver: plain launches
    for ordinary kernels, cuLaunchKernelEx (with the stream set) for the PDL kernel, parameters that point
    at the tensors and scratch, and parameter arrays rebuilt only when a pointer changes."""
    driver = pytest.importorskip("cuda.bindings.driver", reason="cuda-python (cuda-bindings) is not installed")
    from autocomp_compile.targets.cuda import runtime

    w = make_workload("mlp", "bf16", batch=1, hidden=128, intermediate=256)
    src = codegen.generate(w, codegen.legalize(w, dict(naive=False, vec=True, fuse=True, warps=4, pdl=True)))
    spec = launch_spec(src)
    kernel = object.__new__(runtime.CudaKernel)
    kernel.spec, kernel.names, kernel.dim_names, kernel.alignment = spec, [t.name for t in w.tensors], [], 16
    stream = driver.CUstream(0)
    kernel._setup(["fn_gate_up", "fn_down"], (9, 0), lambda: stream, "cpu")
    fake = _RecordingDriver(result="ok")
    monkeypatch.setattr(runtime, "_driver", fake)
    monkeypatch.setattr(runtime, "_SUCCESS", "ok")
    tensors = [torch.zeros(t.shape, dtype=torch.bfloat16) for t in w.tensors]
    kernel(tensors)
    (kind0, plain), (kind1, ex) = fake.calls
    gate_up, down = spec["kernels"]
    assert kind0 == "plain" and plain[:8] == ("fn_gate_up", *gate_up["grid"], *gate_up["block"], 0) and plain[8] is stream
    x, wg, wu, wd, out = tensors
    h = kernel._scratch["h"]
    assert _pointers(plain[9], 4) == [x.data_ptr(), wg.data_ptr(), wu.data_ptr(), h.data_ptr()]
    cfg, fn, params, _ = ex
    assert kind1 == "ex" and fn == "fn_down" and cfg.gridDimX == down["grid"][0] and cfg.numAttrs == 1
    assert _pointers(params, 3) == [h.data_ptr(), wd.data_ptr(), out.data_ptr()]
    cached = kernel._addresses
    kernel(tensors)
    assert kernel._addresses is cached  # same pointers: the parameter arrays are reused
    tensors[-1] = torch.zeros_like(out)
    kernel(tensors)
    assert _pointers(fake.calls[-1][1][2], 3)[-1] == tensors[-1].data_ptr()
    unaligned = torch.zeros(w.tensors[0].shape[1] + 1, dtype=torch.bfloat16)[1:].view(w.tensors[0].shape)
    with pytest.raises(ValueError, match="16-byte boundary"):
        kernel([unaligned, *tensors[1:]])
    monkeypatch.setattr(runtime, "_driver", _RecordingDriver(result=driver.CUresult.CUDA_ERROR_INVALID_VALUE))
    monkeypatch.setattr(runtime, "_check", lambda result, what: (_ for _ in ()).throw(CudaKernelError(what)))
    with pytest.raises(CudaKernelError, match="launch of gate_up"):
        kernel(tensors)


def test_threads_sharing_a_kernel_launch_with_their_own_pointers_and_streams(monkeypatch):
    """Two threads, each on its own stream with its own tensors, call one kernel (a PDL MLP: a plain launch and a
    cuLaunchKernelEx one) with frequent thread switches: every launch gets the calling thread's pointers and stream."""
    import sys
    import threading

    driver = pytest.importorskip("cuda.bindings.driver", reason="cuda-python (cuda-bindings) is not installed")
    from autocomp_compile.targets.cuda import runtime

    w = make_workload("mlp", "bf16", batch=1, hidden=128, intermediate=256)
    src = codegen.generate(w, codegen.legalize(w, dict(naive=False, vec=True, fuse=True, warps=4, pdl=True)))
    kernel = object.__new__(runtime.CudaKernel)
    kernel.spec, kernel.names, kernel.dim_names, kernel.alignment = launch_spec(src), [t.name for t in w.tensors], [], 16
    local = threading.local()
    kernel._setup(["fn_gate_up", "fn_down"], (9, 0), lambda: local.stream, "cpu")
    wrong = []

    class Checking:
        def cuLaunchKernel(self, fn, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
            if stream is not local.stream or _pointers(params, 1)[0] != local.tensors[0].data_ptr():
                wrong.append(fn)
            return ("ok",)

        def cuLaunchKernelEx(self, cfg, fn, params, extra):
            if cfg.hStream != local.stream or _pointers(params, 3)[2] != local.tensors[-1].data_ptr():
                wrong.append(fn)
            return ("ok",)

    monkeypatch.setattr(runtime, "_driver", Checking())
    monkeypatch.setattr(runtime, "_SUCCESS", "ok")
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def work(t: int) -> None:
        local.stream = driver.CUstream(t + 1)
        sets = [[torch.zeros(t.shape, dtype=torch.bfloat16) for t in w.tensors] for _ in range(2)]
        for i in range(300):
            local.tensors = sets[i % 2]  # alternating pointers: the parameter arrays are rebuilt on every call
            kernel(local.tensors)

    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
    assert not wrong, f"{len(wrong)} of 1200 launches used another thread's pointers or stream"


def test_launch_loop_passes_a_transposed_copy_of_the_down_projection(monkeypatch):
    """The streaming MLP's `@w_down_t` argument: the runtime passes a transposed copy, made once per weight
    and refreshed in place after the weight changes in place."""
    driver = pytest.importorskip("cuda.bindings.driver", reason="cuda-python (cuda-bindings) is not installed")
    from autocomp_compile.targets.cuda import derived, runtime

    w = make_workload("mlp", "bf16", batch=1, hidden=512, intermediate=128)
    spec = launch_spec(codegen.generate(w, codegen.legalize(w, dict(naive=False, down_t=True))))
    kernel = object.__new__(runtime.CudaKernel)
    kernel.spec, kernel.names, kernel.dim_names, kernel.alignment = spec, [t.name for t in w.tensors], [], 16
    stream = driver.CUstream(0)
    kernel._setup(["fn_mlp"], (9, 0), lambda: stream, "cpu")
    fake = _RecordingDriver(result="ok")
    monkeypatch.setattr(runtime, "_driver", fake)
    monkeypatch.setattr(runtime, "_SUCCESS", "ok")
    monkeypatch.setattr(derived, "CACHE", derived.DerivedCache())
    tensors = [torch.randn(t.shape).to(torch.bfloat16) for t in w.tensors]
    x, wg, wu, wd, out = tensors
    kernel(tensors)
    kernel(tensors)
    (copy,) = derived.CACHE._entries.values()
    assert torch.equal(copy[1], wd.t()) and derived.CACHE.made == 1
    pointers = _pointers(fake.calls[-1][1][9], 7)
    assert pointers[:3] == [x.data_ptr(), wg.data_ptr(), wu.data_ptr()] and pointers[3] == copy[1].data_ptr()
    assert pointers[4] == kernel._scratch["acc"].data_ptr() and pointers[6] == out.data_ptr()
    wd.neg_()
    kernel(tensors)
    assert (derived.CACHE.made, derived.CACHE.refreshed) == (1, 1) and torch.equal(copy[1], wd.t())
    assert _pointers(fake.calls[-1][1][9], 7) == pointers  # refreshed where it was
