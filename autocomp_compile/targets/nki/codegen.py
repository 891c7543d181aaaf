"""NKI kernel source for each workload kind from a schedule (`knobs`).

Kernels are NKI 0.1 (`neuronxcc.nki`): `kernel(*inputs, *runtime_dims)` returns its HBM output. Weights come
in PyTorch's [out, in] layout, so the contraction dim is on the free axis; tiles are put on partitions by
TensorE transposes (`nisa.nc_transpose`) and evacuated from PSUM before the matmul that uses them.

Families: "gemv" (gemm, lm_head, mlp: weight-stationary matmuls, out^T = W x^T), "rmsnorm", "attention".
"""
from __future__ import annotations

import textwrap
from typing import Any

from autocomp_compile.targets.nki.emulator import MOVING_FMAX, SBUF_BYTES_PER_PARTITION
from autocomp_compile.workload import Workload, WorkloadError

# nki-3: attention scores leave PSUM on VectorE before affine_select (GpSimd); nki-4: affine_select gets one
# comparison (NKI refuses `&`), inner loops are nl.static_range (a bare `range` is a sequential_range in NKI).
CODEGEN_VERSION = "nki-4"
P = 128

HEADER = """import neuronxcc.nki as nki
import neuronxcc.nki.language as nl
import neuronxcc.nki.isa as nisa
"""

KNOB_CHOICES: dict[str, dict[str, tuple]] = {
    "gemv": dict(loop=("sequential", "affine"), hoist_x=(False, True), psum_acc=(False, True), load_k=(128, 512, 2048),
                 tb=(1, 2, 4), evac=("vector", "split"), fuse=(False, True)),
    "rmsnorm": dict(loop=("sequential", "affine"), spread=(False, True), fused_sq=(False, True),
                    fused_scale=(False, True)),
    "attention": dict(loop=("sequential", "affine"), group=(False, True), kv_tile=(128, 256, 512),
                      exp_fused=(False, True), psum_acc=(False, True), defer_norm=(False, True),
                      causal_skip=(False, True)),
}


def family(kind: str) -> str:
    if kind in ("gemm", "lm_head", "mlp"):
        return "gemv"
    if kind in ("rmsnorm", "attention"):
        return kind
    raise WorkloadError(f"the NKI target has no kernel for workload kind {kind!r}")


# The gemv family's dims that its 128-row tiles must divide, under their workload parameter names.
_TILED_PARAMS = {"gemm": ("k", "n"), "lm_head": ("hidden", "vocab"), "mlp": ("hidden", "intermediate")}


# SBUF bytes per partition the kernels keep live per element of a full row (measured peaks over every schedule,
# rounded up): attention's fp32 score rows (scores, shifted, exp, probabilities, ...) per key.
_SCORE_BYTES_PER_KEY = 32
_GEMV_WORKING_BYTES = 32 * 1024  # weight blocks, transposed tiles and accumulators next to the resident x^T


def check(w: Workload) -> None:
    """Raise `WorkloadError` when no kernel of this code generator computes `w` (a shape its tiling does not cover,
    or one whose tiles break the trn1 limits the emulator enforces)."""
    fam = family(w.kind)
    if fam == "gemv":
        _check_gemv(w)
    elif fam == "attention":
        _check_attention(w)
    else:
        _check_fits("RMSNorm kernels keep a row of", "hidden", w.params["hidden"], _rms_bytes_per_element(w))


def _check_fits(what: str, name: str, n: int, bytes_per: int) -> None:
    limit = SBUF_BYTES_PER_PARTITION // bytes_per
    if n > limit:
        raise WorkloadError(f"nki: {what} {name}={n} elements in SBUF ({bytes_per} bytes per element per partition); "
                            f"the {SBUF_BYTES_PER_PARTITION // 1024} KiB of a trn1 partition fit {name} <= {limit}")


