"""C code generation for the CPU target from a parameterised schedule ("knobs").

Every kernel has one entry point, `void autocomp_kernel(void **tensors, const int64_t *dims)`:
`tensors` holds the workload's inputs then outputs (contiguous, in declaration order) and `dims`
its runtime dims (e.g. the KV length). Static shapes are compiled in as constants.

The naive schedule of each kind is scalar, single-threaded and unblocked: the translation of the
PyTorch reference. The menu (agents/menu.py) moves knobs; `legalize` keeps them valid for a shape.
"""
from __future__ import annotations

from typing import Any, Callable

from autocomp_compile.targets.cpu.isa import VECTOR_EXP, VECTOR_REGISTERS, VECTOR_WIDTH, prelude
from autocomp_compile.workload import Workload

# cpu-3: attention gains vec_softmax (and KV prefetch); kernels are timed with cold weights (ColdInputs), so
# latencies cached by cpu-2 (weights hot in the LLC) are not compared with them (cpu-2 entries stay reuse donors).
CODEGEN_VERSION = "cpu-3"

GEMV_KINDS = ("gemm", "lm_head", "mlp")

NAIVE_KNOBS: dict[str, dict[str, Any]] = {
    "gemv": dict(isa="scalar", rows=1, unroll=1, prefetch=0, prefetch_hint="t0", threads="serial", chunk=0, fuse=False,
                 bf16_split=False, spans=1, m_tile=1, pack=0, pack_rows=1),
    "attention": dict(isa="scalar", online=False, kv_block=64, gqa_share=False, q_block=1, threads="serial", chunk=0,
                      vec_softmax=False, prefetch=0, mm_tiles=False),
    "rmsnorm": dict(isa="scalar", unroll=1, threads="serial", chunk=0),
}

KNOB_CHOICES: dict[str, dict[str, tuple]] = {
    "gemv": dict(rows=(1, 2, 4, 8), unroll=(1, 2, 4), prefetch=(0, 256, 512, 1024, 2048, 4096, 8192), chunk=(0, 1, 4, 16, 64),
                 spans=(1, 2, 4, 8, 16), m_tile=(1, 2, 3, 4, 6, 8), pack=(0, 1, 2, 3, 4),
                 pack_rows=(1, 2, 3, 4, 6, 8, 12)),
    "attention": dict(kv_block=(16, 32, 64, 128, 256), q_block=(1, 2, 4, 8, 16), chunk=(0, 1, 2, 4),
                      prefetch=(0, 512, 1024, 2048, 4096, 8192)),
    "rmsnorm": dict(unroll=(1, 2, 4), chunk=(0, 1, 4, 16)),
}
THREADS = ("serial", "static", "dynamic")
PREFETCH_HINTS = {"t0": "_MM_HINT_T0", "t1": "_MM_HINT_T1", "nta": "_MM_HINT_NTA"}
# Accumulators a GEMV's inner loop may keep (spans x rows x unroll or rows x m_tile x unroll vectors): more would
# spill the 32 AVX-512 registers.
MAX_ACCUMULATORS = 16
# Knobs the packed-panel GEMV kernel (pack > 0) does not read: legalize resets them to these values.
PACKED_RESETS = dict(rows=1, unroll=1, prefetch=0, spans=1, m_tile=1, bf16_split=False)


def family(kind: str) -> str:
    return "gemv" if kind in GEMV_KINDS else kind


def output_rows(w: Workload) -> int:
    """Rows of a GEMV-family kernel's output (for the MLP, of its gate and up projections)."""
    return w.params.get("n", w.params.get("vocab", w.params.get("intermediate")))


def activation_rows(w: Workload) -> int:
    """Rows of a GEMV-family kernel's activation (M of the GEMM, the batch of the LM head and the MLP)."""
    return w.params.get("m", w.params.get("batch"))


def m_tile_fits(w: Workload, m_tile: int, rows: int, unroll: int) -> bool:
    """Whether a register tile of `m_tile` activation rows x `rows` weight rows fits `w` and the accumulators."""
    return m_tile <= activation_rows(w) and m_tile * rows * unroll <= MAX_ACCUMULATORS


def pack_fits(isa: str, pack: int, pack_rows: int, spare: int = 0) -> bool:
    """Whether a packed-panel tile of `pack` activation vectors x `pack_rows` weight rows fits the ISA's vector
    registers: an accumulator per pair, the `pack` activation vectors and one broadcast weight (and `spare` more)."""
    return pack * pack_rows + pack + 1 + spare <= VECTOR_REGISTERS.get(isa, 0)


def spans_fit(w: Workload, spans: int, rows: int, unroll: int) -> bool:
    """Whether `spans` spans of `rows` rows each fit `w`'s output rows and the accumulator registers."""
    return spans * rows <= output_rows(w) and spans * rows * unroll <= MAX_ACCUMULATORS


def naive_knobs(w: Workload) -> dict[str, Any]:
    return dict(NAIVE_KNOBS[family(w.kind)])


def isa_applies(isa: str, w: Workload) -> bool:
    """Whether `isa` can change `w`'s kernel: AVX512-BF16 adds only the bf16 dot products of the GEMV family
    (for attention or RMSNorm it would be the AVX-512 kernel again under another name); AMX serves the tile
    products of a bf16 causal prefill whose head_dim is a multiple of 32."""
    if isa == "amx":
        return (w.dtype == "bf16" and w.kind == "attention" and w.params.get("phase") == "prefill"
                and w.params["head_dim"] % 32 == 0)
    return isa != "avx512bf16" or (w.dtype == "bf16" and family(w.kind) == "gemv")


def legalize(w: Workload, knobs: dict[str, Any], isas: list[str]) -> dict[str, Any]:
    """Fill missing knobs from the naive schedule and clamp each to what this shape and host allow."""
    fam = family(w.kind)
    out = {**NAIVE_KNOBS[fam], **{k: v for k, v in knobs.items() if k in NAIVE_KNOBS[fam]}}
    if out["isa"] not in isas or not isa_applies(out["isa"], w):
        out["isa"] = max((i for i in isas if isa_applies(i, w)), key=isas.index)
    if out["threads"] not in THREADS:
        out["threads"] = "serial"
    for name, choices in KNOB_CHOICES[fam].items():
        out[name] = min(choices, key=lambda c: abs(c - float(out[name])))  # snap to a choice (and to int)
    # Knobs a kernel does not read are reset, so that one kernel has one source text (one candidate, one build).
    if out["threads"] == "serial":
        out["chunk"] = 0  # an OpenMP schedule's chunk
    if fam == "gemv":
        n_rows = output_rows(w)
        while out["rows"] > 1 and out["rows"] > n_rows:
            out["rows"] //= 2
        # A register tile of activation rows: as many as the activation has and the accumulators allow.
        tiles = [t for t in KNOB_CHOICES["gemv"]["m_tile"] if t <= out["m_tile"]]
        out["m_tile"] = max(t for t in tiles if t == 1 or m_tile_fits(w, t, out["rows"], out["unroll"]))
        if out["m_tile"] > 1:
            out["spans"] = 1  # spans stream weights for one activation row at a time
        # Spans need a block of rows in each (otherwise every row is in the tail: the plain kernel, other text).
        while out["spans"] > 1 and not spans_fit(w, out["spans"], out["rows"], out["unroll"]):
            out["spans"] //= 2
        out["fuse"] = bool(out["fuse"]) and w.kind == "mlp"
        out["bf16_split"] = bool(out["bf16_split"]) and w.dtype == "bf16" and out["isa"] in ("avx2", "avx512")
        _legalize_pack(w, out, isas)
        if out["isa"] == "scalar":
            out["prefetch"] = 0  # _mm_prefetch needs the x86 intrinsics header
        if out["prefetch_hint"] not in PREFETCH_HINTS or not out["prefetch"]:
            out["prefetch_hint"] = "t0"
    if fam == "attention":
        out["online"] = bool(out["online"])
        out["gqa_share"] = bool(out["gqa_share"])
        if w.params["phase"] == "decode":
            out["q_block"] = 1
        # The vectorised online softmax: whole vectors per head row.
        out["vec_softmax"] = bool(out["vec_softmax"]) and w.params["head_dim"] % VECTOR_WIDTH[out["isa"]] == 0
        if out["vec_softmax"]:
            out["online"] = True
        # Register-tiled products need a vectorised softmax and a prefill's many rows (K transposed per call).
        out["mm_tiles"] = bool(out["mm_tiles"]) and out["vec_softmax"] and w.params["phase"] == "prefill"
        if out["isa"] == "amx":  # one kernel: 16 query rows of one head per task, AMX products, vector softmax
            out.update(vec_softmax=True, online=True, mm_tiles=False, gqa_share=False, q_block=16,
                       kv_block=max(32, out["kv_block"]))
        if not out["vec_softmax"] or out["isa"] in ("scalar", "amx") or out["mm_tiles"]:
            out["prefetch"] = 0  # prefetches K and V rows ahead in the vectorised kernel's key loop only
    return out


