"""Shared test helpers: small workloads, kernel runners, hand-written C kernels."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from autocomp_compile.evaluation.checks import compare
from autocomp_compile.models import build_llama
from autocomp_compile.references import InputFactory, empty_outputs, get_kind
from autocomp_compile.targets.cpu.compiler import build
from autocomp_compile.targets.cpu.runtime import CpuKernel
from autocomp_compile.workload import Workload, make_workload

REPO_ROOT = Path(__file__).resolve().parent.parent

# Small shapes with odd sizes so that every vector loop has a scalar tail.
SMALL: dict[str, tuple[str, dict]] = {
    "gemm": ("gemm", dict(m=1, n=64, k=96)),
    "gemm_m3_odd": ("gemm", dict(m=3, n=37, k=83)),
    "gemm_m19_odd": ("gemm", dict(m=19, n=29, k=70)),
    "lm_head_small": ("lm_head", dict(batch=1, hidden=72, vocab=101)),
    "mlp": ("mlp", dict(batch=1, hidden=64, intermediate=96)),
    "mlp_b2_odd": ("mlp", dict(batch=2, hidden=40, intermediate=56)),
    "mlp_b11_odd": ("mlp", dict(batch=11, hidden=40, intermediate=58)),
    "rmsnorm": ("rmsnorm", dict(rows=3, hidden=40)),
    "decode": ("attention", dict(phase="decode", heads=4, kv_heads=2, head_dim=16, kv_len=37, max_kv_len=64)),
    "prefill": ("attention", dict(phase="prefill", heads=4, kv_heads=2, head_dim=16, seq_len=19)),
}


def small(name: str, dtype: str = "bf16") -> Workload:
    kind, params = SMALL[name]
    return make_workload(kind, dtype, **params)


def run_kernel(kernel: CpuKernel, w: Workload, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    outs = empty_outputs(w)
    kernel([inputs[t.name] for t in w.inputs] + [outs[t.name] for t in w.outputs], list(w.runtime_dims.values()))
    return outs


def check_against_reference(so_path, w: Workload, seed: int = 1, sets: int = 2) -> None:
    """Load `so_path`, run it on `sets` fresh input sets and assert it matches the reference."""
    kernel = CpuKernel(so_path, len(w.tensors))
    factory = InputFactory(seed)
    spec = get_kind(w.kind)
    for s in range(sets):
        inputs = factory.inputs(w)
        before = {k: v.clone() for k, v in inputs.items()}
        outs = run_kernel(kernel, w, inputs)
        for name, v in before.items():
            assert torch.equal(inputs[name], v), f"kernel modified input {name}"
        ref = spec.reference(inputs, w.params, w.runtime_dims)
        for name, out in outs.items():
            m = compare(name, out, ref[name])
            assert m.ok, f"input set {s}: {m.message}"


def build_ok(code: str, isa: str, build_dir: Path):
    res = build(code, isa, build_dir)
    assert res.ok, res.log
    return res


# ---------------------------------------------------------------- hand-written kernels

# fp32 GEMM out[M, N] = x[M, K] @ w[N, K]^T, scalar C, with hooks to break it on purpose.
HAND_GEMM_SHAPE = dict(m=2, n=24, k=40)


def hand_gemm_workload() -> Workload:
    return make_workload("gemm", "fp32", **HAND_GEMM_SHAPE)


def hand_gemm(store: str = "out[m * N + n] = s;", n_end: str = "N", before: str = "", after: str = "") -> str:
    p = HAND_GEMM_SHAPE
    return f"""
#include <stdint.h>
#define M {p['m']}
#define N {p['n']}
#define K {p['k']}
void autocomp_kernel(void **t, const int64_t *dims) {{
  (void)dims;
  float *x = (float *)t[0];
  const float *w = (const float *)t[1];
  float *out = (float *)t[2];
  {before}
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < {n_end}; ++n) {{
      float s = 0.0f;
      for (int k = 0; k < K; ++k) s += x[m * K + k] * w[n * K + k];
      {store}
    }}
  {after}
}}
"""


def decode_attention_code(edit: tuple[str, str] | None = None) -> tuple[Workload, str, str]:
    """The small decode attention's generated AVX2 kernel (workload, code, isa), optionally with one text edit."""
    from autocomp_compile.targets.cpu import codegen
    from autocomp_compile.targets.cpu.isa import supported_isas

    w = small("decode")
    knobs = codegen.legalize(w, {"isa": "avx2", "online": True}, supported_isas())
    code = codegen.generate(w, knobs)
    if edit:
        assert edit[0] in code
        code = code.replace(*edit)
    return w, code, knobs["isa"]


class SwiGLU(torch.nn.Module):
    """A bias-free SwiGLU MLP, 64 -> 96 -> 64, for the graph passes' tests."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(64, 96, bias=False)
        self.up = torch.nn.Linear(64, 96, bias=False)
        self.down = torch.nn.Linear(96, 64, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def exported_cpu_kernel(tmp_path, code_edit=None, latency=None):
    """A real CPU kernel cached for a tiny GEMM and exported, optionally with its code edited (hash recomputed, as
    anyone writing the file can) and its latency claimed; then imported into the cache in `tmp_path / "dst"`.
    Returns (the workload, that cache)."""
    import json

    from autocomp_compile import EvalSettings, SearchConfig, get_target, optimize
    from autocomp_compile.kernels_cache import KernelCache
    from autocomp_compile.search.candidate import normalized_code_hash

    w = small("gemm", "fp32")
    src = KernelCache(tmp_path / "src.sqlite")
    r = optimize(w, "cpu", SearchConfig(budget=3, seed=0), EvalSettings(correctness_sets=1, timing_budget_ms=5),
                 output_dir=tmp_path / "runs", cache=src)
    assert r.best is not None
    src.export(tmp_path / "e.json")
    data = json.loads((tmp_path / "e.json").read_text())
    e = data["entries"][0]
    if code_edit:
        e["code"] = e["code"].replace(*code_edit)
        e["code_hash"] = normalized_code_hash(e["code"])
    if latency:
        e["latency_ms"] = latency
    (tmp_path / "e.json").write_text(json.dumps(data))
    (tmp_path / "dst").mkdir()
    dst = KernelCache(tmp_path / "dst" / "kernels.sqlite")
    assert dst.import_(tmp_path / "e.json", {"cpu": get_target("cpu").fingerprint()["codegen"]})[0] == 1
    return w, dst


# ---------------------------------------------------------------- Hugging Face checkpoints of tiny-llama

TINY_HF = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 256,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128, "hidden_act": "silu"}


def tiny_state(seed: int) -> dict[str, torch.Tensor]:
    """tiny-llama's random weights, under Hugging Face's tensor names."""
    return {k: v.contiguous() for k, v in build_llama("tiny-llama", "fp32", seed=seed).state_dict().items()}


def hf_checkpoint(tmp_path: Path, state: dict[str, torch.Tensor], shards: int = 2) -> dict[str, str]:
    """Write `state` into the folder `tmp_path` as `shards` safetensors files plus tiny-llama's config.json and
    the index; returns the weight_map."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF))
    keys, weight_map = sorted(state), {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::shards]}
        save_file(part, str(tmp_path / name))
        weight_map.update(dict.fromkeys(part, name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map