def _check_gemv(w: Workload) -> None:
    names = _TILED_PARAMS[w.kind]
    if any(w.params[n] % P for n in names):
        got = ", ".join(f"{n}={w.params[n]}" for n in names)
        raise WorkloadError(f"nki: {w.kind} kernels need {' and '.join(names)} to be multiples of {P}, got {got}")
    b, kdim, _ = _dims(w)
    rows = "m" if w.kind == "gemm" else "batch"
    if b > MOVING_FMAX:
        raise WorkloadError(f"nki: {w.kind} kernels put the {rows} rows on a matmul's moving free axis and in one PSUM "
                            f"bank: {rows} <= {MOVING_FMAX}, got {b}")
    resident = (kdim + (w.params["intermediate"] if w.kind == "mlp" else 0)) // P * b * _itemsize(w)
    if resident + _GEMV_WORKING_BYTES > SBUF_BYTES_PER_PARTITION:
        raise WorkloadError(f"nki: {w.kind} kernels keep x^T{' and the SwiGLU activations' if w.kind == 'mlp' else ''} "
                            f"in SBUF: {resident} bytes per partition for {rows}={b}, more than fit next to the working "
                            f"tiles in {SBUF_BYTES_PER_PARTITION // 1024} KiB; use fewer {rows}")


