"""Relax dataflow patterns for the regions the TVM pass offloads, and the checks that turn a match into a Workload.

One table, `PATTERNS`, in priority order (a region that overlaps an earlier one is left alone):
`("autocomp.attention", pattern, annotations, check)`, as TVM's BYOC tables are written. Each check
returns a `Region`: a Workload and the Relax values that become the kernel's arguments, or the reason
the match cannot be offloaded.

The patterns cover what TVM 0.27's two frontends produce for a Llama decode step:
`relax.frontend.torch.from_exported_program` (linear = `matmul(x, permute_dims(W))`; SDPA decomposed
into scale, `matmul`, `softmax` with an all-masked-row guard, `matmul`; GQA as expand/broadcast/reshape)
and `relax.frontend.onnx.from_onnx` (linear = `matmul(x, W_t)` with the weight stored transposed;
RMSNorm as `1 / sqrt`; SDPA without the guard).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import tvm
from tvm import relax
from tvm.relax.dpl import DFPattern, is_const, is_op, wildcard

from autocomp_compile.workload import Workload, WorkloadError, make_workload

Constant = tvm.ir.expr.Constant
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class Region:
    """A matched region: what to offload (`workload`, `args`) or why not (`reason`)."""

    kind: str
    output: relax.Expr  # the matched expression whose value the kernel produces
    workload: Workload | None = None
    reason: str = ""
    # Kernel arguments, in the workload's input order; ("transpose", expr) asks for a transposed weight.
    args: list[Any] = field(default_factory=list)
    kernel_shape: tuple[int, ...] = ()  # shape the kernel writes (reshaped to the region's own shape after)
    runtime_dims: tuple[int, ...] = ()


# A check returns the Region, or None when the match is not a region at all (an activation matmul).
Check = Callable[..., "Region | None"]


# ---------------------------------------------------------------- small pattern combinators


def _maybe(op: str, p: DFPattern, *extra: DFPattern) -> DFPattern:
    return is_op(op)(p, *extra) | p


def op_name(e: Any) -> str:
    """"relax.matmul" for a call of that op; "" for anything else."""
    op = getattr(e, "op", None) if isinstance(e, relax.Call) else None
    return getattr(op, "name", "") or ""


def _reshaped(p: DFPattern) -> DFPattern:
    return _maybe("relax.reshape", p, wildcard())


def _viewed(p: DFPattern) -> DFPattern:
    """`p`, or `p` broadcast and/or reshaped (how the frontends batch a 4-D matmul operand)."""
    return _reshaped(_maybe("relax.broadcast_to", p, wildcard()))


def _repeated_kv(t: DFPattern) -> tuple[DFPattern, DFPattern, DFPattern, DFPattern]:
    """GQA's repeat of keys/values over the query group: reshape(broadcast_to(expand_dims(t))).

    Returns (repeat or `t`, the reshape, the expand_dims, the broadcast_to); `check_attention` checks
    the axis and shapes (a tiled repeat has the same ops).
    """
    expand = is_op("relax.expand_dims")(t)
    broadcast = is_op("relax.broadcast_to")(expand, wildcard())
    rep = is_op("relax.reshape")(broadcast, wildcard())
    return rep | t, rep, expand, broadcast


def _weighted(x: DFPattern) -> tuple[DFPattern, DFPattern, DFPattern]:
    """`matmul(x, permute_dims(w))` (torch frontend) or `matmul(x, w)` (ONNX, weight stored [k, n])."""
    w = wildcard()
    wt = is_op("relax.permute_dims")(w)
    return is_op("relax.matmul")(x, wt | w), w, wt


# ---------------------------------------------------------------- shapes, dtypes, weights


def shape_of(e: relax.Expr) -> tuple[int, ...] | None:
    ty = getattr(e, "struct_info", None) or getattr(e, "ty", None)
    shape = getattr(ty, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None  # symbolic


def dtype_of(e: relax.Expr) -> str | None:
    ty = getattr(e, "struct_info", None) or getattr(e, "ty", None)
    return DTYPES.get(str(getattr(ty, "dtype", "")))


def is_weight(e: relax.Expr, func: relax.Function) -> bool:
    """A constant, or a parameter after the function's `num_input` runtime inputs (frontends' params)."""
    if isinstance(e, Constant):
        return True
    if not isinstance(e, relax.Var):
        return False
    attrs = func.attrs
    n_inputs = int(attrs["num_input"]) if attrs is not None and "num_input" in attrs else None
    params = list(func.params)
    for i, p in enumerate(params):
        if p.same_as(e):
            return n_inputs is not None and i >= n_inputs
    return False


def constant_array(e: Constant) -> Any:
    """A constant's value as a NumPy array."""
    return e.value.numpy()