def _legalize_pack(w: Workload, out: dict[str, Any], isas: list[str]) -> None:
    """Packed panels need a vector ISA and several activation rows; the tile's weight rows are cut to fit the output
    rows and the registers, and the knobs only the dot-product kernels read are reset."""
    if out["isa"] == "scalar" or activation_rows(w) < 2:
        out["pack"] = 0
    if not out["pack"]:
        out["pack_rows"] = NAIVE_KNOBS["gemv"]["pack_rows"]
        return
    if out["isa"] == "avx512bf16" and "avx512" in isas:
        out["isa"] = "avx512"  # the packed tile multiplies fp32 panels: the same code without vdpbf16ps
    # One weight row always fits: `pack` <= 4 vectors take at most 9 registers.
    out["pack_rows"] = max(r for r in KNOB_CHOICES["gemv"]["pack_rows"] if r <= out["pack_rows"] and
                           (r == 1 or (r <= output_rows(w) and pack_fits(out["isa"], out["pack"], r))))
    out.update(PACKED_RESETS)


def generate(w: Workload, knobs: dict[str, Any]) -> str:
    """Full C source for workload `w` under schedule `knobs` (assumed legal)."""
    fam = family(w.kind)
    header = f"/* autocomp-compile {CODEGEN_VERSION}: {w.name}\n   schedule: {sorted(knobs.items())} */\n"
    kernel = _attention_amx_kernel if knobs["isa"] == "amx" else \
        {"gemv": _gemv_kernel, "attention": _attention_kernel, "rmsnorm": _rmsnorm_kernel}[fam]
    body = kernel(w, knobs)
    return header + prelude(knobs["isa"], w.dtype, knobs.get("bf16_split", False)) + body


def _omp_for(knobs: dict[str, Any], collapse: int = 1) -> str:
    if knobs["threads"] == "serial":
        return ""
    sched = "static" if knobs["threads"] == "static" else "dynamic"
    chunk = f", {knobs['chunk']}" if knobs["chunk"] else ""
    coll = f" collapse({collapse})" if collapse > 1 else ""
    return f"#pragma omp for schedule({sched}{chunk}){coll}"


def _omp_parallel(knobs: dict[str, Any]) -> str:
    return "" if knobs["threads"] == "serial" else "#pragma omp parallel"


# ---------------------------------------------------------------- GEMV family (gemm, lm_head, mlp)


