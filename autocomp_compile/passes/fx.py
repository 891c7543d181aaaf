"""Find attention, SwiGLU MLP, LM head, linear and RMSNorm subgraphs in aten-level FX graphs.

The graphs are the ones torch.compile hands to its inner compiler: functional aten ops after
AOT autograd (`mm` on a `permute`d weight for a linear, `_scaled_dot_product_*` for attention,
with or without a repeat-KV expansion in front of it). Each match knows its `Workload` and how to
replace itself with a call to a `torch.ops.autocomp.*` op. The SwiGLU activation is recognised by
evaluating the elementwise region between the three projections on random values, so that it does
not matter whether SiLU arrives as one op or decomposed into exp and reciprocal.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.operator_schemas import normalize_function

from autocomp_compile.passes import ALL_KINDS, ops  # ops registers torch.ops.autocomp.*
from autocomp_compile.workload import Workload, WorkloadError, make_workload

aten = torch.ops.aten
prims = torch.ops.prims

VIEW_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.squeeze.dim, aten.unsqueeze.default}
TRANSPOSE_2D = {aten.t.default, aten.permute.default, aten.transpose.int}
SDPA_OPS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,  # what SDPA with a mask becomes on Hopper GPUs
    aten.scaled_dot_product_attention.default,
}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
SYMBOLIC = "symbolic shape (dynamic shapes): kernels are built for static shapes; compile with dynamic=False"


@dataclass
class Match:
    """A recognised subgraph: its workload, the tensors the kernel reads, and how to replace it."""

    kind: str
    workload: Workload | None
    anchor: fx.Node  # the node whose value the replacement provides
    args: tuple[Any, ...]  # arguments of the autocomp op, without the kernel key
    op: Any
    reason: str = ""  # why the match cannot be replaced (workload is None then)
    covered: list[fx.Node] = field(default_factory=list)  # nodes the replacement makes dead

    def replace(self, graph: fx.Graph, key: str, replaced: dict[fx.Node, fx.Node] | None = None) -> fx.Node:
        """Insert the autocomp op for kernel `key` and give its result to the anchor's users. `replaced` maps
        the anchors of matches replaced before to their ops: an argument of this match can be one of them (a
        norm feeding a projection directly), which would otherwise keep the old subgraph alive and the
        earlier op dead. The map gains this match's anchor."""
        args = self.args if replaced is None else fx.map_arg(self.args, lambda n: replaced.get(n, n))
        with graph.inserting_before(self.anchor):
            new = graph.call_function(self.op, (*args, key))
        new.meta["val"] = self.anchor.meta.get("val")
        self.anchor.replace_all_uses_with(new)
        if replaced is not None:
            replaced[self.anchor] = new
        return new


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _static_shape(n: Any) -> tuple[int, ...] | None:
    v = _val(n)
    if not isinstance(v, torch.Tensor):
        return None
    shape = tuple(v.shape)
    return shape if all(isinstance(d, int) for d in shape) else None


def _dtype(n: fx.Node) -> str | None:
    v = _val(n)
    return DTYPE_NAMES.get(v.dtype) if isinstance(v, torch.Tensor) else None


def _strip_views(n: fx.Node) -> fx.Node:
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in VIEW_OPS:
        n = n.args[0]
    return n


