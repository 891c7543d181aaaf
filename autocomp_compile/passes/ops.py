"""Custom ops (`torch.ops.autocomp.*`) that rewritten graphs call in place of recognised subgraphs.

Each op takes the subgraph's tensors plus the cache key of the kernel that computes it. The op runs
the kernel when the registry has it and the call is one the kernel covers (shapes, contiguity, aligned
addresses, a prefix attention mask; no float atomics while `torch.use_deterministic_algorithms(True)` is in
force); otherwise it computes the same result with PyTorch. A graph that calls
these ops is therefore always correct, whatever the state of the cache.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from autocomp_compile.passes.kernels import REGISTRY
from autocomp_compile.targets.cuda.derived import MadeDuringCapture

Tensor = torch.Tensor


def _run(key: str, inputs: list[Tensor], out: Tensor, dims: tuple[int, ...] = ()) -> bool:
    kernel = REGISTRY.get(key)
    if kernel is None or (kernel.order_dependent and torch.are_deterministic_algorithms_enabled()):
        return False  # no kernel, or one whose float atomics make it non-reproducible where PyTorch's must be
    expected = [s.shape for s in kernel.workload.inputs]
    if [tuple(t.shape) for t in inputs] != expected or any(t.dtype != out.dtype for t in inputs):
        return False
    inputs = [t.contiguous() for t in inputs]
    if not out.is_contiguous():
        return False  # kernels write their output row-major
    if any(t.data_ptr() % kernel.alignment for t in (*inputs, out)):
        return False  # e.g. a view at an odd offset, where the kernel's vector loads need aligned addresses
    try:
        kernel(inputs, [out], dims)
    except MadeDuringCapture:  # a prepacked weight first seen while a CUDA graph is captured: PyTorch computes it
        return False
    return True


# ---------------------------------------------------------------- linear (GEMM / GEMV, LM head)


def linear(x: Tensor, w: Tensor, key: str) -> Tensor:
    """x [M, K] @ w[N, K].T"""
    out = x.new_empty(x.shape[0], w.shape[0])
    if not _run(key, [x, w], out):
        torch.mm(x, w.t(), out=out)
    return out


def linear_fake(x: Tensor, w: Tensor, key: str) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


# ---------------------------------------------------------------- SwiGLU MLP


def mlp(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, key: str) -> Tensor:
    """down(silu(gate(x)) * up(x)) for x [M, hidden]."""
    out = x.new_empty(x.shape[0], w_down.shape[0])
    if not _run(key, [x, w_gate, w_up, w_down], out):
        torch.mm(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down.t(), out=out)
    return out


def mlp_fake(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, key: str) -> Tensor:
    return x.new_empty(x.shape[0], w_down.shape[0])


# ---------------------------------------------------------------- RMSNorm


def rmsnorm(x: Tensor, weight: Tensor, eps: float, key: str) -> Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)), normalised in float32, over the last dim."""
    rows = x.reshape(-1, x.shape[-1])
    out = rows.new_empty(rows.shape)  # contiguous, as rmsnorm_fake says (empty_like would keep a view's strides)
    if not _run(key, [rows, weight], out):
        xf = rows.float()
        torch.mul((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype), weight, out=out)
    return out.view(x.shape)


def rmsnorm_fake(x: Tensor, weight: Tensor, eps: float, key: str) -> Tensor:
    return x.new_empty(x.shape)  # contiguous, as the op returns it whatever x's strides


# ---------------------------------------------------------------- GQA attention


def _allowed(mask: Tensor) -> Optional[Tensor]:
    """The positions a boolean or additive (0 / -inf) mask lets attention see; None for any other mask (a bias)."""
    if mask.dtype == torch.bool:
        return mask
    allowed = mask == 0
    return allowed if bool((allowed | (mask == float("-inf"))).all()) else None