def constant_value(e: relax.Expr) -> float | None:
    if isinstance(e, Constant):
        arr = constant_array(e)
        if arr.size == 1:
            return float(arr.reshape(-1)[0])
    return None


def _make(kind: str, dtype: str | None, **params: Any) -> tuple[Workload | None, str]:
    if dtype is None:
        return None, "dtype not supported (float32, bfloat16, float16)"
    try:
        return make_workload(kind, dtype, **params), ""
    except WorkloadError as exc:
        return None, str(exc)


def _weight_arg(m: dict[str, relax.Expr], w: str, wt: str) -> Any:
    """The weight as the kernel wants it, [n, k]: the permuted tensor itself, or a transpose of a [k, n] one."""
    return m[w] if wt in m else ("transpose", m[w])


def _weight_nk(m: dict[str, relax.Expr], w: str, wt: str) -> tuple[int, int] | None:
    s = shape_of(m[w])
    if s is None or len(s) != 2:
        return None
    return s if wt in m else (s[1], s[0])


def _transposes_2d(call: relax.Expr) -> bool:
    """A `permute_dims` of a rank-2 tensor with axes [1, 0] (or None: reversed)."""
    axes = getattr(call.attrs, "axes", None)
    return axes is None or [int(a) for a in axes] == [1, 0]


def _weights_transposed(m: dict[str, relax.Expr], *wts: str) -> bool:
    """Every matched weight `permute_dims` among `wts` is a true transpose (not the identity)."""
    return all(_transposes_2d(m[wt]) for wt in wts if wt in m)


def _permutes_last_two(call: relax.Expr) -> bool:
    axes = getattr(call.attrs, "axes", None)
    if axes is None:
        return False
    axes = [int(a) for a in axes]
    n = len(axes)
    return n >= 2 and axes[:-2] == list(range(n - 2)) and axes[-2:] == [n - 1, n - 2]


# ---------------------------------------------------------------- linear (gemm / LM head)

_PASS_THROUGH = ("relax.reshape", "relax.astype", "relax.permute_dims", "relax.strided_slice", "relax.squeeze")


def lm_head_weights(func: relax.Function, var2val: dict) -> list[relax.Expr]:
    """Weights of the linear layers whose result is a function output (up to views): the model's head."""
    found: list[relax.Expr] = []
    stack, seen = [func.body.body], set()
    while stack:
        e = stack.pop()
        if e in seen:
            continue
        seen.add(e)
        if isinstance(e, relax.Var) and e in var2val:
            stack.append(var2val[e])
        elif isinstance(e, relax.Tuple):
            stack.extend(e.fields)
        elif op_name(e) in _PASS_THROUGH:
            stack.append(e.args[0])
        elif op_name(e) == "relax.matmul":
            w = var2val.get(e.args[1], e.args[1])
            if op_name(w) == "relax.permute_dims":
                w = w.args[0]
            found.append(w)
    return found



def linear_pattern() -> tuple[DFPattern, dict[str, DFPattern]]:
    x = wildcard()
    out, w, wt = _weighted(x)
    return out, {"x": x, "w": w, "wt": wt, "out": out}