def _dot_rows(name: str, rows: int, unroll: int, prefetch_bytes: int, hint: str = "t0", spans: int = 1) -> str:
    """`rows` dot products of weight rows (stride ldw) with one activation vector, `unroll` steps per iteration;
    with `spans` > 1, those rows at the same place in each of `spans` spans of `span` rows (res[s * rows + r])."""
    n = rows * spans
    acc = [[f"a{r}_{u}" for u in range(unroll)] for r in range(n)]
    if spans == 1:
        row = [f"{r}" for r in range(n)]
        args = "const elem_t *restrict w, int64_t ldw, const xval_t *restrict x, int64_t K, float *restrict res"
    else:
        row = [f"({r // rows} * span + {r % rows})" for r in range(n)]
        args = "const elem_t *restrict w, int64_t ldw, int64_t span, const xval_t *restrict x, int64_t K, float *restrict res"
    lines = [
        f"static inline void {name}({args}) {{",
        "  " + " ".join(f"vf {a} = v_zero();" for accs in acc for a in accs),
        "  int64_t k = 0;",
        f"  for (; k + VK * {unroll} <= K; k += VK * {unroll}) {{",
    ]
    if prefetch_bytes:
        for r in range(n):
            lines.append(
                f"    _mm_prefetch((const char *)(w + {row[r]} * ldw + k) + {prefetch_bytes}, {PREFETCH_HINTS[hint]});"
            )
    for u in range(unroll):
        for r in range(n):
            lines.append(f"    {acc[r][u]} = v_dot({acc[r][u]}, w + {row[r]} * ldw + k + {u} * VK, x + k + {u} * VK);")
    lines.append("  }")
    lines.append("  for (; k + VK <= K; k += VK) {")
    for r in range(n):
        lines.append(f"    {acc[r][0]} = v_dot({acc[r][0]}, w + {row[r]} * ldw + k, x + k);")
    lines.append("  }")
    for r in range(n):
        total = acc[r][0]
        for u in range(1, unroll):
            total = f"v_add({total}, {acc[r][u]})"
        lines.append(f"  float s{r} = v_hsum({total});")
    lines.append("  for (; k < K; ++k) {")
    lines.append("    const float xk = xval_to_f32(x[k]);")
    for r in range(n):
        lines.append(f"    s{r} += elem_to_f32(w[{row[r]} * ldw + k]) * xk;")
    lines.append("  }")
    for r in range(n):
        lines.append(f"  res[{r}] = s{r};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_tile(name: str, rows: int, m_tile: int, unroll: int, prefetch_bytes: int, hint: str = "t0") -> str:
    """A register tile: `rows` weight rows (stride ldw) times `m_tile` activation rows (stride ldx),
    res[i * rows + r]; each weight vector is loaded (and widened) once for all `m_tile` activation rows."""
    acc = {(r, i, u): f"a{r}_{i}_{u}" for r in range(rows) for i in range(m_tile) for u in range(unroll)}

    def step(u: int, indent: str) -> list[str]:
        # All weight vectors first, then one activation row at a time: each activation vector is read once.
        lines = [f"{indent}{{"]
        lines += [f"{indent}  const wv_t w{r} = w_load(w + {r} * ldw + k + {u} * VK);" for r in range(rows)]
        lines += [f"{indent}  {acc[r, i, u]} = w_dot({acc[r, i, u]}, w{r}, x + {i} * ldx + k + {u} * VK);"
                  for i in range(m_tile) for r in range(rows)]
        lines.append(f"{indent}}}")
        return lines

    lines = [
        f"static inline void {name}(const elem_t *restrict w, int64_t ldw, const xval_t *restrict x, int64_t ldx, "
        "int64_t K, float *restrict res) {",
        "  " + " ".join(f"vf {a} = v_zero();" for a in acc.values()),
        "  int64_t k = 0;",
        f"  for (; k + VK * {unroll} <= K; k += VK * {unroll}) {{",
    ]
    if prefetch_bytes:
        lines += [f"    _mm_prefetch((const char *)(w + {r} * ldw + k) + {prefetch_bytes}, {PREFETCH_HINTS[hint]});"
                  for r in range(rows)]
    for u in range(unroll):
        lines += step(u, "    ")
    lines.append("  }")
    lines.append("  for (; k + VK <= K; k += VK) {")
    lines += step(0, "    ")
    lines.append("  }")
    for r in range(rows):
        for i in range(m_tile):
            total = acc[r, i, 0]
            for u in range(1, unroll):
                total = f"v_add({total}, {acc[r, i, u]})"
            lines.append(f"  float s{r}_{i} = v_hsum({total});")
    lines.append("  for (; k < K; ++k) {")
    for r in range(rows):
        lines.append(f"    const float w{r} = elem_to_f32(w[{r} * ldw + k]);")
        lines += [f"    s{r}_{i} += w{r} * xval_to_f32(x[{i} * ldx + k]);" for i in range(m_tile)]
    lines.append("  }")
    lines += [f"  res[{i} * {rows} + {r}] = s{r}_{i};" for i in range(m_tile) for r in range(rows)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _gemv_helpers(knobs: dict[str, Any]) -> str:
    code = _dot_rows("dot_rows", knobs["rows"], knobs["unroll"], knobs["prefetch"], knobs["prefetch_hint"])
    if knobs["rows"] > 1:
        code += _dot_rows("dot_row1", 1, knobs["unroll"], knobs["prefetch"], knobs["prefetch_hint"])
    else:
        code += "#define dot_row1 dot_rows\n"
    if knobs["spans"] > 1:
        code += _dot_rows("dot_spans", knobs["rows"], knobs["unroll"], knobs["prefetch"], knobs["prefetch_hint"],
                          knobs["spans"])
        code += f"#define SPANS {knobs['spans']}\n"
    # block_rows(): rows [n0, n0+R) of out[m, :] = w[n0:n0+R] . x[m], with a single-row tail.
    code += f"""
#define ROWS {knobs['rows']}
static inline void block_rows(const elem_t *w, int64_t K, const xval_t *x, int64_t n0, int64_t N, float *res) {{
  if (n0 + ROWS <= N) {{ dot_rows(w + n0 * K, K, x, K, res); return; }}
  for (int64_t n = n0; n < N; ++n) dot_row1(w + n * K, K, x, K, res + (n - n0));
}}
"""
    if knobs["m_tile"] > 1:
        # block_tile(): the same for activation rows x[0..MT), res[i * ROWS + r].
        code += _dot_tile("dot_tile", knobs["rows"], knobs["m_tile"], knobs["unroll"], knobs["prefetch"],
                          knobs["prefetch_hint"])
        code += f"""#define MT {knobs['m_tile']}
static inline void block_tile(const elem_t *w, int64_t K, const xval_t *x, int64_t n0, int64_t N, float *res) {{
  if (n0 + ROWS <= N) {{ dot_tile(w + n0 * K, K, x, K, K, res); return; }}
  for (int64_t i = 0; i < MT; ++i)
    for (int64_t n = n0; n < N; ++n) dot_row1(w + n * K, K, x + i * K, K, res + i * ROWS + (n - n0));
}}
"""
    return code


def _packed_helpers(knobs: dict[str, Any]) -> str:
    """The packed-panel GEMV: a panel of NR weight rows is widened to fp32 once (pack_panel) and multiplied with
    MTW activation rows at a time (panel_tile), the activation stored transposed in blocks of MTW rows
    (packed_at). Each step broadcasts one weight per panel row against `pack` activation vectors: NR x pack FMAs
    for NR + pack loads, and no horizontal sums."""
    nr, mv = knobs["pack_rows"], knobs["pack"]
    acc = {(r, v): f"a{r}_{v}" for r in range(nr) for v in range(mv)}
    lines = [
        f"#define NR {nr}",
        f"#define MTW ({mv} * VW)",
        "#define PADDED(m) (((m) + MTW - 1) / MTW * MTW)",
        "static inline int64_t packed_at(int64_t m, int64_t k, int64_t K) { return (m / MTW * K + k) * MTW + m % MTW; }",
        "static inline void pack_panel(const elem_t *restrict w, int64_t K, int64_t n0, int64_t N, float *restrict panel) {",
        "  for (int64_t r = 0; r < NR; ++r) {",
        "    float *p = panel + r * K;",
        "    if (n0 + r >= N) { memset(p, 0, sizeof(float) * K); continue; }",
        "    const elem_t *wr = w + (n0 + r) * K;",
        "    int64_t k = 0;",
        "    for (; k + VW <= K; k += VW) v_store_f32(p + k, v_load_elem(wr + k));",
        "    for (; k < K; ++k) p[k] = elem_to_f32(wr[k]);",
        "  }",
        "}",
        "static inline void panel_tile(const float *restrict panel, const float *restrict xp, int64_t K, float *restrict res) {",
        "  " + " ".join(f"vf {a} = v_zero();" for a in acc.values()),
        "  for (int64_t k = 0; k < K; ++k) {",
        *[f"    const vf x{v} = v_load_f32(xp + k * MTW + {v} * VW);" for v in range(mv)],
    ]
    for r in range(nr):
        fmas = " ".join(f"{acc[r, v]} = v_fma(b, x{v}, {acc[r, v]});" for v in range(mv))
        lines.append(f"    {{ const vf b = v_set1(panel[{r} * K + k]); {fmas} }}")
    lines.append("  }")
    lines += [f"  v_store_f32(res + {r} * MTW + {v} * VW, {acc[r, v]});" for r in range(nr) for v in range(mv)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _packed_pass(knobs: dict[str, Any], n_rows: str, k: str, x: str, weights: list[tuple[str, str]],
                 store: Callable[..., str]) -> str:
    """`_row_pass` for packed panels: each thread widens a panel of NR rows of every weight matrix into its own
    buffer, then runs the panel against every block of MTW activation rows."""
    panels = ", ".join(f"*p_{w} = (float *)malloc(sizeof(float) * NR * {k})" for w, _ in weights)
    packs = "\n".join(f"    pack_panel({w}, {k}, n0, {n_rows}, p_{w});" for w, _ in weights)
    tiles = "\n".join(f"      float {res}[NR * MTW];\n      panel_tile(p_{w}, {x} + m0 * {k}, {k}, {res});"
                      for w, res in weights)
    return f"""  {{
  float {panels};
  {_omp_for(knobs)}
  for (int64_t nb = 0; nb < ({n_rows} + NR - 1) / NR; ++nb) {{
    const int64_t n0 = nb * NR;
{packs}
    for (int64_t m0 = 0; m0 < M; m0 += MTW) {{
{tiles}
      for (int64_t r = 0; r < NR && n0 + r < {n_rows}; ++r) for (int64_t j = 0; j < MTW && m0 + j < M; ++j) {{
        const int64_t m = m0 + j, n = n0 + r;
        {store("n", *(f"{res}[r * MTW + j]" for _, res in weights))}
      }}
    }}
  }}
  {" ".join(f"free(p_{w});" for w, _ in weights)}
  }}
"""


def _convert_x(dst: str, src: str, rows: str, cols: str, packed: bool = False) -> str:
    """Activation rows to the dot product's operand type and layout; `packed`: to fp32, transposed in blocks of MTW
    rows (packed_at; the buffer is zeroed, so padding rows stay 0)."""
    value = f"elem_to_f32({src}[i * {cols} + k])"
    at, value = (f"packed_at(i, k, {cols})", value) if packed else (f"i * {cols} + x_pos(k, {cols})", f"x_from_f32({value})")
    return (
        f"  for (int64_t i = 0; i < {rows}; ++i) for (int64_t k = 0; k < {cols}; ++k)\n"
        f"    {dst}[{at}] = {value};\n"
    )


def _row_pass(knobs: dict[str, Any], n_rows: str, k: str, x: str, weights: list[tuple[str, str]],
              store: Callable[..., str]) -> str:
    """One pass over output rows 0..n_rows: for each (weight matrix w, result array) in `weights`, row n's value
    w[n, :k] . `x`[m, :k] for every m < M; the OpenMP loop(s) of a GEMV. `store(n, *values)` is the C statement that
    stores row n's fp32 values (one per weight matrix) of activation row m.
    With spans, rows are taken ROWS at a time at the same place in each of SPANS equal spans (each core then streams
    SPANS runs of consecutive weight rows, as the read probe does), and the rows after the last whole span are a
    tail of plain blocks, after the spans' loop (nowait: they are other rows) and before the pass's barrier."""
    loop = _omp_for(knobs)
    span = f"span_{weights[0][0]}"
    code, tail_from = "", "0"
    if knobs["spans"] > 1:
        tail_from = f"SPANS * {span} / ROWS"
        dots = "\n".join(f"      float {res}[SPANS * ROWS];\n"
                         f"      dot_spans({w} + ib * ROWS * {k}, {k}, {span}, {x} + m * {k}, {k}, {res});"
                         for w, res in weights)
        code += f"""  const int64_t {span} = {n_rows} / (SPANS * ROWS) * ROWS;
  {loop + " nowait" if loop else ""}
  for (int64_t ib = 0; ib < {span} / ROWS; ++ib) {{
    for (int64_t m = 0; m < M; ++m) {{
{dots}
      for (int64_t s = 0; s < SPANS; ++s) for (int64_t r = 0; r < ROWS; ++r) {{
        const int64_t n = s * {span} + ib * ROWS + r;
        {store("n", *(f"{res}[s * ROWS + r]" for _, res in weights))}
      }}
    }}
  }}
"""
    blocks = "\n".join(f"      float {res}[ROWS];\n      block_rows({w}, {k}, {x} + m * {k}, n0, {n_rows}, {res});"
                       for w, res in weights)
    first_m, tiles = "0", ""
    if knobs["m_tile"] > 1:  # register tiles of MT activation rows, then the rows after the last whole tile
        first_m = "M / MT * MT"
        tile_dots = "\n".join(f"      float {res}[MT * ROWS];\n      block_tile({w}, {k}, {x} + m0 * {k}, n0, {n_rows}, {res});"
                              for w, res in weights)
        tiles = f"""    for (int64_t m0 = 0; m0 + MT <= M; m0 += MT) {{
      const int64_t n0 = nb * ROWS;
{tile_dots}
      for (int64_t i = 0; i < MT; ++i) for (int64_t r = 0; r < ROWS && n0 + r < {n_rows}; ++r) {{
        const int64_t m = m0 + i, n = n0 + r;
        {store("n", *(f"{res}[i * ROWS + r]" for _, res in weights))}
      }}
    }}
"""
    code += f"""  {loop}
  for (int64_t nb = {tail_from}; nb < ({n_rows} + ROWS - 1) / ROWS; ++nb) {{
{tiles}    for (int64_t m = {first_m}; m < M; ++m) {{
      const int64_t n0 = nb * ROWS;
{blocks}
      for (int64_t r = 0; r < ROWS && n0 + r < {n_rows}; ++r) {{
        const int64_t n = n0 + r;
        {store("n", *(f"{res}[r]" for _, res in weights))}
      }}
    }}
  }}
"""
    return code


def _gemv_kernel(w: Workload, knobs: dict[str, Any]) -> str:
    p = w.params
    if w.kind == "mlp":
        return _mlp_kernel(w, knobs)
    M, N, K = (p["m"], p["n"], p["k"]) if w.kind == "gemm" else (p["batch"], p["vocab"], p["hidden"])
    store = lambda n, v: f"out[m * N + {n}] = f32_to_elem({v});"  # noqa: E731
    if knobs["pack"]:
        helpers, rows = _packed_helpers(knobs), _packed_pass(knobs, "N", "K", "xv", [("w", "res")], store)
        activation = "  float *xv = (float *)calloc(PADDED(M) * K, sizeof(float));\n" + _convert_x("xv", "x", "M", "K", packed=True)
    else:
        helpers, rows = _gemv_helpers(knobs), _row_pass(knobs, "N", "K", "xv", [("w", "res")], store)
        activation = "  xval_t *xv = (xval_t *)malloc(sizeof(xval_t) * M * K);\n" + _convert_x("xv", "x", "M", "K")
    return helpers + f"""
void autocomp_kernel(void **t, const int64_t *dims) {{
  (void)dims;
  const elem_t *x = (const elem_t *)t[0];
  const elem_t *w = (const elem_t *)t[1];
  elem_t *out = (elem_t *)t[2];
  const int64_t M = {M}, N = {N}, K = {K};
{activation}  {_omp_parallel(knobs)}
  {{
{rows}  }}
  free(xv);
}}
"""


def _mlp_kernel(w: Workload, knobs: dict[str, Any]) -> str:
    p = w.params
    B, H, I = p["batch"], p["hidden"], p["intermediate"]
    packed = bool(knobs["pack"])
    # Where h = silu(gate) * up goes: the down projection's activation, in its layout.
    def h_store(m: str, n: str, value: str) -> str:
        if packed:
            return f"hv[packed_at({m}, {n}, I)] = {value};"
        return f"hv[{m} * I + x_pos({n}, I)] = x_from_f32({value});"
    if knobs["fuse"]:
        def gate_up_store(n: str, g: str, u: str) -> str:
            return h_store("m", n, f"silu({g}) * {u}")
        epilogue = ""
        scratch = ""
    else:
        def gate_up_store(n: str, g: str, u: str) -> str:
            return f"{{ gbuf[m * I + {n}] = {g}; ubuf[m * I + {n}] = {u}; }}"
        epilogue = f"""
  {_omp_for(knobs)}
  for (int64_t i = 0; i < B * I; ++i) {h_store("i / I", "i % I", "silu(gbuf[i]) * ubuf[i]")}
"""
        scratch = "  float *gbuf = (float *)malloc(sizeof(float) * B * I), *ubuf = (float *)malloc(sizeof(float) * B * I);\n"
    free_scratch = "" if knobs["fuse"] else "  free(gbuf); free(ubuf);\n"
    # Gate and up rows of the same block are computed one after the other: x is read once for both.
    row_pass = _packed_pass if packed else _row_pass
    gate_up = row_pass(knobs, "I", "H", "xv", [("wg", "g"), ("wu", "u")], gate_up_store)
    down = row_pass(knobs, "H", "I", "hv", [("wd", "res")], lambda n, v: f"out[m * H + {n}] = f32_to_elem({v});")
    if packed:
        activations = ("  float *xv = (float *)calloc(PADDED(B) * H, sizeof(float));\n"
                       "  float *hv = (float *)calloc(PADDED(B) * I, sizeof(float));\n" + _convert_x("xv", "x", "B", "H", packed=True))
    else:
        activations = ("  xval_t *xv = (xval_t *)malloc(sizeof(xval_t) * B * H);\n"
                       "  xval_t *hv = (xval_t *)malloc(sizeof(xval_t) * B * I);\n")
    return (_packed_helpers(knobs) if packed else _gemv_helpers(knobs)) + f"""
static inline float silu(float v) {{ return v / (1.0f + expf(-v)); }}

void autocomp_kernel(void **t, const int64_t *dims) {{
  (void)dims;
  const elem_t *x = (const elem_t *)t[0];
  const elem_t *wg = (const elem_t *)t[1];
  const elem_t *wu = (const elem_t *)t[2];
  const elem_t *wd = (const elem_t *)t[3];
  elem_t *out = (elem_t *)t[4];
  const int64_t B = {B}, H = {H}, I = {I}, M = B;
{activations}{scratch}{"" if packed else _convert_x("xv", "x", "B", "H")}  {_omp_parallel(knobs)}
  {{
{gate_up}{epilogue}
{down}  }}
  free(xv); free(hv);
{free_scratch}}}
"""


# ---------------------------------------------------------------- RMSNorm


def _rmsnorm_kernel(w: Workload, knobs: dict[str, Any]) -> str:
    p = w.params
    U = knobs["unroll"]
    accs = " ".join(f"vf a{u} = v_zero();" for u in range(U))
    steps = "\n".join(
        f"      {{ vf v = v_load_elem(xr + h + {u} * VW); a{u} = v_fma(v, v, a{u}); }}" for u in range(U)
    )
    total = "a0"
    for u in range(1, U):
        total = f"v_add({total}, a{u})"
    return f"""
void autocomp_kernel(void **t, const int64_t *dims) {{
  (void)dims;
  const elem_t *x = (const elem_t *)t[0];
  const elem_t *wt = (const elem_t *)t[1];
  elem_t *out = (elem_t *)t[2];
  const int64_t R = {p["rows"]}, H = {p["hidden"]};
  const float eps = {float(p["eps"])!r}f;
  {_omp_parallel(knobs)}
  {{
  {_omp_for(knobs)}
  for (int64_t r = 0; r < R; ++r) {{
    const elem_t *xr = x + r * H;
    {accs}
    int64_t h = 0;
    for (; h + VW * {U} <= H; h += VW * {U}) {{
{steps}
    }}
    for (; h + VW <= H; h += VW) {{ vf v = v_load_elem(xr + h); a0 = v_fma(v, v, a0); }}
    float ss = v_hsum({total});
    for (; h < H; ++h) {{ float v = elem_to_f32(xr[h]); ss += v * v; }}
    const float inv = 1.0f / sqrtf(ss / (float)H + eps);
    const vf vinv = v_set1(inv);
    float tmp[VW];
    for (h = 0; h + VW <= H; h += VW) {{
      v_store_f32(tmp, v_mul(v_mul(v_load_elem(xr + h), vinv), v_load_elem(wt + h)));
      for (int i = 0; i < VW; ++i) out[r * H + h + i] = f32_to_elem(tmp[i]);
    }}
    for (; h < H; ++h) out[r * H + h] = f32_to_elem(elem_to_f32(xr[h]) * inv * elem_to_f32(wt[h]));
  }}
  }}
}}
"""


# ---------------------------------------------------------------- GQA attention

_ATTEND_COMMON = r"""
static inline float dot_qk(const float *q, const elem_t *k) {
  vf a = v_zero(); int64_t d = 0;
  for (; d + VW <= D; d += VW) a = v_fma(v_load_f32(q + d), v_load_elem(k + d), a);
  float s = v_hsum(a);
  for (; d < D; ++d) s += q[d] * elem_to_f32(k[d]);
  return s;
}
static inline void axpy_v(float *acc, float p, const elem_t *v) {
  const vf vp = v_set1(p); int64_t d = 0;
  for (; d + VW <= D; d += VW) v_store_f32(acc + d, v_fma(vp, v_load_elem(v + d), v_load_f32(acc + d)));
  for (; d < D; ++d) acc[d] += p * elem_to_f32(v[d]);
}
static inline void scale_v(float *acc, float c) {
  const vf vc = v_set1(c); int64_t d = 0;
  for (; d + VW <= D; d += VW) v_store_f32(acc + d, v_mul(vc, v_load_f32(acc + d)));
  for (; d < D; ++d) acc[d] *= c;
}
"""

# nq query rows (pre-scaled, float) attend to keys [0, lens[r]) of k/v (row stride D).
_ATTEND_ONLINE = r"""
static void attend(const float *qf, int nq, const int64_t *lens, const elem_t *k, const elem_t *v, float *o) {
  int64_t maxlen = 0;
  for (int r = 0; r < nq; ++r) if (lens[r] > maxlen) maxlen = lens[r];
  float m[nq], l[nq], s[nq][KV_BLOCK];
  for (int r = 0; r < nq; ++r) { m[r] = -INFINITY; l[r] = 0.0f; memset(o + r * D, 0, sizeof(float) * D); }
  for (int64_t j0 = 0; j0 < maxlen; j0 += KV_BLOCK) {
    const int64_t jn = maxlen - j0 < KV_BLOCK ? maxlen - j0 : KV_BLOCK;
    for (int64_t jj = 0; jj < jn; ++jj)
      for (int r = 0; r < nq; ++r)
        s[r][jj] = (j0 + jj < lens[r]) ? dot_qk(qf + r * D, k + (j0 + jj) * D) : -INFINITY;
    for (int r = 0; r < nq; ++r) {
      float bm = -INFINITY;
      for (int64_t jj = 0; jj < jn; ++jj) bm = s[r][jj] > bm ? s[r][jj] : bm;
      if (bm == -INFINITY) continue;
      const float mn = bm > m[r] ? bm : m[r];
      const float corr = expf(m[r] - mn);
      if (corr != 1.0f) { scale_v(o + r * D, corr); l[r] *= corr; }
      for (int64_t jj = 0; jj < jn; ++jj) {
        if (s[r][jj] == -INFINITY) continue;
        const float pr = expf(s[r][jj] - mn);
        l[r] += pr;
        axpy_v(o + r * D, pr, v + (j0 + jj) * D);
      }
      m[r] = mn;
    }
  }
  for (int r = 0; r < nq; ++r) scale_v(o + r * D, 1.0f / l[r]);
}
"""

_ATTEND_TWO_PASS = r"""
static void attend(const float *qf, int nq, const int64_t *lens, const elem_t *k, const elem_t *v, float *o) {
  for (int r = 0; r < nq; ++r) {
    const int64_t n = lens[r];
    float *s = (float *)malloc(sizeof(float) * (n > 0 ? n : 1));
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) { s[j] = dot_qk(qf + r * D, k + j * D); if (s[j] > mx) mx = s[j]; }
    for (int64_t j = 0; j < n; ++j) { s[j] = expf(s[j] - mx); sum += s[j]; }
    memset(o + r * D, 0, sizeof(float) * D);
    for (int64_t j = 0; j < n; ++j) axpy_v(o + r * D, s[j], v + j * D);
    scale_v(o + r * D, 1.0f / sum);
    free(s);
  }
}
"""


# One row's block of scores in the vectorised softmaxes: its max, then exp(s - max) in place and their sum.
_ROW_SOFTMAX = r"""
static inline float block_max(const float *s, int64_t n) {
  vf vm = v_set1(-INFINITY);
  for (int64_t j = 0; j < n; j += VW) vm = v_max(vm, v_load_f32(s + j));
  return v_hmax(vm);
}
static inline float exp_sum(float *s, int64_t n, float mx) {
  const vf neg = v_set1(-mx);
  vf sum = v_zero();
  for (int64_t j = 0; j < n; j += VW) {
    const vf e = v_exp(v_add(v_load_f32(s + j), neg));
    v_store_f32(s + j, e);
    sum = v_add(sum, e);
  }
  return v_hsum(sum);
}
"""


# The task's rows (HPT heads x QB query rows; fewer in a prefill's last query block) attend to their first lens[r]
# keys. Per key row read, the scores of every row that sees it (K widened once); per block, exponentials VW at a
# time; per value row read, every row's output accumulates in registers (V widened once). Online softmax
# across blocks; a row with no key in a block skips it (causal prefill), masked keys never touch its output.
_ATTEND_VECTOR = r"""
#define DV (D / VW)
#define NQ (HPT * QB)
#define KV_PAD ((KV_BLOCK + VW - 1) / VW * VW)
static void attend(const float *qf, int nq, const int64_t *lens, const elem_t *k, const elem_t *v, float *o) {
  int64_t len[NQ], L = 0;
  vf acc[NQ][DV];
  float m[NQ], l[NQ], s[NQ][KV_PAD] __attribute__((aligned(64)));
  for (int r = 0; r < NQ; ++r) {
    len[r] = r < nq ? lens[r] : 0;
    L = len[r] > L ? len[r] : L;
    m[r] = -INFINITY; l[r] = 0.0f;
    for (int d = 0; d < DV; ++d) acc[r][d] = v_zero();
  }
  for (int64_t j0 = 0; j0 < L; j0 += KV_BLOCK) {
    const int64_t jn = L - j0 < KV_BLOCK ? L - j0 : KV_BLOCK;
    for (int64_t jj = 0; jj < jn; ++jj) {
      vf kv[DV];
      /*PREFETCH*/
      for (int d = 0; d < DV; ++d) kv[d] = v_load_elem(k + (j0 + jj) * D + d * VW);
      for (int r = 0; r < NQ; ++r) {
        if (j0 + jj >= len[r]) { s[r][jj] = -INFINITY; continue; }
        vf a = v_mul(v_load_f32(qf + r * D), kv[0]);
        for (int d = 1; d < DV; ++d) a = v_fma(v_load_f32(qf + r * D + d * VW), kv[d], a);
        s[r][jj] = v_hsum(a);
      }
    }
    const int64_t jp = (jn + VW - 1) / VW * VW;
    for (int r = 0; r < NQ; ++r) {
      if (len[r] <= j0) continue;  /* no key of this block: the value loop skips the row too */
      for (int64_t jj = jn; jj < jp; ++jj) s[r][jj] = -INFINITY;
      const float bm = block_max(s[r], jp), mn = bm > m[r] ? bm : m[r];
      const float corr = expf(m[r] - mn);
      const vf vc = v_set1(corr);
      for (int d = 0; d < DV; ++d) acc[r][d] = v_mul(acc[r][d], vc);
      l[r] = l[r] * corr + exp_sum(s[r], jp, mn);
      m[r] = mn;
    }
    for (int64_t jj = 0; jj < jn; ++jj) {
      vf vv[DV];
      for (int d = 0; d < DV; ++d) vv[d] = v_load_elem(v + (j0 + jj) * D + d * VW);
      for (int r = 0; r < NQ; ++r) {
        if (j0 + jj >= len[r]) continue;
        const vf p = v_set1(s[r][jj]);
        for (int d = 0; d < DV; ++d) acc[r][d] = v_fma(p, vv[d], acc[r][d]);
      }
    }
  }
  for (int r = 0; r < nq; ++r) {
    const vf inv = v_set1(1.0f / l[r]);
    for (int d = 0; d < DV; ++d) v_store_f32(o + r * D + d * VW, v_mul(acc[r][d], inv));
  }
}
"""


# mm_tiles (causal prefill): the scores and the outputs as register-tiled products. K is transposed to fp32 once
# per call (kt: [D][S_PAD] per KV head) so that a tile of RT query rows x two key vectors accumulates over d with
# one load per key vector and one broadcast per row (no horizontal sums); the output tile (RT rows x D) accumulates
# over the block's keys in registers, one V row load per key. Softmax as in _ATTEND_VECTOR; a row with no key in
# a block gets zero weights there, and a tile stops at the last key any of its rows sees.
_ATTEND_TILED = r"""
#define DV (D / VW)
#define NQ (HPT * QB)
#define NQ_PAD ((NQ + RT - 1) / RT * RT)
#define KV_PAD ((KV_BLOCK + VW - 1) / VW * VW)
#define S_PAD ((S + KV_BLOCK - 1) / KV_BLOCK * KV_BLOCK + KV_PAD)
static void widen_v(const elem_t *v, float *vw) {
  for (int64_t i = 0; i < (int64_t)S * D; i += VW) v_store_f32(vw + i, v_load_elem(v + i));
}
static void transpose_k(const elem_t *k, float *kt) {
  for (int64_t j0 = 0; j0 < S; j0 += 16) {
    const int64_t jn = S - j0 < 16 ? S - j0 : 16;
    for (int64_t d = 0; d < D; ++d)
      for (int64_t jj = 0; jj < jn; ++jj) kt[d * S_PAD + j0 + jj] = elem_to_f32(k[(j0 + jj) * D + d]);
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = S; j < S_PAD; ++j) kt[d * S_PAD + j] = 0.0f;
}
static inline int64_t tile_len(const int64_t *len, int r0) {
  int64_t n = 0;
  for (int rr = 0; rr < RT; ++rr) n = len[r0 + rr] > n ? len[r0 + rr] : n;
  return n;
}
/* qf: NQ_PAD rows (rows from nq on are zero). */
static void attend(const float *qf, int nq, const int64_t *lens, const float *kt, const float *v, float *o) {
  int64_t len[NQ_PAD], L = 0;
  float m[NQ_PAD], l[NQ_PAD];
  float s[NQ_PAD][KV_PAD] __attribute__((aligned(64)));
  float acc[NQ_PAD][D] __attribute__((aligned(64)));
  for (int r = 0; r < NQ_PAD; ++r) {
    len[r] = r < nq ? lens[r] : 0;
    L = len[r] > L ? len[r] : L;
    m[r] = -INFINITY; l[r] = 0.0f;
    for (int d = 0; d < D; ++d) acc[r][d] = 0.0f;
  }
  for (int64_t j0 = 0; j0 < L; j0 += KV_BLOCK) {
    const int64_t jn = L - j0 < KV_BLOCK ? L - j0 : KV_BLOCK;
    const int64_t jp = (jn + VW - 1) / VW * VW;
    for (int r0 = 0; r0 < NQ_PAD; r0 += RT) {
      const int64_t tl = tile_len(len, r0);
      if (tl <= j0) continue;
      const int64_t kn = tl - j0 < jn ? tl - j0 : jn, kp = (kn + VW - 1) / VW * VW;
      int64_t jj = 0;
      for (; jj + 2 * VW <= kp; jj += 2 * VW) {
        vf a0[RT], a1[RT];
        for (int rr = 0; rr < RT; ++rr) { a0[rr] = v_zero(); a1[rr] = v_zero(); }
        const float *kp0 = kt + j0 + jj;
        for (int d = 0; d < D; ++d) {
          const vf k0 = v_load_f32(kp0 + d * S_PAD), k1 = v_load_f32(kp0 + d * S_PAD + VW);
          for (int rr = 0; rr < RT; ++rr) {
            const vf qv = v_set1(qf[(r0 + rr) * D + d]);
            a0[rr] = v_fma(qv, k0, a0[rr]);
            a1[rr] = v_fma(qv, k1, a1[rr]);
          }
        }
        for (int rr = 0; rr < RT; ++rr) { v_store_f32(&s[r0 + rr][jj], a0[rr]); v_store_f32(&s[r0 + rr][jj + VW], a1[rr]); }
      }
      for (; jj < kp; jj += VW) {
        vf a0[RT];
        for (int rr = 0; rr < RT; ++rr) a0[rr] = v_zero();
        const float *kp0 = kt + j0 + jj;
        for (int d = 0; d < D; ++d) {
          const vf k0 = v_load_f32(kp0 + d * S_PAD);
          for (int rr = 0; rr < RT; ++rr) a0[rr] = v_fma(v_set1(qf[(r0 + rr) * D + d]), k0, a0[rr]);
        }
        for (int rr = 0; rr < RT; ++rr) v_store_f32(&s[r0 + rr][jj], a0[rr]);
      }
      for (int rr = 0; rr < RT; ++rr)  /* keys past a row's length (causal diagonal, block end) */
        for (int64_t j = len[r0 + rr] - j0 > 0 ? len[r0 + rr] - j0 : 0; j < KV_PAD; ++j) s[r0 + rr][j] = -INFINITY;
    }
    for (int r = 0; r < NQ_PAD; ++r) {
      if (len[r] <= j0) {  /* no key of this block: zero weights (its tile may still run over the block) */
        for (int64_t jj = 0; jj < KV_PAD; ++jj) s[r][jj] = 0.0f;
        continue;
      }
      const float bm = block_max(s[r], jp), mn = bm > m[r] ? bm : m[r];  /* keys jn..jp are masked (-inf) */
      const float corr = expf(m[r] - mn);
      const vf vc = v_set1(corr);
      for (int d = 0; d < DV; ++d) v_store_f32(&acc[r][d * VW], v_mul(v_load_f32(&acc[r][d * VW]), vc));
      l[r] = l[r] * corr + exp_sum(s[r], jp, mn);
      m[r] = mn;
    }
    for (int r0 = 0; r0 < NQ_PAD; r0 += RT) {
      const int64_t tl = tile_len(len, r0);
      if (tl <= j0) continue;
      const int64_t kn = tl - j0 < jn ? tl - j0 : jn;
      vf a[RT][DV];
      for (int rr = 0; rr < RT; ++rr)
        for (int d = 0; d < DV; ++d) a[rr][d] = v_load_f32(&acc[r0 + rr][d * VW]);
      for (int64_t jj = 0; jj < kn; ++jj) {
        vf vv[DV];
        for (int d = 0; d < DV; ++d) vv[d] = v_load_f32(v + (j0 + jj) * D + d * VW);
        for (int rr = 0; rr < RT; ++rr) {
          const vf p = v_set1(s[r0 + rr][jj]);
          for (int d = 0; d < DV; ++d) a[rr][d] = v_fma(p, vv[d], a[rr][d]);
        }
      }
      for (int rr = 0; rr < RT; ++rr)
        for (int d = 0; d < DV; ++d) v_store_f32(&acc[r0 + rr][d * VW], a[rr][d]);
    }
  }
  for (int r = 0; r < nq; ++r) {
    const vf inv = v_set1(1.0f / l[r]);
    for (int d = 0; d < DV; ++d) v_store_f32(o + r * D + d * VW, v_mul(v_load_f32(&acc[r][d * VW]), inv));
  }
}
"""


def _kv_prefetch(distance: int) -> str:
    """Prefetch the K and V bytes `distance` past the current key row (every 64-byte line of a row)."""
    if not distance:
        return ""
    return ("for (int64_t b = 0; b < D * (int64_t)sizeof(elem_t); b += 64) {\n"
            f"        _mm_prefetch((const char *)(k + (j0 + jj) * D) + {distance} + b, _MM_HINT_T0);\n"
            f"        _mm_prefetch((const char *)(v + (j0 + jj) * D) + {distance} + b, _MM_HINT_T0);\n"
            "      }")


def _attention_kernel(w: Workload, knobs: dict[str, Any]) -> str:
    p = w.params
    B, HQ, HK, D = p["batch"], p["heads"], p["kv_heads"], p["head_dim"]
    G = HQ // HK
    heads_per_task = G if knobs["gqa_share"] else 1
    decode = p["phase"] == "decode"
    QB = 1 if decode else knobs["q_block"]
    S = p["max_kv_len"] if decode else p["seq_len"]
    tiled = knobs["mm_tiles"]
    consts = (
        f"#define B {B}\n#define HQ {HQ}\n#define HK {HK}\n#define D {D}\n#define G {G}\n"
        f"#define S {S}\n#define HPT {heads_per_task}\n#define QB {QB}\n#define KV_BLOCK {knobs['kv_block']}\n"
    )
    if tiled:
        # Rows per register tile: the output tile (RT x D/VW vectors) stays within 16 registers.
        consts += f"#define RT {max(1, min(4, 16 // (D // VECTOR_WIDTH[knobs['isa']])))}\n"
        core = VECTOR_EXP[knobs["isa"]] + _ROW_SOFTMAX + _ATTEND_TILED
    elif knobs["vec_softmax"]:
        core = VECTOR_EXP[knobs["isa"]] + _ROW_SOFTMAX + _ATTEND_VECTOR.replace("/*PREFETCH*/",
                                                                                 _kv_prefetch(knobs["prefetch"]))
    else:
        core = _ATTEND_COMMON + (_ATTEND_ONLINE if knobs["online"] else _ATTEND_TWO_PASS)
    n_qblocks = 1 if decode else "((S + QB - 1) / QB)"
    # A task: batch b, a run of HPT query heads starting at hq0 (all in KV head hq0 / G), QB query rows.
    q_row = "q + ((int64_t)(b * HQ + hq) * D)" if decode else "q + (((int64_t)(b * HQ + hq) * S + i) * D)"
    o_row = "out + ((int64_t)(b * HQ + hq) * D)" if decode else "out + (((int64_t)(b * HQ + hq) * S + i) * D)"
    length = "L" if decode else "i + 1"
    if tiled:
        keys = "kt + (int64_t)(b * HK + hk) * D * S_PAD"
        q_rows = "float qf[NQ_PAD * D];\n    memset(qf, 0, sizeof qf);"
        # K^T for every KV head, before any task reads it (the loop's end is a barrier).
        # K^T and V in fp32 for every KV head, before any task reads them (the loop's end is a barrier).
        setup = ("float *kt = (float *)malloc(sizeof(float) * B * HK * D * S_PAD);\n"
                 "  float *vw = (float *)malloc(sizeof(float) * B * HK * S * D);\n  if (!kt || !vw) abort();")
        prepass = (f"{_omp_for(knobs)}\n  for (int64_t bh = 0; bh < B * HK; ++bh) {{\n"
                   "    transpose_k(kc + bh * S * D, kt + bh * D * S_PAD);\n"
                   "    widen_v(vc + bh * S * D, vw + bh * S * D);\n  }")
        teardown = "free(kt); free(vw);"
        values = "vw + (int64_t)(b * HK + hk) * S * D"
    else:
        keys = "kc + (int64_t)(b * HK + hk) * S * D"
        values = "vc + (int64_t)(b * HK + hk) * S * D"
        q_rows = "float qf[nq * D];"
        setup = prepass = teardown = ""
    return consts + core + f"""
void autocomp_kernel(void **t, const int64_t *dims) {{
  const elem_t *q = (const elem_t *)t[0];
  const elem_t *kc = (const elem_t *)t[1];
  const elem_t *vc = (const elem_t *)t[2];
  elem_t *out = (elem_t *)t[3];
  const int64_t L = {"dims[0]" if decode else "S"};
  (void)dims; (void)L;
  const float scale = 1.0f / sqrtf((float)D);
  const int64_t n_tasks = (int64_t)B * (HQ / HPT) * {n_qblocks};
  {setup}
  {_omp_parallel(knobs)}
  {{
  {prepass}
  {_omp_for(knobs)}
  for (int64_t task = 0; task < n_tasks; ++task) {{
    const int64_t qblk = task % {n_qblocks};
    const int64_t hq0 = ((task / {n_qblocks}) % (HQ / HPT)) * HPT;
    const int64_t b = task / {n_qblocks} / (HQ / HPT);
    const int64_t hk = hq0 / G;
    const int64_t i0 = qblk * QB;
    const int64_t i_end = i0 + QB < {1 if decode else "S"} ? i0 + QB : {1 if decode else "S"};
    const int nq = (int)(HPT * (i_end - i0));
    {q_rows}
    float of[nq * D];
    int64_t lens[nq];
    int r = 0;
    for (int64_t hq = hq0; hq < hq0 + HPT; ++hq)
      for (int64_t i = i0; i < i_end; ++i, ++r) {{
        (void)i;
        const elem_t *qr = {q_row};
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] = elem_to_f32(qr[d]) * scale;
        lens[r] = {length};
      }}
    attend(qf, nq, lens, {keys}, {values}, of);
    r = 0;
    for (int64_t hq = hq0; hq < hq0 + HPT; ++hq)
      for (int64_t i = i0; i < i_end; ++i, ++r) {{
        (void)i;
        elem_t *orow = {o_row};
        for (int64_t d = 0; d < D; ++d) orow[d] = f32_to_elem(of[r * D + d]);
      }}
  }}
  }}
  {teardown}
}}
"""


# ---------------------------------------------------------------- causal prefill attention on AMX tiles

# A task: 16 query rows of one head, kept as the 16 lanes of a vector. Per KV block the AMX tiles compute the
# transposed scores S^T = K Q^T (A: 16 key rows x 32 d of K, B: Q's d-pairs x 16 queries) and the transposed
# output O^T += V^T P^T (A: 16 d x 32 keys of V^T, B: key pairs x 16 queries of P^T, bf16), so that the online
# softmax runs down the keys a vector of 16 queries at a time: no horizontal max or sum, one exp per key.
# Per call, K is copied zero-padded to the block size and V transposed (vt[D][S_PAD]). Tiles: C 0-3, A 4, B 5.
_AMX_COMMON = r"""
#define QT 16
#define S_PAD ((S + KV_BLOCK - 1) / KV_BLOCK * KV_BLOCK)
typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } amx_config;
static void amx_configure(void) {
  amx_config c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int i = 0; i < 6; ++i) { c.rows[i] = 16; c.colsb[i] = 64; }
  _tile_loadconfig(&c);
}
static void pack_kv(const elem_t *k, const elem_t *v, elem_t *kpad, elem_t *vt) {
  memcpy(kpad, k, sizeof(elem_t) * S * D);
  memset(kpad + (int64_t)S * D, 0, sizeof(elem_t) * (S_PAD - S) * D);
  for (int64_t j0 = 0; j0 < S_PAD; j0 += 16)
    for (int64_t d = 0; d < D; ++d)
      for (int64_t j = j0; j < j0 + 16; ++j) vt[d * S_PAD + j] = j < S ? v[j * D + d] : 0;
}
"""


def _tile_products(n: int, init: Callable[[int], str], steps: str, b: str, a: Callable[[int], str],
                   store: Callable[[int], str], guard: Callable[[int], str]) -> list[str]:
    """C lines: C tiles 0..n-1 start as `init(t)`; for ks < `steps`, B (tile 5, at `b`) is loaded once and each
    A (tile 4, at `a(t)`) multiplied into C tile t; then each C is stored at `store(t)`. `guard(t)`: whether C
    tile t takes part (a C condition)."""
    lines = [f"      {init(t)};" for t in range(n)]
    lines += [f"      for (int ks = 0; ks < {steps}; ++ks) {{", f"        _tile_loadd(5, {b});"]
    lines += [f"        if ({guard(t)}) {{ _tile_loadd(4, {a(t)}); _tile_dpbf16ps({t}, 4, 5); }}" for t in range(n)]
    lines.append("      }")
    return lines + [f"      if ({guard(t)}) _tile_stored({t}, {store(t)});" for t in range(n)]


def _attention_amx_kernel(w: Workload, knobs: dict[str, Any]) -> str:
    p = w.params
    B, HQ, HK, D, S = p["batch"], p["heads"], p["kv_heads"], p["head_dim"], p["seq_len"]
    KV = knobs["kv_block"]

    def scores(c0: int, n: int) -> list[str]:  # key tiles c0..c0+n of the block into st
        return [f"    if (nk > {c0}) {{"] + _tile_products(
            n, init=lambda t: f"_tile_zero({t})", steps="D / 32", b="&qp[ks * 16][0], 64",
            a=lambda t: f"kpad + (j0 + {(c0 + t) * 16}) * D + ks * 32, D * 2",
            store=lambda t: f"&st[{(c0 + t) * 16}][0], 64", guard=lambda t: f"nk > {c0 + t}") + ["    }"]

    def outputs(g: int, n: int) -> list[str]:  # output tiles (16 d each) g..g+n: acc^T += V^T P^T
        return _tile_products(
            n, init=lambda t: f"_tile_loadd({t}, &acc[{(g + t) * 16}][0], 64)", steps="(nk + 1) / 2",
            b="&pb[ks * 16][0], 64", a=lambda t: f"vt + (int64_t){(g + t) * 16} * S_PAD + j0 + ks * 32, S_PAD * 2",
            store=lambda t: f"&acc[{(g + t) * 16}][0], 64", guard=lambda t: "1")

    score_code = "\n".join(line for c0 in range(0, KV // 16, 4) for line in scores(c0, min(4, KV // 16 - c0)))
    output_code = "\n".join(line for g in range(0, D // 16, 4) for line in outputs(g, min(4, D // 16 - g)))
    return (f"#define B {B}\n#define HQ {HQ}\n#define HK {HK}\n#define D {D}\n#define G {HQ // HK}\n#define S {S}\n"
            f"#define KV_BLOCK {KV}\n") + VECTOR_EXP["amx"] + _AMX_COMMON + f"""
static void attend_rows(const elem_t *q, int64_t i0, int nrow, const elem_t *kpad, const elem_t *vt, elem_t *out,
                        float scale) {{
  uint32_t qp[D / 2][QT] __attribute__((aligned(64)));          /* B: Q's d-pairs x queries */
  float st[KV_BLOCK][QT] __attribute__((aligned(64)));          /* scores, then probabilities: key x queries */
  uint16_t pb[KV_BLOCK / 2][2 * QT] __attribute__((aligned(64)));  /* B: key pairs x queries (bf16 pairs) */
  float acc[D][QT] __attribute__((aligned(64)));                /* O^T */
  const uint32_t *q32 = (const uint32_t *)q;
  for (int dp = 0; dp < D / 2; ++dp)
    for (int r = 0; r < QT; ++r) qp[dp][r] = r < nrow ? q32[(i0 + r) * (D / 2) + dp] : 0u;
  memset(acc, 0, sizeof acc);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  vf m = v_set1(-INFINITY), l = v_zero();
  const vf vscale = v_set1(scale), ninf = v_set1(-INFINITY);
  const int64_t L = i0 + nrow;  /* query i0 + r sees keys [0, i0 + r] */
  for (int64_t j0 = 0; j0 < L; j0 += KV_BLOCK) {{
    const int64_t jn = L - j0 < KV_BLOCK ? L - j0 : KV_BLOCK;
    const int nk = (int)((jn + 15) / 16), np = 16 * nk;  /* key tiles and keys computed */
{score_code}
    vf bm0 = ninf, bm1 = ninf;
    for (int jj = 0; jj < np; jj += 2) {{
      const __mmask16 see0 = _mm512_cmp_epi32_mask(lane, _mm512_set1_epi32((int)(j0 + jj - i0)), _MM_CMPINT_NLT);
      const __mmask16 see1 = _mm512_cmp_epi32_mask(lane, _mm512_set1_epi32((int)(j0 + jj + 1 - i0)), _MM_CMPINT_NLT);
      const vf x0 = _mm512_mask_blend_ps(see0, ninf, v_mul(v_load_f32(st[jj]), vscale));
      const vf x1 = _mm512_mask_blend_ps(see1, ninf, v_mul(v_load_f32(st[jj + 1]), vscale));
      v_store_f32(st[jj], x0); v_store_f32(st[jj + 1], x1);
      bm0 = v_max(bm0, x0); bm1 = v_max(bm1, x1);
    }}
    const vf mn = v_max(m, v_max(bm0, bm1));
    /* a query's first block: no earlier sum to correct (and -inf - -inf would be NaN) */
    const vf corr = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m, ninf, _CMP_EQ_OQ), v_exp(v_add(m, v_mul(mn, v_set1(-1.0f)))), v_zero());
    const vf neg = v_mul(mn, v_set1(-1.0f));
    vf sum0 = v_zero(), sum1 = v_zero();
    for (int jj = 0; jj < np; jj += 2) {{
      const vf p0 = v_exp(v_add(v_load_f32(st[jj]), neg)), p1 = v_exp(v_add(v_load_f32(st[jj + 1]), neg));
      sum0 = v_add(sum0, p0); sum1 = v_add(sum1, p1);
      const __m512i two = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);  /* p0's 16 then p1's 16 */
      _mm512_store_si512((__m512i *)pb[jj / 2], _mm512_permutexvar_epi16(pairs, two));
    }}
    if (np % 32) memset(pb[np / 2], 0, sizeof pb[0] * 8);  /* the last A tile's half without keys */
    l = v_add(v_mul(l, corr), v_add(sum0, sum1));
    m = mn;
    for (int d = 0; d < D; ++d) v_store_f32(acc[d], v_mul(v_load_f32(acc[d]), corr));
{output_code}
  }}
  const vf inv = _mm512_div_ps(v_set1(1.0f), l);
  for (int d = 0; d < D; ++d) {{
    float o[QT] __attribute__((aligned(64)));
    v_store_f32(o, v_mul(v_load_f32(acc[d]), inv));
    for (int r = 0; r < nrow; ++r) out[(i0 + r) * D + d] = f32_to_elem(o[r]);
  }}
}}

void autocomp_kernel(void **t, const int64_t *dims) {{
  const elem_t *q = (const elem_t *)t[0];
  const elem_t *kc = (const elem_t *)t[1];
  const elem_t *vc = (const elem_t *)t[2];
  elem_t *out = (elem_t *)t[3];
  (void)dims;
  const float scale = 1.0f / sqrtf((float)D);
  elem_t *kpad = (elem_t *)malloc(sizeof(elem_t) * B * HK * S_PAD * D);
  elem_t *vt = (elem_t *)malloc(sizeof(elem_t) * B * HK * D * S_PAD);
  if (!kpad || !vt) abort();
  const int64_t n_qblocks = (S + QT - 1) / QT, n_tasks = (int64_t)B * HQ * n_qblocks;
  {_omp_parallel(knobs)}
  {{
  {_omp_for(knobs)}
  for (int64_t bh = 0; bh < B * HK; ++bh)
    pack_kv(kc + bh * S * D, vc + bh * S * D, kpad + bh * S_PAD * D, vt + bh * D * S_PAD);
  amx_configure();
  {_omp_for(knobs)}
  for (int64_t task = 0; task < n_tasks; ++task) {{
    /* the longest rows first: causal rows late in the sequence see the most keys */
    const int64_t qblk = n_qblocks - 1 - task % n_qblocks, bhq = task / n_qblocks;
    const int64_t b = bhq / HQ, hq = bhq % HQ, hk = hq / G;
    const int64_t i0 = qblk * QT;
    const int nrow = S - i0 < QT ? (int)(S - i0) : QT;
    attend_rows(q + (b * HQ + hq) * S * D, i0, nrow, kpad + (b * HK + hk) * S_PAD * D,
                vt + (b * HK + hk) * D * S_PAD, out + (b * HQ + hq) * S * D, scale);
  }}
  _tile_release();
  }}
  free(kpad); free(vt);
}}
"""