def prefix_length(mask: Optional[Tensor], kv_len: int) -> int | None:
    """For a decode mask over the KV cache (every query row the same prefix of True / 0.0 entries),
    the prefix length; None when the mask is anything else."""
    if mask is None:
        return kv_len
    if mask.dtype == torch.bool and mask.device.type == "cpu":
        return _host_prefix_length(mask.numpy(), kv_len)
    allowed = _allowed(mask)
    valid = None if allowed is None else _per_query_row(allowed, 1, kv_len)
    if valid is None:
        return None
    valid = valid.reshape(-1, kv_len)
    n = int(valid[0].sum())
    if not bool(valid[:, :n].all()) or bool(valid[:, n:].any()):
        return None
    return n


# The last decode mask read and its prefix length: every layer of a step gets the same mask tensor, so one read
# serves them all (on a GPU the read also waits for the device). A hit needs the same live tensor object at the
# same version counter, which every in-place torch op bumps; a boolean mask in host memory, which NumPy could
# write without a bump, must also still end its prefix where it did.
_last_prefix: tuple[weakref.ref, int, int, int | None] | None = None


def decode_prefix_length(mask: Optional[Tensor], kv_len: int) -> int | None:
    """`prefix_length`, remembered for the last mask tensor read (until it is freed or written)."""
    global _last_prefix
    if mask is None:
        return kv_len
    memo = _last_prefix  # one read: another thread may replace it meanwhile
    if (memo is not None and memo[0]() is mask and memo[1] == mask._version and memo[2] == kv_len
            and _same_boundary(mask, memo[3], kv_len)):
        return memo[3]
    n = prefix_length(mask, kv_len)
    _last_prefix = (weakref.ref(mask), mask._version, kv_len, n)
    return n


def _same_boundary(mask: Tensor, n: int | None, kv_len: int) -> bool:
    """For a boolean host mask over all `kv_len` keys that had prefix length `n`: key n-1 still allowed and key n
    still not, in every row (a decode step that moved the boundary in place, unseen by the version counter)."""
    if n is None or mask.dtype != torch.bool or mask.device.type != "cpu" or mask.shape[-1] != kv_len:
        return True
    a = mask.numpy()
    return (n == 0 or bool(a[..., n - 1].all())) and (n == kv_len or not a[..., n].any())


def _host_prefix_length(allowed: np.ndarray, kv_len: int) -> int | None:
    """`prefix_length` of a boolean mask in host memory, with NumPy: a few microseconds where the same torch
    ops cost ~40, once per layer and decode step."""
    shape = (*allowed.shape[:-2], 1, kv_len) if allowed.ndim >= 2 else (1, kv_len)
    try:
        rows = np.broadcast_to(allowed, shape).reshape(-1, kv_len)
    except ValueError:  # does not broadcast as SDPA would broadcast it
        return None
    n = int(np.count_nonzero(rows[0]))
    if not rows[:, :n].all() or rows[:, n:].any():
        return None
    return n


def is_causal_from_start(mask: Optional[Tensor], seq: int, kv_len: int, is_causal: bool) -> bool:
    """True when query i sees exactly keys 0..i (prefill from position 0 of the cache)."""
    if mask is None:
        return is_causal and seq == kv_len
    if is_causal:
        return False
    allowed = _allowed(mask)
    valid = None if allowed is None else _per_query_row(allowed, seq, kv_len)
    if valid is None:
        return False
    expected = torch.ones(seq, kv_len, dtype=torch.bool, device=valid.device).tril()
    return bool((valid == expected).all())


def attended_keys(mask: Optional[Tensor], kv_len: int) -> int:
    """How many leading keys some query may see under a mask in host memory over all `kv_len` keys (the last
    allowed key + 1), so that PyTorch's fallback attends to the filled part of a static cache only, as the
    model's eager code does on the CPU (a prompt's later chunk over a 2048-position cache, say). `kv_len` when
    nothing can be cut: no mask, a mask off the CPU (reading it back would stall the device), one broadcast
    over the keys, a bias, or one that allows no key."""
    if mask is None or mask.device.type != "cpu" or mask.dim() < 1 or mask.shape[-1] != kv_len:
        return kv_len
    allowed = _allowed(mask)
    if allowed is None:
        return kv_len
    seen = torch.nonzero(allowed.reshape(-1, kv_len).any(0))
    return int(seen[-1]) + 1 if seen.numel() else kv_len