def _check_attention(w: Workload) -> None:
    p = w.params
    if p["head_dim"] > P:
        raise WorkloadError(f"nki: attention kernels need head_dim <= {P}, got {p['head_dim']}")
    name = "max_kv_len" if p["phase"] == "decode" else "seq_len"
    longest_tile = max(KNOB_CHOICES["attention"]["kv_tile"])
    keys = -(-p[name] // longest_tile) * longest_tile
    _check_fits(f"attention kernels keep whole score rows, {name} rounded up to {longest_tile} keys, of", name, keys,
                _SCORE_BYTES_PER_KEY)


def _rms_bytes_per_element(w: Workload) -> int:
    """x, weight and result in the input dtype, squares, normalised values and the next row tile's start in
    fp32, plus a byte of slack for the [R, 1] statistics (measured: 18 bytes bf16, 24 fp32)."""
    return 3 * _itemsize(w) + 3 * 4 + 1


def _itemsize(w: Workload) -> int:
    return w.inputs[0].torch_dtype.itemsize


def naive_knobs(w: Workload) -> dict[str, Any]:
    """The naive translation: sequential loops, small tiles, nothing hoisted or fused."""
    fam = family(w.kind)
    if fam == "gemv":
        return dict(loop="sequential", hoist_x=False, psum_acc=False, load_k=128, tb=1, evac="vector", fuse=False)
    if fam == "rmsnorm":
        return dict(loop="sequential", spread=False, fused_sq=False, fused_scale=False)
    return dict(loop="sequential", group=False, kv_tile=128, exp_fused=False, psum_acc=False, defer_norm=False,
                causal_skip=False)


def _dims(w: Workload) -> tuple[int, int, int]:
    """(batch rows, K, N) of the (first) matmul of a gemv-family workload."""
    p = w.params
    if w.kind == "gemm":
        return p["m"], p["k"], p["n"]
    if w.kind == "lm_head":
        return p["batch"], p["hidden"], p["vocab"]
    return p["batch"], p["hidden"], p["intermediate"]


def legalize(w: Workload, knobs: dict[str, Any]) -> dict[str, Any]:
    """Clamp a schedule to what the shape allows (unknown knobs dropped, missing ones naive)."""
    fam = family(w.kind)
    k = {**naive_knobs(w), **{key: v for key, v in knobs.items() if key in KNOB_CHOICES[fam]}}
    if fam == "gemv":
        _, kdim, _ = _dims(w)
        ks = (kdim, w.params["intermediate"]) if w.kind == "mlp" else (kdim,)
        fits = [c for c in KNOB_CHOICES["gemv"]["load_k"] if c <= k["load_k"] and all(x % c == 0 for x in ks)]
        k["load_k"] = max(fits) if fits else P
        k["tb"] = max(t for t in KNOB_CHOICES["gemv"]["tb"] if t <= min(k["tb"], k["load_k"] // P))
        if w.kind != "mlp":
            k["fuse"] = False
    elif fam == "rmsnorm":
        if w.params["hidden"] % P or w.params["rows"] > 1:
            k["spread"] = False  # the spread layout puts one row's hidden dim over 128 partitions
    else:
        if w.params["phase"] == "decode":
            k["causal_skip"] = False
        else:
            k["group"] = False
            k["kv_tile"] = min(k["kv_tile"], max(P, -(-w.params["seq_len"] // P) * P))
    return k


def generate(w: Workload, knobs: dict[str, Any]) -> str:
    """NKI source for workload `w` under schedule `knobs` (already legalized); `WorkloadError` if `check` fails."""
    check(w)
    fam = family(w.kind)
    body = {"gemv": _gemv, "rmsnorm": _rmsnorm, "attention": _attention}[fam](w, knobs)
    return HEADER + "\n\n" + body


def _loop(knobs: dict[str, Any]) -> str:
    return "nl.sequential_range" if knobs["loop"] == "sequential" else "nl.affine_range"


# ---------------------------------------------------------------- gemv family: gemm, lm_head, mlp


def _matvec(k: dict[str, Any], w_name: str, acc: str, n_expr: str, kdim: int, x_src: str, ind: str) -> str:
    """Loop body computing acc[128 n, B] = W[n-block, :] @ x^T, W row-major [N, K] in HBM.

    `x_src(kt)` is an expression giving the [128, B] x^T block for contraction block kt.
    """
    lk, tb = k["load_k"], k["tb"]
    groups = lk // (P * tb)
    loop = _loop(k)
    lines = []
    if k["psum_acc"]:
        lines.append(f"{acc} = nl.zeros((128, B), nl.float32, buffer=nl.psum)")
    else:
        lines.append(f"{acc} = nl.zeros((128, B), nl.float32, buffer=nl.sbuf)")
    lines.append(f"for kc in {loop}({kdim // lk}):")
    lines.append(f"    w_sb = nl.load({w_name}[{n_expr} * 128 + i_p, kc * {lk} + i_lk])")
    lines.append(f"    for g in nl.static_range({groups}):")
    lines.append(f"        tp = nl.ndarray((128, {tb * P}), nl.float32, buffer=nl.psum)")
    lines.append(f"        for t in nl.static_range({tb}):")
    lines.append(f"            tp[i_p, t * 128 + i_t] = nisa.nc_transpose(w_sb[i_p, (g * {tb} + t) * 128 + i_t])")
    if k["evac"] == "split":
        lines.append("        if g % 2 == 0:")
        lines.append(f"            wT = nisa.tensor_copy(tp, dtype={w_name}.dtype)")
        lines.append("        else:")
        lines.append(f"            wT = nisa.activation(op=nl.copy, data=tp, dtype={w_name}.dtype)")
    else:
        lines.append(f"        wT = nisa.tensor_copy(tp, dtype={w_name}.dtype)")
    lines.append(f"        for t in nl.static_range({tb}):")
    lines.append(f"            kt = kc * {lk // P} + g * {tb} + t")
    mm = f"nisa.nc_matmul(wT[i_p, t * 128 + i_t], {x_src})"
    if k["psum_acc"]:
        lines.append(f"            {acc} += {mm}")
    else:
        lines.append(f"            part = {mm}")
        lines.append(f"            {acc} += nl.copy(part, dtype=nl.float32)")
    return textwrap.indent("\n".join(lines), ind)


def _x_block(k: dict[str, Any], src: str) -> str:
    return "xT[i_p, kt * B + i_b]" if k["hoist_x"] else f"nl.load({src}[i_b, kt * 128 + i_p])"


def _gemv(w: Workload, k: dict[str, Any]) -> str:
    b, kdim, n = _dims(w)
    loop = _loop(k)
    mlp = w.kind == "mlp"
    args = "x, w_gate, w_up, w_down" if mlp else "x, w"
    out_n = w.params["hidden"] if mlp else n
    lines = [
        "@nki.jit",
        f"def kernel({args}):",
        f"    B = x.shape[0]  # {b} rows; K = {kdim}",
        f"    out = nl.ndarray((B, {out_n}), dtype=x.dtype, buffer=nl.shared_hbm)",
        "    i_p = nl.arange(128)[:, None]",
        "    i_t = nl.arange(128)[None, :]",
        "    i_b = nl.arange(B)[None, :]",
        f"    i_lk = nl.arange({k['load_k']})[None, :]",
    ]
    if k["hoist_x"]:
        lines += [
            f"    xT = nl.ndarray((128, {kdim // P} * B), dtype=x.dtype, buffer=nl.sbuf)",
            f"    for kt in nl.affine_range({kdim // P}):",
            "        xT[i_p, kt * B + i_b] = nl.load(x[i_b, kt * 128 + i_p])",
        ]
    if not mlp:
        lines.append(f"    for n in {loop}({n // P}):")
        lines.append(_matvec(k, "w", "acc", "n", kdim, _x_block(k, "x"), " " * 8))
        lines.append("        o = nl.copy(acc, dtype=out.dtype)")
        lines.append("        nl.store(out[i_b, n * 128 + i_p], value=o)")
        lines.append("    return out")
        return "\n".join(lines) + "\n"
    inter = w.params["intermediate"]
    lines += [
        f"    hT = nl.ndarray((128, {inter // P} * B), dtype=x.dtype, buffer=nl.sbuf)  # SwiGLU(x)^T, kept in SBUF",
        f"    for n in {loop}({inter // P}):",
        _matvec(k, "w_gate", "acc_g", "n", kdim, _x_block(k, "x"), " " * 8),
        _matvec(k, "w_up", "acc_u", "n", kdim, _x_block(k, "x"), " " * 8),
    ]
    if k["fuse"]:
        lines += [
            "        g = nisa.activation(op=nl.silu, data=acc_g, dtype=nl.float32)",
            "        hT[i_p, n * B + i_b] = nl.multiply(g, acc_u, dtype=x.dtype)",
        ]
    else:
        lines += [
            "        g_sb = nl.copy(acc_g, dtype=nl.float32)",
            "        u_sb = nl.copy(acc_u, dtype=nl.float32)",
            "        g = nl.silu(g_sb)",
            "        hT[i_p, n * B + i_b] = nl.multiply(g, u_sb, dtype=x.dtype)",
        ]
    k2 = {**k, "hoist_x": True}
    lines += [
        f"    for n in {loop}({out_n // P}):",
        _matvec(k2, "w_down", "acc", "n", inter, "hT[i_p, kt * B + i_b]", " " * 8),
        "        o = nl.copy(acc, dtype=out.dtype)",
        "        nl.store(out[i_b, n * 128 + i_p], value=o)",
        "    return out",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- RMSNorm


def _rmsnorm_steps(k: dict[str, Any], ind: str, rows: str) -> tuple[str, str]:
    """The sum-of-squares and scaling lines of an RMSNorm tile (`rows` partitions), fused or not."""
    sq = (f"{ind}ss = nl.ndarray(({rows}, 1), nl.float32, buffer=nl.sbuf)\n"
          f"{ind}sq = nisa.activation_reduce(op=nl.square, data=xt, reduce_op=nl.add, reduce_res=ss, dtype=nl.float32)\n"
          if k["fused_sq"] else
          f"{ind}sq = nl.square(xt, dtype=nl.float32)\n"
          f"{ind}ss = nl.sum(sq, axis=1, keepdims=True)\n")
    scale = (f"{ind}y = nisa.tensor_tensor(nisa.activation(op=nl.copy, data=xt, scale=rstd, dtype=nl.float32), wt, "
             "op=nl.multiply, dtype=x.dtype)\n" if k["fused_scale"] else
             f"{ind}xn = nl.multiply(xt, rstd, dtype=nl.float32)\n"
             f"{ind}y = nl.multiply(xn, wt, dtype=x.dtype)\n")
    return sq, scale


def _rmsnorm(w: Workload, k: dict[str, Any]) -> str:
    rows, h, eps = w.params["rows"], w.params["hidden"], w.params["eps"]
    if k["spread"]:
        f = h // P
        sq, scale = _rmsnorm_steps(k, "    ", "128")
        return (
            "@nki.jit\n"
            "def kernel(x, weight):\n"
            f"    # one row spread over 128 partitions: x[0, p * {f} + f]\n"
            f"    out = nl.ndarray(({rows}, {h}), dtype=x.dtype, buffer=nl.shared_hbm)\n"
            "    i_p = nl.arange(128)[:, None]\n"
            f"    i_f = nl.arange({f})[None, :]\n"
            f"    xt = nl.load(x[0, i_p * {f} + i_f])\n"
            f"    wt = nl.load(weight[i_p * {f} + i_f])\n"
            + sq +
            "    ones = nl.full((128, 128), 1.0, nl.float32, buffer=nl.sbuf)\n"
            "    total = nisa.nc_matmul(ones, ss)  # cross-partition sum, broadcast to every partition\n"
            f"    rstd = nl.rsqrt(nl.add(nl.multiply(total, {1.0 / h!r}), {eps!r}), dtype=nl.float32)\n"
            + scale +
            f"    nl.store(out[0, i_p * {f} + i_f], value=y)\n"
            "    return out\n"
        )
    tile = min(rows, P)
    nt = -(-rows // tile)
    sq, scale = _rmsnorm_steps(k, "        ", "R")
    return (
        "@nki.jit\n"
        "def kernel(x, weight):\n"
        f"    R = {tile}  # rows per tile, on partitions\n"
        f"    out = nl.ndarray(({rows}, {h}), dtype=x.dtype, buffer=nl.shared_hbm)\n"
        "    i_p = nl.arange(R)[:, None]\n"
        f"    i_f = nl.arange({h})[None, :]\n"
        "    wt = nl.load(weight[0 * i_p + i_f])  # broadcast to every row's partition\n"
        f"    for r in {_loop(k)}({nt}):\n"
        f"        rmask = r * R + i_p < {rows}\n"
        "        xt = nl.load(x[r * R + i_p, i_f], mask=rmask)\n"
        + sq +
        f"        rstd = nl.rsqrt(nl.add(nl.multiply(ss, {1.0 / h!r}), {eps!r}), dtype=nl.float32)\n"
        + scale +
        "        nl.store(out[r * R + i_p, i_f], value=y, mask=rmask)\n"
        "    return out\n"
    )


# ---------------------------------------------------------------- GQA attention


def _attention(w: Workload, k: dict[str, Any]) -> str:
    p = w.params
    hq, hk, d = p["heads"], p["kv_heads"], p["head_dim"]
    grp = hq // hk
    decode = p["phase"] == "decode"
    kt = k["kv_tile"]
    loop = _loop(k)
    scale = 1.0 / d ** 0.5
    if decode:
        m = grp if k["group"] else 1
        sig = "def kernel(q, k_cache, v_cache, kv_len):"
        out_decl = f"    out = nl.ndarray(({p['batch']}, {hq}, {d}), dtype=q.dtype, buffer=nl.shared_hbm)"
        length = "kv_len"
        head_loops = [f"for b in {loop}({p['batch']}):", f"for hg in {loop}({hq // m}):"]
        setup = [
            f"h0 = hg * {m}",
            f"kvh = h0 // {grp}",
            "qT = nl.load(q[b, h0 + i_mf, i_d])  # [d, M]: q^T",
        ]
        k_src, v_src = "k_cache[b, kvh, k0 + i_kv, i_dd]", "v_cache[b, kvh, k0 + i_kv, i_dd]"
        mask_pred = "k0 + i_sf < kv_len"
    else:
        m = P
        sig = "def kernel(q, k, v):"
        out_decl = f"    out = nl.ndarray(({p['batch']}, {hq}, {p['seq_len']}, {d}), dtype=q.dtype, buffer=nl.shared_hbm)"
        length = str(p["seq_len"])
        # With causal_skip the query-block loop is unrolled at tracing (static_range): its index, a Python int,
        # bounds the KV loops.
        qloop = "nl.static_range" if k["causal_skip"] else loop
        head_loops = [f"for b in {loop}({p['batch']}):", f"for h in {loop}({hq}):",
                      f"for qb in {qloop}({-(-p['seq_len'] // P)}):"]
        setup = [
            f"kvh = h // {grp}",
            "q0 = qb * 128",
            f"qmask = q0 + i_q < {p['seq_len']}",
            "q_sb = nl.zeros((128, " + str(d) + "), q.dtype, buffer=nl.sbuf)",
            "q_sb[i_q, i_dd] = nl.load(q[b, h, q0 + i_q, i_dd], mask=qmask)",
            "qT = nl.copy(nisa.nc_transpose(q_sb), dtype=q.dtype)  # [d, 128 q]",
        ]
        k_src, v_src = "k[b, kvh, k0 + i_kv, i_dd]", "v[b, kvh, k0 + i_kv, i_dd]"
        # One comparison (NKI's affine_select takes no `&`): keys past seq_len are past the diagonal of every
        # query row that is stored (K rows past seq_len load as zeros).
        mask_pred = "k0 + i_sf <= q0 + i_m"
    skip = bool(k["causal_skip"]) and not decode
    nb = f"min(NB, (q0 + {128 + kt - 1}) // {kt})" if skip else "NB"
    body = list(setup)
    body += [
        (f"s_sb = nl.full(({m}, NB * {kt}), -30000.0, nl.float32, buffer=nl.sbuf)  # blocks above the diagonal stay masked"
         if skip else f"s_sb = nl.ndarray(({m}, NB * {kt}), nl.float32, buffer=nl.sbuf)  # scores, one row per query"),
        f"for c in {loop}({nb}):",
        f"    k0 = c * {kt}",
        f"    kT_ps = nl.ndarray(({d}, {kt}), nl.float32, buffer=nl.psum)",
        f"    for t in nl.static_range({kt // P}):",
        "        kb = nl.zeros((128, " + str(d) + "), k_dtype, buffer=nl.sbuf)",
        f"        kb[i_kv, i_dd] = nl.load({k_src.replace('k0 +', 'k0 + t * 128 +')}, mask=k0 + t * 128 + i_kv < {length})",
        "        kT_ps[i_dT, t * 128 + i_kt] = nisa.nc_transpose(kb)",
        "    kT = nl.copy(kT_ps, dtype=k_dtype)",
        "    s_ps = nisa.nc_matmul(qT, kT)",
        "    s_sb[i_m, k0 + i_sf] = nl.copy(s_ps)  # PSUM -> SBUF on VectorE: GpSimd (affine_select) cannot read PSUM",
        f"    s_sb[i_m, k0 + i_sf] = nisa.affine_select(pred={mask_pred}, on_true_tile=s_sb[i_m, k0 + i_sf], "
        "on_false_value=-30000.0)",
    ]
    # Probabilities feed the P @ V matmul in bf16 for decode (many keys per row average the rounding out) and
    # in fp32 for prefill, where early rows attend to a handful of keys and bf16 P misses the bf16 tolerance.
    pdt = "q.dtype" if decode else "nl.float32"
    first = pdt if k["defer_norm"] else "nl.float32"  # one rounding: normalise in fp32, then cast
    if k["exp_fused"]:
        body += [
            "mx = nl.max(s_sb, axis=1, keepdims=True)",
            f"nmx = nl.multiply(mx, {-scale!r})",
            f"rs = nl.ndarray(({m}, 1), nl.float32, buffer=nl.sbuf)",
            f"pr = nisa.activation_reduce(op=nl.exp, data=s_sb, bias=nmx, scale={scale!r}, reduce_op=nl.add, "
            f"reduce_res=rs, dtype={first})",
        ]
    else:
        body += [
            "mx = nl.max(s_sb, axis=1, keepdims=True)",
            "sh = nl.subtract(s_sb, mx)",
            f"e = nl.exp(nl.multiply(sh, {scale!r}), dtype=nl.float32)",
            "rs = nl.sum(e, axis=1, keepdims=True)",
            f"pr = nl.copy(e, dtype={first})",
        ]
    if not k["defer_norm"]:
        body += ["inv = nl.reciprocal(rs)", f"pr = nl.multiply(pr, inv, dtype={pdt})"]
    if k["psum_acc"]:
        body.append(f"o_acc = nl.zeros(({m}, {d}), nl.float32, buffer=nl.psum)")
    else:
        body.append(f"o_acc = nl.zeros(({m}, {d}), nl.float32, buffer=nl.sbuf)")
    pv_range = nb
    body += [
        f"for c in {loop}({pv_range}):",
        f"    for t in nl.static_range({kt // P}):",
        f"        k0 = c * {kt} + t * 128",
        f"        vb = nl.zeros((128, {d}), {'k_dtype' if decode else 'nl.float32'}, buffer=nl.sbuf)",
        f"        vb[i_kv, i_dd] = nl.load({v_src}, mask=k0 + i_kv < {length}, dtype=vb.dtype)",
        f"        pT = nl.copy(nisa.nc_transpose(pr[i_m, k0 + i_kt]), dtype={pdt})  # [128 kv, M]",
    ]
    if k["psum_acc"]:
        body.append("        o_acc += nisa.nc_matmul(pT, vb)")
    else:
        body.append("        o_acc += nl.copy(nisa.nc_matmul(pT, vb), dtype=nl.float32)")
    if k["defer_norm"]:
        body += ["inv = nl.reciprocal(rs)", "o = nl.multiply(o_acc, inv, dtype=q.dtype)"]
    else:
        body.append("o = nl.copy(o_acc, dtype=q.dtype)")
    if decode:
        body.append("nl.store(out[b, h0 + i_m, i_df], value=o)")
    else:
        body.append("nl.store(out[b, h, q0 + i_m, i_df], value=o, mask=q0 + i_m < " + str(p["seq_len"]) + ")")
    ind = "    " * (1 + len(head_loops))
    loops = "".join("    " * (1 + i) + hl + "\n" for i, hl in enumerate(head_loops))
    nblocks = f"(kv_len + {kt - 1}) // {kt}" if decode else str(-(-p["seq_len"] // kt))
    lines = [
        "@nki.jit",
        sig,
        out_decl,
        f"    k_dtype = {'k_cache' if decode else 'k'}.dtype",
        f"    NB = {nblocks}  # KV blocks of {kt}",
        f"    i_m = nl.arange({m})[:, None]",
        f"    i_q = nl.arange({m})[:, None]",
        f"    i_d = nl.arange({d})[:, None]",
        f"    i_dT = nl.arange({d})[:, None]",
        f"    i_dd = nl.arange({d})[None, :]",
        f"    i_df = nl.arange({d})[None, :]",
        "    i_kv = nl.arange(128)[:, None]",
        "    i_kt = nl.arange(128)[None, :]",
        f"    i_sf = nl.arange({kt})[None, :]",
    ]
    lines.append(f"    i_mf = nl.arange({m})[None, :]")
    return "\n".join(lines) + "\n" + loops + textwrap.indent("\n".join(body), ind) + "\n    return out\n"
