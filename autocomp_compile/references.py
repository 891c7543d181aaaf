"""Per-kind definitions: shapes, the float32 reference, the PyTorch eager baseline, random inputs.

Every kind registers a `KindSpec`. References compute in float32 from the (possibly bf16) inputs;
eager baselines are what a user would run in PyTorch, written into the preallocated outputs where
PyTorch allows it (`out=`), so that candidates and baseline pay the same allocation costs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from autocomp_compile.workload import TensorSpec, Workload, WorkloadError

Tensors = dict[str, torch.Tensor]

# Llama-3.2-1B (hidden 2048, intermediate 8192, 32 heads, 8 KV heads, head_dim 64, vocab 128256).
LLAMA_3_2_1B = dict(hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64, vocab=128256, eps=1e-5)


@dataclass(frozen=True)
class KindSpec:
    name: str
    defaults: dict[str, Any]
    shapes: Callable[[dict[str, Any], str], tuple[list[TensorSpec], list[TensorSpec], dict[str, int]]]
    reference: Callable[[Tensors, dict[str, Any], dict[str, int]], Tensors]
    # PyTorch computing the kind, as timed against the kernels: into the given outputs (out=) where PyTorch has
    # an out= form; where it has none (SDPA), its own result replaces the dict entry, so that it is not charged
    # a copy a model never makes.
    eager: Callable[[Tensors, Tensors, dict[str, Any], dict[str, int]], None]
    check: Callable[[dict[str, Any]], None] = lambda p: None
    # Parameters a form of the kind does not use (attention's kv_len in prefill): they keep their defaults,
    # so that they neither change the computation's cache key nor fail its checks.
    unused: Callable[[dict[str, Any]], tuple[str, ...]] = lambda p: ()

    def build(self, dtype: str, params: dict[str, Any]) -> Workload:
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise WorkloadError(f"{self.name}: unknown parameter(s) {sorted(unknown)}; valid: {sorted(self.defaults)}")
        merged = {**self.defaults, **{k: v for k, v in params.items() if v is not None}}
        merged.update({k: self.defaults[k] for k in self.unused(merged)})
        for key, value in merged.items():
            if isinstance(self.defaults[key], int) and not isinstance(self.defaults[key], bool):
                if not isinstance(value, int) or value <= 0:
                    raise WorkloadError(f"{self.name}: {key} must be a positive integer, got {value!r}")
            elif isinstance(self.defaults[key], float):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                    raise WorkloadError(f"{self.name}: {key} must be a finite positive number, got {value!r}")
        self.check(merged)
        inputs, outputs, runtime = self.shapes(merged, dtype)
        return Workload(self.name, dtype, merged, tuple(inputs), tuple(outputs), runtime)

    def bytes_moved(self, w: Workload) -> int:
        if w.kind == "attention" and w.params["phase"] == "decode":
            frac = w.runtime_dims["kv_len"] / w.params["max_kv_len"]
            return int(sum(t.nbytes * (frac if t.name in ("k_cache", "v_cache") else 1) for t in w.tensors))
        return sum(t.nbytes for t in w.tensors)


def _linear_f32(x: torch.Tensor, w: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """x @ w.T in float32 without materialising a float32 copy of a large w (chunks stay in cache)."""
    xf = x.float()
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    buf = torch.empty(min(chunk, w.shape[0]), w.shape[1], dtype=torch.float32)
    for i in range(0, w.shape[0], chunk):
        rows = min(chunk, w.shape[0] - i)
        buf[:rows].copy_(w[i : i + rows])
        torch.mm(xf, buf[:rows].t(), out=out[:, i : i + rows])
    return out


# ---------------------------------------------------------------- GEMM / LM head


def _gemm_shapes(p, dt):
    return (
        [TensorSpec("x", (p["m"], p["k"]), dt), TensorSpec("w", (p["n"], p["k"]), dt, "weight")],
        [TensorSpec("out", (p["m"], p["n"]), dt, "output")],
        {},
    )


def _lm_head_shapes(p, dt):
    return (
        [TensorSpec("x", (p["batch"], p["hidden"]), dt), TensorSpec("w", (p["vocab"], p["hidden"]), dt, "weight")],
        [TensorSpec("out", (p["batch"], p["vocab"]), dt, "output")],
        {},
    )


def _linear_reference(t, p, rt):
    return {"out": _linear_f32(t["x"], t["w"])}


def _linear_eager(t, out, p, rt):
    torch.mm(t["x"], t["w"].t(), out=out["out"])


# ---------------------------------------------------------------- SwiGLU MLP


def _mlp_shapes(p, dt):
    b, h, i = p["batch"], p["hidden"], p["intermediate"]
    return (
        [
            TensorSpec("x", (b, h), dt),
            TensorSpec("w_gate", (i, h), dt, "weight"),
            TensorSpec("w_up", (i, h), dt, "weight"),
            TensorSpec("w_down", (h, i), dt, "weight"),
        ],
        [TensorSpec("out", (b, h), dt, "output")],
        {},
    )


def _mlp_reference(t, p, rt):
    hidden = F.silu(_linear_f32(t["x"], t["w_gate"])) * _linear_f32(t["x"], t["w_up"])
    return {"out": _linear_f32(hidden, t["w_down"])}


def _mlp_eager(t, out, p, rt):
    x = t["x"]
    torch.mm(F.silu(F.linear(x, t["w_gate"])) * F.linear(x, t["w_up"]), t["w_down"].t(), out=out["out"])


# ---------------------------------------------------------------- RMSNorm


def _rmsnorm_shapes(p, dt):
    return (
        [TensorSpec("x", (p["rows"], p["hidden"]), dt), TensorSpec("weight", (p["hidden"],), dt, "weight")],
        [TensorSpec("out", (p["rows"], p["hidden"]), dt, "output")],
        {},
    )


def _rmsnorm_reference(t, p, rt):
    x = t["x"].double()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + p["eps"]) * t["weight"].double()
    return {"out": y.float()}


def _rmsnorm_eager(t, out, p, rt):
    # As Llama implementations write it: normalise in float32, cast back, scale.
    x = t["x"]
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + p["eps"])).to(x.dtype)
    torch.mul(normed, t["weight"], out=out["out"])


# ---------------------------------------------------------------- GQA attention


def _attention_check(p):
    if p["phase"] not in ("decode", "prefill"):
        raise WorkloadError(f"attention: phase must be 'decode' or 'prefill', got {p['phase']!r}")
    if p["heads"] % p["kv_heads"]:
        raise WorkloadError(f"attention: heads ({p['heads']}) must be a multiple of kv_heads ({p['kv_heads']})")
    if p["phase"] == "decode" and p["kv_len"] > p["max_kv_len"]:
        raise WorkloadError(f"attention: kv_len ({p['kv_len']}) exceeds max_kv_len ({p['max_kv_len']})")


def _attention_unused(p):
    return ("kv_len", "max_kv_len") if p["phase"] == "prefill" else ("seq_len",)


def _attention_shapes(p, dt):
    b, hq, hk, d = p["batch"], p["heads"], p["kv_heads"], p["head_dim"]
    if p["phase"] == "decode":
        lmax = p["max_kv_len"]
        return (
            [
                TensorSpec("q", (b, hq, d), dt),
                TensorSpec("k_cache", (b, hk, lmax, d), dt),
                TensorSpec("v_cache", (b, hk, lmax, d), dt),
            ],
            [TensorSpec("out", (b, hq, d), dt, "output")],
            {"kv_len": p["kv_len"]},
        )
    s = p["seq_len"]
    return (
        [TensorSpec("q", (b, hq, s, d), dt), TensorSpec("k", (b, hk, s, d), dt), TensorSpec("v", (b, hk, s, d), dt)],
        [TensorSpec("out", (b, hq, s, d), dt, "output")],
        {},
    )


def _attention_qkv(t, p, rt):
    if p["phase"] == "decode":
        n = rt["kv_len"]
        return t["q"].unsqueeze(2), t["k_cache"][:, :, :n], t["v_cache"][:, :, :n], False
    return t["q"], t["k"], t["v"], True


def _attention_reference(t, p, rt):
    # fp32 workloads in float64 (returned in float32): the sharpened query head's logits reach 100-200, where
    # float32 rounding of the scores put an fp32 reference itself as far from the true result as the fp32
    # tolerance allows. bf16 workloads in float32: their tolerance is 2^8 times wider, and long prefills keep
    # half the memory.
    q, k, v, causal = _attention_qkv(t, p, rt)
    acc = torch.float64 if q.dtype == torch.float32 else torch.float32
    group = p["heads"] // p["kv_heads"]
    k = k.to(acc).repeat_interleave(group, dim=1)
    v = v.to(acc).repeat_interleave(group, dim=1)
    scores = q.to(acc) @ k.transpose(-1, -2) / math.sqrt(p["head_dim"])
    if causal:
        s = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    o = (torch.softmax(scores, dim=-1) @ v).float()
    return {"out": o.squeeze(2) if p["phase"] == "decode" else o}


def _attention_eager(t, out, p, rt):
    q, k, v, causal = _attention_qkv(t, p, rt)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    out["out"] = o.squeeze(2) if p["phase"] == "decode" else o  # no out= form: no copy charged (see KindSpec)


KINDS: dict[str, KindSpec] = {
    k.name: k
    for k in [
        KindSpec("gemm", dict(m=1, n=2048, k=2048), _gemm_shapes, _linear_reference, _linear_eager),
        KindSpec(
            "lm_head",
            dict(batch=1, hidden=LLAMA_3_2_1B["hidden"], vocab=LLAMA_3_2_1B["vocab"]),
            _lm_head_shapes,
            _linear_reference,
            _linear_eager,
        ),
        KindSpec(
            "mlp",
            dict(batch=1, hidden=LLAMA_3_2_1B["hidden"], intermediate=LLAMA_3_2_1B["intermediate"]),
            _mlp_shapes,
            _mlp_reference,
            _mlp_eager,
        ),
        KindSpec(
            "rmsnorm",
            dict(rows=1, hidden=LLAMA_3_2_1B["hidden"], eps=LLAMA_3_2_1B["eps"]),
            _rmsnorm_shapes,
            _rmsnorm_reference,
            _rmsnorm_eager,
        ),
        KindSpec(
            "attention",
            dict(
                phase="decode",
                batch=1,
                heads=LLAMA_3_2_1B["heads"],
                kv_heads=LLAMA_3_2_1B["kv_heads"],
                head_dim=LLAMA_3_2_1B["head_dim"],
                kv_len=1024,
                max_kv_len=2048,
                seq_len=256,
            ),
            _attention_shapes,
            _attention_reference,
            _attention_eager,
            _attention_check,
            _attention_unused,
        ),
    ]
}


def get_kind(kind: str) -> KindSpec:
    try:
        return KINDS[kind]
    except KeyError:
        raise WorkloadError(f"unknown workload {kind!r}; choose one of {sorted(KINDS)}") from None


# A Llama-shaped model small enough for tests and CI.
TINY_LLAMA = dict(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=256, eps=1e-5)
MODEL_CONFIGS = {"llama-3.2-1b": LLAMA_3_2_1B, "tiny-llama": TINY_LLAMA}


def llama_decode_workloads(
    dtype: str = "bf16", batch: int = 1, kv_len: int = 1024, config: dict[str, Any] | str = "llama-3.2-1b"
) -> list[Workload]:
    """A Llama model's decode kernels (Llama-3.2-1B by default): attention, MLP, LM head, RMSNorm."""
    from autocomp_compile.workload import make_workload

    c = MODEL_CONFIGS[config] if isinstance(config, str) else config
    return [
        make_workload("attention", dtype, batch=batch, heads=c["heads"], kv_heads=c["kv_heads"], head_dim=c["head_dim"],
                      kv_len=kv_len, max_kv_len=max(2048, kv_len)),
        make_workload("mlp", dtype, batch=batch, hidden=c["hidden"], intermediate=c["intermediate"]),
        make_workload("lm_head", dtype, batch=batch, hidden=c["hidden"], vocab=c["vocab"]),
        make_workload("rmsnorm", dtype, rows=batch, hidden=c["hidden"], eps=c["eps"]),
    ]