def _per_query_row(allowed: Tensor, seq: int, kv_len: int) -> Optional[Tensor]:
    """`allowed` broadcast as SDPA broadcasts a mask (a [B, 1, 1, 1] mask allows every key, a [B, 1, 1, L]
    padding mask applies to every query) and flattened to [-1, seq, kv_len]; None when it does not broadcast."""
    shape = (*allowed.shape[:-2], seq, kv_len) if allowed.dim() >= 2 else (seq, kv_len)
    try:
        return torch.broadcast_to(allowed, shape).reshape(-1, seq, kv_len)
    except RuntimeError:
        return None


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, scale: float) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, key: str) -> Tensor:
    """GQA attention, q [B, H, S, D] over k, v [B, Hkv, L, D] (the whole static cache for decode).

    Decode (S == 1) runs the kernel with the KV length the mask allows; prefill runs it when the mask
    is causal from position 0. Anything else is computed by PyTorch (over the keys the mask lets some query
    see, `attended_keys`), and so is every call made while a CUDA graph is being captured: reading the mask
    back would break the capture, and a replayed graph would keep the KV length of the step it was captured at.
    """
    b, h, s, d = q.shape
    result = _bshd(q)
    kernel = REGISTRY.get(key)
    if kernel is not None and q.dtype == k.dtype == v.dtype and not _capturing(q):
        if s == 1:
            n = decode_prefix_length(mask, k.shape[2])
            if n is not None and n > 0 and _run(key, [q.reshape(b, h, d), k, v], result.view(b, h, d), (n,)):
                return result
        elif is_causal_from_start(mask, s, k.shape[2], is_causal):
            out = q.new_empty(b, h, s, d)
            if _run(key, [q, k[:, :, :s], v[:, :, :s]], out):
                return result.copy_(out)
    n = k.shape[2] if is_causal else attended_keys(mask, k.shape[2])  # is_causal aligns to key 0: no cut
    if n < k.shape[2]:
        k, v, mask = k[:, :, :n], v[:, :, :n], mask[..., :n]
    return result.copy_(_sdpa(q, k, v, mask, is_causal, 1.0 / math.sqrt(d)))


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _bshd(q: Tensor) -> Tensor:
    """[B, H, S, D] stored as [B, S, H, D]: the layout PyTorch's SDPA kernels return, which the graph's
    following transpose-and-view relies on."""
    b, h, s, d = q.shape
    return q.new_empty(b, s, h, d).permute(0, 2, 1, 3)


def attention_fake(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, key: str) -> Tensor:
    return _bshd(q)


# Registered with torch.library.Library rather than torch.library.custom_op: a call costs ~6 us
# instead of ~25 us, and a decode step of Llama-3.2-1B makes about a hundred of them.
_LIB = torch.library.Library("autocomp", "DEF")
_SCHEMAS = {
    "linear": ("linear(Tensor x, Tensor w, str key) -> Tensor", linear, linear_fake),
    "mlp": ("mlp(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, str key) -> Tensor", mlp, mlp_fake),
    "rmsnorm": ("rmsnorm(Tensor x, Tensor weight, float eps, str key) -> Tensor", rmsnorm, rmsnorm_fake),
    "attention": ("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, bool is_causal, str key) -> Tensor",
                  attention, attention_fake),
}
for _name, (_schema, _impl, _fake) in _SCHEMAS.items():
    _LIB.define(_schema)
    for _device in ("CPU", "CUDA"):
        _LIB.impl(_name, _impl, _device)
    torch.library.register_fake(f"autocomp::{_name}", _fake, lib=_LIB)

# The OpOverloads graph rewrites insert.
LINEAR = torch.ops.autocomp.linear.default
MLP = torch.ops.autocomp.mlp.default
RMSNORM = torch.ops.autocomp.rmsnorm.default
ATTENTION = torch.ops.autocomp.attention.default