def _is_weight(n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op in ("placeholder", "get_attr")


# ---------------------------------------------------------------- linear layers


@dataclass
class Linear:
    mm: fx.Node
    x: fx.Node  # [M, K] operand as the mm sees it
    weight: fx.Node  # [N, K]
    m: int
    n: int
    k: int


def _linear_operands(node: fx.Node) -> tuple[Any, fx.Node] | None:
    """(x, W) of `mm(x, transpose(W))` with W a graph input, else None."""
    if node.op != "call_function" or node.target != aten.mm.default:
        return None
    x, wt = node.args
    if not (isinstance(wt, fx.Node) and wt.op == "call_function" and wt.target in TRANSPOSE_2D):
        return None
    if wt.target == aten.permute.default and list(wt.args[1]) != [1, 0]:
        return None
    return (x, wt.args[0]) if _is_weight(wt.args[0]) else None


def find_linears(graph: fx.Graph) -> list[Linear]:
    """`mm(x, transpose(W))` with W a graph input of shape [N, K]: what `F.linear` becomes (no bias)."""
    found = []
    for node in graph.nodes:
        operands = _linear_operands(node)
        if operands is None:
            continue
        x, w = operands
        xs, ws = _static_shape(x), _static_shape(w)
        if xs is None or ws is None or len(ws) != 2:
            continue
        found.append(Linear(node, x, w, xs[0], ws[0], ws[1]))
    return found


def _symbolic_linears(graph: fx.Graph) -> list[fx.Node]:
    """Linear layers left out of find_linears because a shape is symbolic (dynamic shapes)."""
    found = []
    for node in graph.nodes:
        operands = _linear_operands(node)
        if operands is not None and any(_static_shape(t) is None for t in operands):
            found.append(node)
    return found


def _feeds_output(node: fx.Node) -> bool:
    """Whether `node` reaches the graph output through views and dtype casts only."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for user in n.users:
            if user.op == "output":
                return True
            if user in seen:
                continue
            seen.add(user)
            if user.target in VIEW_OPS or user.target == prims.convert_element_type.default \
                    or user.target == aten._to_copy.default or user.target == operator.getitem:
                stack.append(user)
    return False


# ---------------------------------------------------------------- SwiGLU MLP


def _is_elementwise(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    if n.target in VIEW_OPS or n.target in (prims.convert_element_type.default, aten._to_copy.default):
        return True
    if n.target in (aten.full.default, aten.scalar_tensor.default):
        return not n.all_input_nodes
    tags = getattr(n.target, "tags", ())
    return torch.Tag.pointwise in tags


def _elementwise_region(out: fx.Node, leaves: set[fx.Node]) -> tuple[list[fx.Node], set[fx.Node]] | None:
    """Nodes between `leaves` and `out` when every one of them is elementwise (or a view); else None."""
    region, reached, stack, seen = [], set(), [out], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in leaves:
            reached.add(n)
            continue
        if not _is_elementwise(n) or len(region) > 64:
            return None
        region.append(n)
        stack.extend(n.all_input_nodes)
    return region, reached


_CASTS = (prims.convert_element_type.default, aten._to_copy.default)


def _region_function(region: list[fx.Node], inputs: list[fx.Node], out: fx.Node, order: dict[fx.Node, int],
                     without_casts: bool = False) -> Callable:
    """The region as a function of `inputs`; `without_casts` makes every dtype cast in it the identity (the
    region's arithmetic alone, in the inputs' precision)."""
    g = fx.Graph()
    env = {n: g.placeholder(f"in{i}") for i, n in enumerate(inputs)}
    for n in sorted(region, key=order.__getitem__):
        if without_casts and n.target in _CASTS and isinstance(n.args[0], fx.Node):
            env[n] = env[n.args[0]]
            continue
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[out])
    return fx.GraphModule(torch.nn.Module(), g)


# Elementwise ops that threshold their input: never part of SwiGLU, and a clamp of the product (or a where
# on it) could pass a numeric probe whose values stay inside its bounds.
_THRESHOLDING = {"clamp", "clamp_min", "clamp_max", "clip", "where", "minimum", "maximum", "fmin", "fmax", "gt", "ge",
                 "lt", "le", "eq", "ne", "hardtanh", "relu", "threshold", "nan_to_num", "round", "floor", "ceil", "trunc"}


def _thresholds(region: list[fx.Node]) -> bool:
    return any(getattr(n.target, "_opname", None) in _THRESHOLDING for n in region)


def _swiglu_gate(fn: Callable, shape: tuple[int, ...], dtype: torch.dtype, exact_fn: Callable | None = None
                 ) -> int | None:
    """Which of the two inputs `fn` treats as the gate of silu(gate) * up, or None if it is not SwiGLU: probed
    with normal values and with signed values of every magnitude from 1e-3 to 1e3, in `dtype` and, with
    `exact_fn` (the region without its casts), in float64 as well, where a scale or offset that `dtype`'s
    rounding hides (a product times 1.01 in bf16) shows."""
    with unset_fake_temporarily():  # the inner compiler runs under FakeTensorMode; this needs real values
        gen = torch.Generator().manual_seed(1234)

        def wide() -> torch.Tensor:
            sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
            return sign * 10 ** (torch.rand(shape, generator=gen) * 6 - 3)

        pairs = [(torch.randn(shape, generator=gen) * 3, torch.randn(shape, generator=gen) * 3), (wide(), wide())]
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
        probes = [(fn, a.to(dtype), b.to(dtype), tol) for a, b in pairs]
        if exact_fn is not None:
            probes += [(exact_fn, a.double(), b.double(), 1e-9) for a, b in pairs]
        gates = set()
        for f, a, b, t in probes:
            try:
                got = f(a, b).double().reshape(shape)
            except Exception:  # the region is not a function of these two inputs alone
                return None
            gates.add(next((gate for gate, (g, u) in enumerate(((a, b), (b, a)))
                            if torch.allclose(got, F.silu(g.double()) * u.double(), rtol=t, atol=t)), None))
    return gates.pop() if len(gates) == 1 else None


def find_mlps(graph: fx.Graph, linears: list[Linear]) -> list[tuple[Linear, Linear, Linear]]:
    """(gate, up, down) triples: down(act(gate(x)) * up(x)) with act = SiLU."""
    by_mm = {lin.mm: lin for lin in linears}
    order = {n: i for i, n in enumerate(graph.nodes)}
    found = []
    for down in linears:
        got = _elementwise_region(down.x, set(by_mm))
        if got is None:
            continue
        region, reached = got
        if len(reached) != 2:
            continue
        p, q = sorted(reached, key=order.__getitem__)
        lp, lq = by_mm[p], by_mm[q]
        if _strip_views(lp.x) is not _strip_views(lq.x) or (lp.m, lp.n) != (lq.m, lq.n) or down.k != lp.n:
            continue
        if _thresholds(region):
            continue
        fn = _region_function(region, [p, q], down.x, order)
        exact = _region_function(region, [p, q], down.x, order, without_casts=True)
        gate = _swiglu_gate(fn, (lp.m, lp.n), _val(p).dtype, exact)
        if gate is None:
            continue
        found.append((lp, lq, down) if gate == 0 else (lq, lp, down))
    return found


# ---------------------------------------------------------------- RMSNorm


def _unwrap_cast(n: Any) -> Any:
    while isinstance(n, fx.Node) and n.target in (prims.convert_element_type.default, aten._to_copy.default):
        n = n.args[0]
    return n


def find_rmsnorms(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node, fx.Node, float]]:
    """(output, x, weight, eps): weight * cast(x * rsqrt(mean(x^2, -1, keepdim) + eps))."""
    found = []
    for rs in graph.nodes:
        if rs.target != aten.rsqrt.default:
            continue
        add = rs.args[0]
        if getattr(add, "target", None) != aten.add.Tensor or not isinstance(add.args[1], float) \
                or add.kwargs.get("alpha", 1) != 1:  # add(mean, eps, alpha=a) adds a * eps
            continue
        mean = add.args[0]
        if getattr(mean, "target", None) != aten.mean.dim or list(mean.args[1]) not in ([-1],) or not (
                len(mean.args) > 2 and mean.args[2]):
            continue
        sq = mean.args[0]
        if getattr(sq, "target", None) != aten.pow.Tensor_Scalar or sq.args[1] != 2:
            continue
        xf = sq.args[0]
        for norm in rs.users:
            if norm.target != aten.mul.Tensor or set(norm.args) != {xf, rs}:
                continue
            casted = norm
            users = list(norm.users)
            if len(users) == 1 and users[0].target in (prims.convert_element_type.default, aten._to_copy.default):
                casted = users[0]
                if _val(casted).dtype != _val(_unwrap_cast(xf)).dtype:
                    continue  # rounded to another precision than x's: the op (which casts back to x's) would not
            for scale in casted.users:
                if scale.target != aten.mul.Tensor:
                    continue
                other = scale.args[0] if scale.args[1] is casted else scale.args[1]
                ws, xv = _static_shape(other), _val(xf)
                # x's leading dims may be symbolic (dynamic shapes): listed then, with that reason
                if _is_weight(other) and ws is not None and isinstance(xv, torch.Tensor) and xv.dim() >= 1 \
                        and ws == (xv.shape[-1],):
                    found.append((scale, _unwrap_cast(xf), other, float(add.args[1])))
    return found


# ---------------------------------------------------------------- attention


def _unrepeat_kv(n: fx.Node) -> fx.Node:
    """The [B, Hkv, L, D] tensor behind Hugging Face's repeat_kv (unsqueeze, expand, reshape), or `n`."""
    m = _strip_views(n)
    if getattr(m, "target", None) == aten.clone.default:
        m = _strip_views(m.args[0])
    if getattr(m, "target", None) != aten.expand.default:
        return n
    src = m.args[0]
    while getattr(src, "target", None) == aten.slice.Tensor and src.args[2:] in ((0, 9223372036854775807), ()):
        src = src.args[0]
    if getattr(src, "target", None) != aten.unsqueeze.default or src.args[1] != 2:
        return n
    base = src.args[0]
    bs, es, ns = _static_shape(base), _static_shape(m), _static_shape(n)
    if bs is None or es is None or len(bs) != 4 or len(es) != 5 or (es[0], es[1], es[3], es[4]) != bs:
        return n
    # the copies must become heads ([B, Hkv * n, L, D]), not keys ([B, Hkv, n * L, D] tiles the sequence)
    if ns is None or tuple(ns) != (es[0], es[1] * es[2], es[3], es[4]):
        return n
    return base


def _attention_args(node: fx.Node) -> dict[str, Any] | None:
    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if normalized is None:
        return None
    kw = dict(normalized.kwargs)
    if "attn_bias" in kw:
        kw["attn_mask"] = kw.pop("attn_bias")
    return kw


def _mask_source(mask: Any) -> Any:
    """A boolean mask turned additive by `where(mask, 0, -inf)`: pass the boolean mask instead."""
    if getattr(mask, "target", None) == aten.where.self:
        cond, a, b = mask.args
        fa, fb = (getattr(x, "target", None) for x in (a, b))
        if fa == fb == aten.full.default and a.args[1] == 0.0 and b.args[1] == float("-inf"):
            return cond
    return mask


# ---------------------------------------------------------------- putting it together


def _output_of(node: fx.Node) -> fx.Node | None:
    """The tensor result of an SDPA node (item 0 of its tuple, when it returns one)."""
    if node.target == aten.scaled_dot_product_attention.default:
        return node
    outs = [u for u in node.users if u.target == operator.getitem]
    firsts = [u for u in outs if u.args[1] == 0]
    if len(firsts) != 1 or any(u.users for u in outs if u.args[1] != 0):
        return None
    return firsts[0]


def _make(kind: str, dtype: str, **params: Any) -> tuple[Workload | None, str]:
    try:
        return make_workload(kind, dtype, **params), ""
    except WorkloadError as exc:
        return None, str(exc)


def find_attention(graph: fx.Graph) -> list[Match]:
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in SDPA_OPS:
            continue
        out = _output_of(node)
        kw = _attention_args(node)
        if out is None or kw is None:
            continue
        q, k, v = kw["query"], _unrepeat_kv(kw["key"]), _unrepeat_kv(kw["value"])
        mask, causal = _mask_source(kw.get("attn_mask")), bool(kw.get("is_causal", False))
        qs, ks, vs = _static_shape(q), _static_shape(k), _static_shape(v)
        dtype = _dtype(q)

        def skip(reason: str) -> None:
            found.append(Match("attention", None, out, (), ops.ATTENTION, reason))

        if qs is None or ks is None or vs is None:
            skip("symbolic shapes (the KV length changes per call); use a static KV cache")
            continue
        if dtype is None or _dtype(k) != dtype or _dtype(v) != dtype:
            skip(f"dtype {_val(q).dtype} not supported")
            continue
        (b, h, s, d), (_, hk, lk, _) = qs, ks
        scale = kw.get("scale")
        if float(kw.get("dropout_p", 0.0) or 0.0) != 0.0:
            skip("dropout")
            continue
        if scale is not None and not math.isclose(scale, 1 / math.sqrt(d), rel_tol=1e-6):
            skip(f"scale {scale} is not 1/sqrt(head_dim)")
            continue
        if ks != vs or h % hk or ks[0] != b or ks[3] != d:
            skip(f"q {qs}, k {ks}, v {vs} do not form GQA attention")
            continue
        if s == 1:
            if causal and lk > 1:
                skip("is_causal with one query row attends to the first key only; not decode attention")
                continue
            w, why = _make("attention", dtype, phase="decode", batch=b, heads=h, kv_heads=hk, head_dim=d,
                           kv_len=max(1, lk // 2), max_kv_len=lk)
        else:
            if not causal and mask is None:
                skip("non-causal prefill attention")
                continue
            w, why = _make("attention", dtype, phase="prefill", batch=b, heads=h, kv_heads=hk, head_dim=d, seq_len=s)
        found.append(Match("attention", w, out, (q, k, v, mask, causal), ops.ATTENTION, why))
    return found


def find_subgraphs(gm: fx.GraphModule, kinds: Sequence[str] = ALL_KINDS,
                   released: frozenset[fx.Node] = frozenset()) -> list[Match]:
    """Every recognised subgraph of `gm`, in graph order; a Match with `workload=None` says why it cannot run.

    An MLP that is not in `kinds`, or whose anchor is in `released` (left to PyTorch), is still listed, but
    its three projections are listed as linears too.
    """
    graph = gm.graph
    matches: list[Match] = []
    linears = find_linears(graph)
    in_mlp: set[fx.Node] = set()
    for gate, up, down in find_mlps(graph, linears):
        dtype = _dtype(down.mm)
        dtypes = {_val(n).dtype for n in (gate.x, gate.weight, up.weight, down.weight, gate.mm, up.mm, down.mm)}
        if len(dtypes) > 1:  # e.g. a down projection kept in float32: the op computes in one dtype
            w, why = None, f"mixed dtypes ({', '.join(sorted(str(d).removeprefix('torch.') for d in dtypes))})"
        elif dtype:
            w, why = _make("mlp", dtype, batch=gate.m, hidden=gate.k, intermediate=gate.n)
        else:
            w, why = None, f"dtype {_val(down.mm).dtype} not supported"
        matches.append(Match("mlp", w, down.mm, (gate.x, gate.weight, up.weight, down.weight), ops.MLP, why,
                             [gate.mm, up.mm]))
        if w is not None and "mlp" in kinds and down.mm not in released:
            in_mlp.update((gate.mm, up.mm, down.mm))
    for lin in linears:
        if lin.mm in in_mlp:
            continue
        dtype = _dtype(lin.mm)
        if dtype is None:
            matches.append(Match("gemm", None, lin.mm, (), ops.LINEAR, f"dtype {_val(lin.mm).dtype} not supported"))
        elif _feeds_output(lin.mm) and lin.n > lin.k:  # the model's last projection, onto a vocabulary
            w, why = _make("lm_head", dtype, batch=lin.m, hidden=lin.k, vocab=lin.n)
            matches.append(Match("lm_head", w, lin.mm, (lin.x, lin.weight), ops.LINEAR, why))
        else:
            w, why = _make("gemm", dtype, m=lin.m, n=lin.n, k=lin.k)
            matches.append(Match("gemm", w, lin.mm, (lin.x, lin.weight), ops.LINEAR, why))
    for mm in _symbolic_linears(graph):
        matches.append(Match("gemm", None, mm, (), ops.LINEAR, SYMBOLIC))
    for out, x, weight, eps in find_rmsnorms(graph):
        xs, dtype = _static_shape(x), _dtype(out)
        why = (SYMBOLIC if xs is None else f"dtype {_val(out).dtype} not supported" if dtype is None
               else f"mixed dtypes ({_val(x).dtype} in, {_val(out).dtype} out)" if _dtype(x) != dtype else "")
        if why:
            matches.append(Match("rmsnorm", None, out, (), ops.RMSNORM, why))
            continue
        w, why = _make("rmsnorm", dtype, rows=math.prod(xs[:-1]), hidden=xs[-1], eps=eps)
        matches.append(Match("rmsnorm", w, out, (x, weight, eps), ops.RMSNORM, why))
    matches.extend(find_attention(graph))
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(matches, key=lambda m: order[m.anchor])