def check_linear(m: dict[str, relax.Expr], func: relax.Function,
                 head_weights: Sequence[relax.Expr] = ()) -> Region | None:
    out = m["out"]
    if not is_weight(m["w"], func):
        return None  # q @ k^T and the like: not a layer
    if not _weights_transposed(m, "wt"):
        return Region("gemm", out, reason="the weight's permute_dims is not a transpose")
    xs, nk = shape_of(m["x"]), _weight_nk(m, "w", "wt")
    if xs is None or nk is None or len(xs) < 2:
        return Region("gemm", out, reason=f"shapes {xs} x {nk} are symbolic or not a linear layer")
    n, k = nk
    if xs[-1] != k:
        return Region("gemm", out, reason=f"inner dims differ: x {xs}, weight [n={n}, k={k}]")
    dtype = dtype_of(out)
    if dtype is None or dtype_of(m["x"]) != dtype or dtype_of(m["w"]) != dtype:
        return Region("gemm", out, reason="mixed or unsupported dtypes")
    rows = math.prod(xs[:-1])
    is_lm_head = any(m["w"].same_as(w) for w in head_weights) and n > k
    if is_lm_head:
        w, why = _make("lm_head", dtype, batch=rows, hidden=k, vocab=n)
    else:
        w, why = _make("gemm", dtype, m=rows, n=n, k=k)
    args = [m["x"], _weight_arg(m, "w", "wt")]
    return Region("lm_head" if is_lm_head else "gemm", out, w, why, args, (rows, n))


# ---------------------------------------------------------------- SwiGLU MLP


def mlp_pattern() -> tuple[DFPattern, dict[str, DFPattern]]:
    xg, xu = wildcard(), wildcard()
    gate, wg, wgt = _weighted(xg)
    up, wu, wut = _weighted(xu)
    g, u = _reshaped(gate), _reshaped(up)
    gf = _maybe("relax.astype", g)  # bf16 models compute SiLU in float32
    act = _maybe("relax.astype", is_op("relax.multiply")(gf, is_op("relax.sigmoid")(gf)) | is_op("relax.nn.silu")(gf))
    prod = is_op("relax.multiply")(act, u) | is_op("relax.multiply")(u, act)
    hidden = _reshaped(prod)
    out, wd, wdt = _weighted(hidden)
    return out, {"xg": xg, "xu": xu, "wg": wg, "wgt": wgt, "wu": wu, "wut": wut, "wd": wd, "wdt": wdt,
                 "gate": gate, "up": up, "prod": prod, "out": out}


def _same_input(a: relax.Expr, b: relax.Expr) -> bool:
    """Two operands that hold the same tensor (the torch frontend reshapes the input once per projection)."""
    if a.same_as(b):
        return True
    if op_name(a) == op_name(b) == "relax.reshape":
        return a.args[0].same_as(b.args[0]) and shape_of(a) == shape_of(b)
    return False


def check_mlp(m: dict[str, relax.Expr], func: relax.Function) -> Region:
    out = m["out"]
    if not all(is_weight(m[w], func) for w in ("wg", "wu", "wd")):
        return Region("mlp", out, reason="a projection's right operand is not a weight")
    if not _same_input(m["xg"], m["xu"]):
        return Region("mlp", out, reason="gate and up projections read different tensors")
    if not _weights_transposed(m, "wgt", "wut", "wdt"):
        return Region("mlp", out, reason="a weight's permute_dims is not a transpose")
    xs = shape_of(m["xg"])
    g, u, d = (_weight_nk(m, w, wt) for w, wt in (("wg", "wgt"), ("wu", "wut"), ("wd", "wdt")))
    if xs is None or None in (g, u, d):
        return Region("mlp", out, reason="symbolic shapes")
    (i, h), hd = g, d
    if u != (i, h) or hd != (h, i) or xs[-1] != h:
        return Region("mlp", out, reason=f"projection shapes gate {g}, up {u}, down {d} do not form a SwiGLU MLP")
    dtype = dtype_of(out)
    if dtype is None or any(dtype_of(m[w]) != dtype for w in ("xg", "wg", "wu", "wd")):
        return Region("mlp", out, reason="mixed or unsupported dtypes")
    rows = math.prod(xs[:-1])
    w, why = _make("mlp", dtype, batch=rows, hidden=h, intermediate=i)
    args = [m["xg"], _weight_arg(m, "wg", "wgt"), _weight_arg(m, "wu", "wut"), _weight_arg(m, "wd", "wdt")]
    return Region("mlp", out, w, why, args, (rows, h))


# ---------------------------------------------------------------- RMSNorm