# ---------------------------------------------------------------- random inputs

# Tensors above this many elements are cut from a per-process random pool at a random offset:
# drawing 262M fresh normals for the LM head costs ~3 s here, a view costs nothing.
POOL_THRESHOLD = 1 << 22


def _signed_with_tails(numel: int, gen: torch.Generator) -> torch.Tensor:
    """Standard normals with 1% of entries scaled by 6: signed, with outliers."""
    x = torch.randn(numel, generator=gen)
    tails = torch.rand(numel, generator=gen) < 0.01
    x[tails] *= 6.0
    return x


def _rmsnorm_row_scales(rows: int, eps: float, variant: int) -> torch.Tensor:
    """Per-row magnitudes of RMSNorm inputs, cycling (from `variant` on) through RMS sqrt(eps), where eps decides
    half the result, 1 and 10: with inputs of RMS 1 only, a kernel with eps 1000x too large or eps 0 would pass."""
    cycle = torch.tensor([math.sqrt(eps), 1.0, 10.0])
    return cycle[(torch.arange(rows) + variant) % 3]


# Score scale of one query head per batch row: its softmax logits reach 100-200, past exp's float32 range (88.7),
# so that a kernel without the max subtraction overflows there.
SHARP_HEAD_SCALE = 30.0


def _sharpen_one_head(q: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Attention queries [batch, heads, ...] with one random head per batch row scaled by SHARP_HEAD_SCALE."""
    heads = torch.randint(0, q.shape[1], (q.shape[0],), generator=gen)
    q = q.clone()
    q[torch.arange(q.shape[0]), heads] *= SHARP_HEAD_SCALE
    return q


class InputFactory:
    """Makes fresh random inputs for a workload. One per worker process (it owns the pools).

    Small tensors are drawn fresh every time. A large tensor is copied from a random offset of a
    pristine pool into a reusable working buffer: no allocation, no page faults, and the pristine
    slice serves as the snapshot for the inputs-unchanged check.
    """

    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self._pools: dict[tuple[str, int, float], torch.Tensor] = {}
        self._buffers: dict[tuple[str, tuple[int, ...], str], torch.Tensor] = {}
        self.pristine: dict[str, torch.Tensor] = {}

    def _scale(self, w: Workload, spec: TensorSpec) -> float:
        if spec.role == "weight" and len(spec.shape) == 2:
            return 1.0 / math.sqrt(spec.shape[1])
        return 1.0

    def _pool(self, spec: TensorSpec, scale: float, slack: int) -> torch.Tensor:
        key = (spec.dtype, spec.numel, scale)
        if key not in self._pools:
            pool = torch.empty(spec.numel + slack, dtype=spec.torch_dtype)
            chunk = 1 << 22
            for i in range(0, pool.numel(), chunk):
                piece = pool[i : i + chunk]
                piece.copy_(_signed_with_tails(piece.numel(), self.gen) * scale)
            self._pools[key] = pool
        return self._pools[key]

    def tensor(self, w: Workload, spec: TensorSpec, variant: int = 0) -> torch.Tensor:
        scale = self._scale(w, spec)
        if spec.numel < POOL_THRESHOLD:
            values = (_signed_with_tails(spec.numel, self.gen) * scale).view(spec.shape)
            if w.kind == "rmsnorm" and spec.name == "weight":
                values = 1.0 + 0.2 * values
            elif w.kind == "rmsnorm" and spec.name == "x":
                values = values * _rmsnorm_row_scales(spec.shape[0], w.params["eps"], variant).unsqueeze(1)
            elif w.kind == "attention" and spec.name == "q":
                values = _sharpen_one_head(values, self.gen)
            return values.to(spec.torch_dtype)
        slack = 1 << 20
        pool = self._pool(spec, scale, slack)
        offset = int(torch.randint(0, slack // 32, (1,), generator=self.gen)) * 32
        pristine = pool[offset : offset + spec.numel].view(spec.shape)
        buf_key = (spec.dtype, spec.shape, spec.name)
        if buf_key not in self._buffers:
            self._buffers[buf_key] = torch.empty(spec.shape, dtype=spec.torch_dtype)
        buf = self._buffers[buf_key]
        buf.copy_(pristine)
        self.pristine[spec.name] = pristine
        return buf

    def inputs(self, w: Workload, variant: int = 0) -> Tensors:
        """Fresh inputs for `w`. `variant` (a correctness set's index) rotates input features that a few sets must
        cover between them, such as RMSNorm's row magnitudes."""
        self.pristine = {}
        return {spec.name: self.tensor(w, spec, variant) for spec in w.inputs}

    def snapshot(self, inputs: Tensors) -> Tensors:
        """Unmodifiable copies of `inputs` to compare against after a kernel ran."""
        return {k: self.pristine[k] if k in self.pristine else v.clone() for k, v in inputs.items()}


def empty_outputs(w: Workload, fill: float = float("nan"), device: str = "cpu") -> Tensors:
    """Output tensors, filled with NaN by default so that an element a kernel never writes is caught."""
    return {spec.name: torch.full(spec.shape, fill, dtype=spec.torch_dtype, device=device) for spec in w.outputs}


# NaN elements before and after each guarded output; 1024 elements of 2 or 4 bytes keep the output 64-byte aligned.
GUARD_ELEMENTS = 1024


class GuardedOutputs(dict):
    """NaN-filled outputs, as `empty_outputs` makes them, each inside a buffer with GUARD_ELEMENTS NaN elements
    on either side; `overrun()` says which margin a kernel wrote into (a write past an output that a plain
    allocation would not notice, or that would crash a later free)."""

    def __init__(self, w: Workload, device: str = "cpu"):
        super().__init__()
        self._buffers: dict[str, tuple[torch.Tensor, int]] = {}
        g = GUARD_ELEMENTS
        for spec in w.outputs:
            buf = torch.full((spec.numel + 2 * g,), float("nan"), dtype=spec.torch_dtype, device=device)
            self[spec.name] = buf[g : g + spec.numel].view(spec.shape)
            self._buffers[spec.name] = (buf, spec.numel)
        self._pattern = {name: as_bits(buf[:g]).clone() for name, (buf, _) in self._buffers.items()}

    def overrun(self) -> str:
        """Why a guard margin changed ("" when every margin still holds its NaNs, bit for bit)."""
        g = GUARD_ELEMENTS
        for name, (buf, n) in self._buffers.items():
            for side, margin in (("before", buf[:g]), ("after", buf[g + n :])):
                changed = as_bits(margin) != self._pattern[name]
                if bool(changed.any()):
                    return (f"the kernel wrote {int(changed.sum())} element(s) {side} output {name!r} "
                            f"(out of bounds)")
        return ""

    def fill_nan(self) -> None:
        """Poison the outputs again (the margins keep their NaNs)."""
        for out in self.values():
            out.fill_(float("nan"))


def fill_stale(outputs: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """Fill the outputs with finite values, as a model's reused buffers hold a previous call's results: a kernel
    must write them whatever they held (one that works only when it finds NaN there fails)."""
    for out in outputs.values():
        out.copy_(torch.randn(out.shape, generator=gen).mul_(3.0).to(out.dtype))


_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's elements as integers of the same width, so that comparisons are bitwise (a NaN equals the
    same NaN, -0.0 differs from 0.0); other tensors as they are."""
    return t.contiguous().view(_SAME_WIDTH_INT[t.element_size()]) if t.is_floating_point() else t