def rmsnorm_pattern() -> tuple[DFPattern, dict[str, DFPattern]]:
    x, w, exponent, eps, one = wildcard(), wildcard(), is_const(), is_const(), is_const()
    xf = _maybe("relax.astype", x)
    ms = is_op("relax.mean")(is_op("relax.power")(xf, exponent))
    var_eps = is_op("relax.add")(ms, eps)
    inv = is_op("relax.rsqrt")(var_eps) | is_op("relax.divide")(one, is_op("relax.sqrt")(var_eps))
    normed = _maybe("relax.astype", is_op("relax.multiply")(xf, inv))
    out = is_op("relax.multiply")(w, normed) | is_op("relax.multiply")(normed, w)
    return out, {"x": x, "w": w, "exponent": exponent, "eps": eps, "one": one, "mean": ms, "out": out}


def check_rmsnorm(m: dict[str, relax.Expr], func: relax.Function) -> Region:
    out = m["out"]
    if not is_weight(m["w"], func):
        return Region("rmsnorm", out, reason="the scale is not a weight")
    if constant_value(m["exponent"]) != 2.0:
        return Region("rmsnorm", out, reason="not a mean of squares")
    if "one" in m and constant_value(m["one"]) != 1.0:
        return Region("rmsnorm", out, reason="the reciprocal's numerator is not 1")
    if not getattr(m["mean"].attrs, "keepdims", False):
        return Region("rmsnorm", out, reason="the mean does not keep its axis (not a per-row scale)")
    axes = getattr(m["mean"].attrs, "axis", None)
    xs, ws = shape_of(m["x"]), shape_of(m["w"])
    if xs is None or ws is None:
        return Region("rmsnorm", out, reason="symbolic shapes (the row count changes per call)")
    if xs is None or ws != (xs[-1],) or axes is None or [int(a) % len(xs) for a in axes] != [len(xs) - 1]:
        return Region("rmsnorm", out, reason=f"not a normalisation over the last axis (x {xs}, weight {ws})")
    eps = constant_value(m["eps"])
    dtype = dtype_of(out)
    if eps is None or dtype is None or dtype_of(m["x"]) != dtype or dtype_of(m["w"]) != dtype:
        return Region("rmsnorm", out, reason="mixed or unsupported dtypes")
    rows = math.prod(xs[:-1])
    w, why = _make("rmsnorm", dtype, rows=rows, hidden=xs[-1], eps=eps)
    return Region("rmsnorm", out, w, why, [m["x"], m["w"]], (rows, xs[-1]))


# ---------------------------------------------------------------- GQA attention


def attention_pattern() -> tuple[DFPattern, dict[str, DFPattern]]:
    q, k, v = wildcard(), wildcard(), wildcard()
    # bf16 models attend in float32: upcast inputs, downcast output
    k_any, k_rep, k_exp, k_bc = _repeated_kv(_maybe("relax.astype", k))
    _, v_rep, v_exp, v_bc = _repeated_kv(_maybe("relax.astype", v))
    q_scale, k_scale = is_const(), is_const()
    k_perm = is_op("relax.permute_dims")(k_any)
    kt = _reshaped(k_perm)
    lhs = _viewed(_maybe("relax.multiply", _maybe("relax.astype", q), q_scale))
    rhs = _viewed(_maybe("relax.multiply", kt, k_scale))
    scores = _reshaped(is_op("relax.matmul")(lhs, rhs))
    probs = is_op("relax.nn.softmax")(scores)
    # torch's decomposition zeroes rows whose scores are all -inf (a fully masked row)
    all_masked = is_op("relax.logical_not")(is_op("relax.astype")(is_op("relax.max")(
        is_op("relax.astype")(is_op("relax.logical_not")(is_op("relax.equal")(scores, is_const()))))))
    guarded = is_op("relax.where")(all_masked, is_op("relax.full_like")(probs, wildcard()), probs) | probs
    # the repeat first: otherwise the operand's own views would swallow the repeat's reshape/broadcast
    pv = is_op("relax.matmul")(_viewed(guarded), _viewed(v_rep) | _viewed(_maybe("relax.astype", v)))
    out = is_op("relax.astype")(_reshaped(pv)) | pv
    return out, {"q": q, "k": k, "v": v, "k_rep": k_rep, "v_rep": v_rep, "k_exp": k_exp, "v_exp": v_exp,
                 "k_bc": k_bc, "v_bc": v_bc, "q_scale": q_scale, "k_scale": k_scale,
                 "k_perm": k_perm, "probs": probs, "pv": pv, "out": out}


def _repeats_per_group(m: dict[str, relax.Expr], t: str, b: int, h: int) -> bool:
    """`t`'s repeat (if any) gives query head i the KV head i // (h // hk), as Hugging Face's repeat_kv:
    expand_dims at axis 2 of a rank-4 tensor, broadcast to (b, hk, g, L, d), reshape to (b, h, L, d)
    (or (b * h, L, d): the ONNX frontend batches the matmul)."""
    if f"{t}_rep" not in m:
        return True
    exp, bc, rep = m[f"{t}_exp"], m[f"{t}_bc"], m[f"{t}_rep"]
    src = shape_of(exp.args[0])
    axes = getattr(exp.attrs, "axis", None)
    if src is None or len(src) != 4 or axes is None or [int(a) % 5 for a in axes] != [2]:
        return False
    _, hk, lk, d = src
    return (hk > 0 and h % hk == 0 and shape_of(bc) == (b, hk, h // hk, lk, d)
            and shape_of(rep) in ((b, h, lk, d), (b * h, lk, d)))


def check_attention(m: dict[str, relax.Expr], func: relax.Function) -> Region:
    out = m["out"]
    qs, ks, vs = shape_of(m["q"]), shape_of(m["k"]), shape_of(m["v"])
    if qs is None or ks is None or vs is None:
        return Region("attention", out, reason="symbolic shapes (the KV length changes per call)")
    if len(qs) != 4 or len(ks) != 4 or ks != vs:
        return Region("attention", out, reason=f"q {qs}, k {ks}, v {vs} are not [batch, heads, seq, head_dim]")
    (b, h, s, d), (_, hk, lk, _) = qs, ks
    if ("k_rep" in m) != ("v_rep" in m) or ("k_rep" not in m and hk != h) or h % hk or ks[0] != b or ks[3] != d:
        return Region("attention", out, reason=f"q {qs}, k {ks}, v {vs} do not form GQA attention")
    if not (_repeats_per_group(m, "k", b, h) and _repeats_per_group(m, "v", b, h)):
        return Region("attention", out, reason="keys/values are not repeated per query group (kv head = head // group)")
    if not _permutes_last_two(m["k_perm"]):
        return Region("attention", out, reason="keys are not transposed over their last two axes")
    scale = math.prod(constant_value(m[c]) or float("nan") if c in m else 1.0 for c in ("q_scale", "k_scale"))
    if not math.isclose(scale, 1 / math.sqrt(d), rel_tol=1e-5):
        return Region("attention", out, reason=f"scale {scale} is not 1/sqrt(head_dim)")
    ps, axis = shape_of(m["probs"]), int(getattr(m["probs"].attrs, "axis", -1))
    if ps not in ((b, h, s, lk), (b * h, s, lk)) or axis % len(ps) != len(ps) - 1:
        return Region("attention", out, reason=f"softmax over axis {axis} of {ps} is not over the {lk} keys of "
                                               "each query row")
    if shape_of(m["pv"]) not in ((b, h, s, d), (b * h, s, d)):
        return Region("attention", out, reason=f"probabilities x values gives {shape_of(m['pv'])}, not one "
                                               "row per query head")
    dtype = dtype_of(m["q"])
    if dtype is None or dtype_of(m["k"]) != dtype or dtype_of(m["v"]) != dtype or dtype_of(out) != dtype:
        return Region("attention", out, reason="mixed or unsupported dtypes")
    if s != 1:
        return Region("attention", out, reason="prefill attention without a causal mask (only decode is offloaded)")
    w, why = _make("attention", dtype, phase="decode", batch=b, heads=h, kv_heads=hk, head_dim=d,
                   kv_len=max(1, lk // 2), max_kv_len=lk)
    return Region("attention", out, w, why, [m["q"], m["k"], m["v"]], (b, h, d), (lk,))


PATTERNS: list[tuple[str, Callable[[], tuple[DFPattern, dict[str, DFPattern]]], Check]] = [
    ("autocomp.attention", attention_pattern, check_attention),
    ("autocomp.mlp", mlp_pattern, check_mlp),
    ("autocomp.linear", linear_pattern, check_linear),
    ("autocomp.rmsnorm", rmsnorm_pattern, check_rmsnorm),
]
