"""Optimization menus: named, documented optimizations, each a concrete change of a kernel's schedule.

An LLM planner sees the menu as text (id, title, description); the offline proposer applies
`MenuItem.apply`, which moves one or more knobs of the parent's schedule, drawing any parameter
(a block size, a prefetch distance) from the given random generator.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from autocomp_compile.targets.cpu.codegen import (
    KNOB_CHOICES, activation_rows, family, isa_applies, m_tile_fits, output_rows, pack_fits, spans_fit,
)
from autocomp_compile.targets.cpu.isa import VECTOR_WIDTH
from autocomp_compile.workload import Workload

Knobs = dict[str, Any]


@dataclass(frozen=True)
class MenuItem:
    id: str
    title: str
    description: str
    applies: Callable[[Knobs], bool]
    apply: Callable[[Knobs, random.Random], Knobs]
    # "compute" for an item that raises arithmetic throughput (more FMAs per instruction, per load, per
    # conversion), which a compute-bound workload needs first (`ScheduleProposer`); "" for the others.
    relieves: str = ""

    def as_text(self) -> str:
        return f"- [{self.id}] {self.title}: {self.description}"


def _pick_other(choices: tuple, current: Any, rng: random.Random, above: bool = False) -> Any:
    options = [c for c in choices if c != current and (not above or c > current)]
    return rng.choice(options) if options else current


def cpu_menu(w: Workload, isas: list[str]) -> list[MenuItem]:
    """The CPU optimization menu for workload `w` on a host with vector ISAs `isas`."""
    fam = family(w.kind)
    choices = KNOB_CHOICES[fam]
    simd = [i for i in isas if i != "scalar" and isa_applies(i, w)]
    items: list[MenuItem] = []

    if simd:
        items.append(MenuItem(
            "vectorize", "Use SIMD vectors",
            "Replace scalar loops by vector loads and fused multiply-adds with the host's vector ISA "
            f"({', '.join(simd)}), converting bf16 to fp32 in registers.",
            lambda k: k["isa"] == "scalar",
            lambda k, r: {**k, "isa": r.choice(simd)},
            "compute",
        ))
    wider = [i for i in simd if i.startswith("avx512")]
    if wider:
        items.append(MenuItem(
            "wider_vectors", "Use 512-bit vectors",
            "Move from 256-bit AVX2 to 512-bit AVX-512 registers: twice the elements per instruction.",
            lambda k: k["isa"] == "avx2",
            # a packed kernel multiplies fp32 panels: with AVX512-BF16 it is the AVX-512 kernel (legalize)
            lambda k, r: {**k, "isa": r.choice([i for i in wider if not (k.get("pack") and i == "avx512bf16")] or wider)},
            "compute",
        ))
    items += [
        MenuItem(
            "parallelize", "Split the outer loop across cores",
            "Run the outermost independent loop with OpenMP on every core (static split).",
            lambda k: k["threads"] == "serial",
            lambda k, r: {**k, "threads": "static", "chunk": 0},
        ),
        MenuItem(
            "dynamic_schedule", "Balance work dynamically",
            "Use an OpenMP dynamic schedule with a chunk size, so cores that finish early take more work.",
            lambda k: True,
            lambda k, r: {**k, "threads": "dynamic", "chunk": _pick_other(choices["chunk"][1:], k["chunk"], r)},
        ),
    ]
    if fam == "gemv":
        dots = lambda k: not k["pack"]  # noqa: E731 - items that refine the dot-product kernels
        items += [
            MenuItem(
                "block_rows", "Block output rows",
                "Compute several output rows per pass over the activation vector: the activation is loaded "
                "once for all of them and more independent loads are in flight.",
                dots,
                lambda k, r: {**k, "rows": _pick_other(choices["rows"], k["rows"], r)},
            ),
            MenuItem(
                "unroll_k", "Unroll the reduction loop",
                "Unroll the K loop with independent accumulators to hide FMA latency and cut loop overhead.",
                dots,
                lambda k, r: {**k, "unroll": _pick_other(choices["unroll"], k["unroll"], r)},
            ),
            MenuItem(
                "stream_spans", "Stream rows from distant parts of the weights",
                "Split the output rows into S equal spans and compute a block of rows at the same place in every "
                "span at once (S x rows x unroll accumulators, at most 16), so that each core streams S long runs "
                "of consecutive weight rows, which the hardware prefetchers follow, instead of starting a new "
                "block of rows every few kilobytes.",
                lambda k: dots(k) and k["isa"] != "scalar" and bool(_span_options(w, k)),
                lambda k, r: _with_spans(w, k, r.choice(_span_options(w, k))),
            ),
            MenuItem(
                "prefetch", "Software prefetch of weight rows",
                "Issue prefetches a fixed distance ahead in every weight row so DRAM latency is hidden.",
                lambda k: dots(k) and k["isa"] != "scalar",
                lambda k, r: {**k, "prefetch": _pick_other(choices["prefetch"][1:], k["prefetch"], r)},
            ),
            MenuItem(
                "prefetch_hint", "Prefetch cache level",
                "Prefetch into L1 (T0), L2 (T1) or with the non-temporal hint (NTA): weights are read once, so "
                "keeping them out of L1 can leave room for the activation.",
                lambda k: k["prefetch"] > 0,
                lambda k, r: {**k, "prefetch_hint": _pick_other(("t0", "t1", "nta"), k["prefetch_hint"], r)},
            ),
        ]
        if activation_rows(w) > 1:
            items.append(MenuItem(
                "register_tile", "Register tile of activation rows",
                "With several activation rows (a batch or a prompt), compute a tile of MT activation rows x ROWS "
                "weight rows per pass (MT x rows x unroll accumulators, at most 16): each weight vector is loaded "
                "and widened once and used for all MT rows, and each activation vector once for all ROWS rows, "
                "so the kernel does FMAs instead of loads and conversions (the GEMM of a prefill is bound by "
                "compute, not by memory).",
                lambda k: dots(k) and bool(_m_tile_options(w, k)),
                lambda k, r: _with_m_tile(w, k, r.choice(_m_tile_options(w, k))),
                "compute",
            ))
        if activation_rows(w) > 1 and simd:
            other_tile = lambda k, r: {**k, **dict(zip(("pack", "pack_rows"), r.choice(_pack_options(w, k))))}  # noqa: E731
            items += [
                MenuItem(
                    "pack_panels", "Packed weight panels (outer products)",
                    "With several activation rows (a prompt, a batch), widen a panel of NR weight rows to fp32 once "
                    "into a per-core buffer and store the activation transposed in blocks of V vectors of rows; the "
                    "inner step broadcasts one weight per panel row against the V activation vectors: NR x V FMAs "
                    "for NR + V loads, no conversions and no horizontal sums (the classic GEMM micro-kernel, for "
                    "prefill GEMMs that are bound by compute).",
                    lambda k: not k["pack"] and k["isa"] != "scalar" and bool(_pack_options(w, k)),
                    lambda k, r: {**k, **dict(zip(("pack", "pack_rows"), _first_panel(w, k)))},
                    "compute",
                ),
                MenuItem(
                    "panel_shape", "Reshape the packed tile",
                    "Change the packed tile's activation vectors (V) and weight rows (NR) within the vector "
                    "registers: more rows reuse each activation load, more vectors each broadcast weight.",
                    lambda k: bool(k["pack"]) and bool(_pack_options(w, k)),
                    other_tile,
                    "compute",
                ),
            ]
        if w.dtype == "bf16" and any(i in ("avx2", "avx512") for i in isas):
            items.append(MenuItem(
                "bf16_split", "Even/odd bf16 split",
                "Load 2x the vector width of bf16 weights at once and widen even and odd elements with a "
                "shift and a mask, against an activation stored de-interleaved to match.",
                lambda k: dots(k) and k["isa"] in ("avx2", "avx512") and not k["bf16_split"],
                lambda k, r: {**k, "bf16_split": True},
            ))
        if "avx512bf16" in isas and w.dtype == "bf16":
            items.append(MenuItem(
                "bf16_dot", "bf16 dot-product instructions",
                "Keep the activation in bf16 and use vdpbf16ps: 32 products per instruction, fp32 accumulation.",
                lambda k: dots(k) and k["isa"] != "avx512bf16",
                lambda k, r: {**k, "isa": "avx512bf16", "bf16_split": False},
                "compute",
            ))
        if w.kind == "mlp":
            items.append(MenuItem(
                "fuse_epilogue", "Fuse SiLU(gate) * up",
                "Compute gate and up rows together and apply SiLU and the product in registers, instead of "
                "writing both projections to memory and combining them in a separate pass.",
                lambda k: not k["fuse"],
                lambda k, r: {**k, "fuse": True},
            ))
    elif fam == "attention":
        items += [
            MenuItem(
                "online_softmax", "Online softmax",
                "One pass over the KV cache in blocks: keep a running max and sum per query row and rescale the "
                "accumulator, instead of materialising all scores and reading them twice.",
                lambda k: not k["online"],
                lambda k, r: {**k, "online": True, "kv_block": r.choice(choices["kv_block"])},
            ),
            MenuItem(
                "kv_block", "Retune the KV block",
                "Change how many keys are scored per block of the online softmax (register and L1 reuse).",
                lambda k: k["online"],
                lambda k, r: {**k, "kv_block": _pick_other(choices["kv_block"], k["kv_block"], r)},
            ),
            MenuItem(
                "gqa_share", "Share K/V across the GQA group",
                "Process all query heads that share one KV head together, so each K and V row is read once "
                "per group instead of once per query head.",
                lambda k: not k["gqa_share"] and k["isa"] != "amx",  # the AMX kernel: one head per task
                lambda k, r: {**k, "gqa_share": True},
            ),
        ]
        if simd:
            items.append(MenuItem(
                "vec_softmax", "Vectorised online softmax",
                "Score every query row of the task per key row read, take the block's exponentials a vector at a "
                "time (polynomial exp), and accumulate the output rows in registers per value row read.",
                lambda k: (not k["vec_softmax"] and k["isa"] != "scalar"
                           and w.params["head_dim"] % VECTOR_WIDTH[k["isa"]] == 0),
                lambda k, r: {**k, "vec_softmax": True, "online": True, "prefetch": r.choice(choices["prefetch"])},
            ))
            items.append(MenuItem(
                "prefetch", "Software prefetch of the KV cache",
                "Prefetch K and V rows a distance ahead of the key being scored (the cache streams from memory).",
                lambda k: k["vec_softmax"] and not k["mm_tiles"] and k["isa"] not in ("scalar", "amx"),
                lambda k, r: {**k, "prefetch": _pick_other(choices["prefetch"], k["prefetch"], r)},
            ))
        if w.params["phase"] == "prefill" and simd:
            items.append(MenuItem(
                "mm_tiles", "Register-tiled score and output products",
                "Transpose K to fp32 once per call, then compute each block's scores as a tile of query rows x two "
                "key vectors accumulated over the head dimension (no horizontal sums), and the outputs as a tile of "
                "query rows x the head dimension accumulated over the block's keys, all in registers.",
                lambda k: k["vec_softmax"] and not k["mm_tiles"] and k["isa"] not in ("scalar", "amx"),
                lambda k, r: {**k, "mm_tiles": True, "q_block": max(k["q_block"], r.choice((4, 8)))},
            ))
        if w.params["phase"] == "prefill" and "amx" in simd:
            items.append(MenuItem(
                "amx_tiles", "AMX tile products",
                "Compute the scores and the outputs of 16 query rows on the AMX tile unit (bf16 in, fp32 out), "
                "transposed so that the online softmax runs over keys with one vector of 16 queries per key.",
                lambda k: k["isa"] != "amx",
                lambda k, r: {**k, "isa": "amx", "kv_block": r.choice((32, 64, 128))},
            ))
        if w.params["phase"] == "prefill":
            items.append(MenuItem(
                "q_block", "Block query rows",
                "Attend several consecutive query rows per pass over K/V so that each key row is reused from cache.",
                lambda k: k["isa"] != "amx",  # the AMX kernel takes 16 rows
                lambda k, r: {**k, "q_block": _pick_other(choices["q_block"], k["q_block"], r)},
            ))
    elif fam == "rmsnorm":
        items.append(MenuItem(
            "unroll_k", "Unroll the sum of squares",
            "Unroll the reduction with independent accumulators.",
            lambda k: True,
            lambda k, r: {**k, "unroll": _pick_other(choices["unroll"], k["unroll"], r)},
        ))
    return items


def menu_text(items: list[MenuItem]) -> str:
    return "\n".join(item.as_text() for item in items)


def apply_dropout(items: list[MenuItem], dropout: float, rng: random.Random) -> list[MenuItem]:
    """Each item survives with probability 1 - dropout (Autocomp's menu dropout, default 0.7)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return [item for item in items if rng.random() >= dropout]


def _switch_on(item_id: str, title: str, description: str, knob: str, when: Callable[[Knobs], bool] = lambda k: True,
               **also: Any) -> MenuItem:
    """An item that turns boolean `knob` on (and sets `also`), offered while `when` holds and it is off."""
    return MenuItem(item_id, title, description, lambda k: when(k) and not k[knob], lambda k, r: {**k, knob: True, **also})


def _retune(item_id: str, title: str, description: str, knob: str, choices: tuple,
            when: Callable[[Knobs], bool] = lambda k: True) -> MenuItem:
    """An item that moves `knob` to another of its `choices`, drawn with the proposer's generator."""
    return MenuItem(item_id, title, description, when, lambda k, r: {**k, knob: _pick_other(choices, k[knob], r)})


def _span_options(w: Workload, k: Knobs) -> list[int]:
    """Span counts other than the current one that leave room for at least one row per span."""
    return [s for s in KNOB_CHOICES["gemv"]["spans"] if s != k["spans"] and spans_fit(w, s, 1, k["unroll"])]


def _with_spans(w: Workload, k: Knobs, spans: int) -> Knobs:
    """`spans` spans, with as many of the current rows per span as the accumulators and output rows allow; a
    register tile of activation rows is dropped (spans stream the weights for one activation row at a time)."""
    fits = [r for r in KNOB_CHOICES["gemv"]["rows"] if r <= k["rows"] and spans_fit(w, spans, r, k["unroll"])]
    return {**k, "spans": spans, "rows": max(fits, default=1), "m_tile": 1}


def _m_tile_options(w: Workload, k: Knobs) -> list[int]:
    """Register-tile heights other than the current one that fit the activation rows (with one weight row)."""
    return [t for t in KNOB_CHOICES["gemv"]["m_tile"] if t != k["m_tile"] and m_tile_fits(w, t, 1, 1)]


def _with_m_tile(w: Workload, k: Knobs, m_tile: int) -> Knobs:
    """A tile `m_tile` activation rows high, with as many of the current weight rows (and unrolled steps) as the
    accumulators allow; spans are dropped (a tile reads its weight rows once for all its activation rows)."""
    unroll = k["unroll"] if m_tile_fits(w, m_tile, 1, k["unroll"]) else 1
    fits = [r for r in KNOB_CHOICES["gemv"]["rows"] if r <= k["rows"] and m_tile_fits(w, m_tile, r, unroll)]
    return {**k, "m_tile": m_tile, "unroll": unroll, "rows": max(fits, default=1), "spans": 1}


def _first_panel(w: Workload, k: Knobs) -> tuple[int, int]:
    """The packed tile `pack_panels` starts from: the most FMAs per load (V x NR over V + NR loads) among the tiles
    that leave a vector register spare, larger tiles first among equals: the analytical choice of a GEMM micro-kernel
    (2 x 6 on AVX2's 16 registers, the fastest tile measured on an AMD EPYC; a random tile, as before, was most
    often a small one, slower than the dot-product kernels, and the search dropped panels there). `panel_shape`
    then tries the others."""
    options = _pack_options(w, k)
    spare = [(v, r) for v, r in options if pack_fits(k["isa"], v, r, spare=1)] or options
    return max(spare, key=lambda t: (t[0] * t[1] / (t[0] + t[1]), t[0] * t[1]))


def _pack_options(w: Workload, k: Knobs) -> list[tuple[int, int]]:
    """Packed tiles (activation vectors, weight rows) other than the current one that fit the vector registers,
    with no more vectors than the activation rows fill and no more weight rows than the output has."""
    width = VECTOR_WIDTH.get(k["isa"], 1)
    vectors = [v for v in KNOB_CHOICES["gemv"]["pack"] if v and (v - 1) * width < activation_rows(w)]
    return [(v, r) for v in vectors for r in KNOB_CHOICES["gemv"]["pack_rows"]
            if (v, r) != (k["pack"], k["pack_rows"]) and r <= output_rows(w) and pack_fits(k["isa"], v, r)]


def cuda_menu(w: Workload) -> list[MenuItem]:
    """The CUDA optimization menu for workload `w`."""
    from autocomp_compile.targets.cuda.codegen import KNOB_CHOICES as CUDA_CHOICES
    from autocomp_compile.targets.cuda.codegen import down_t_fits
    from autocomp_compile.targets.cuda.codegen import family as cuda_family

    fam = cuda_family(w.kind)
    choices = CUDA_CHOICES[fam]
    tiled = lambda k: not k["naive"]  # noqa: E731 - most items refine the tiled kernel
    if fam == "gemv":
        tensor_cores = lambda k: not k["naive"] and k["mma"]  # noqa: E731
        # the GEMV items refine the CUDA-core GEMV kernels; the streaming MLP (down_t) has only warps, chunk, hints
        tiled = lambda k: not k["naive"] and not k["mma"] and not k["down_t"]  # noqa: E731
    two_kernel = lambda k: tiled(k) and not (k["fuse_down"] or k["persistent"])  # noqa: E731 - MLP: gate/up, down
    leave_naive = lambda k, r: {**k, "naive": False}  # noqa: E731
    items: list[MenuItem] = []
    if fam == "gemv":
        items += [
            MenuItem("warp_per_row", "Warp per output row",
                     "Give each output row to a warp: lanes read consecutive weight elements (coalesced), "
                     "and a warp-shuffle reduction sums the partial dot products.",
                     lambda k: k["naive"], leave_naive),
            _switch_on("vector_loads", "16-byte vector loads",
                       "Load weights as 16-byte vectors (8 bf16 per lane), so each warp request moves 512 bytes.",
                       "vec", tiled),
            _retune("block_rows", "Rows per warp",
                    "Let each warp compute several output rows so more independent loads are in flight.",
                    "rows", choices["rows"], tiled),
            _retune("unroll_loads", "Unroll and batch loads",
                    "Issue several iterations' loads before the first FMA (memory-level parallelism).",
                    "unroll", choices["unroll"], tiled),
            _retune("split_k", "Split K across warps",
                    "Let several warps of a block share a row group, each summing a slice of K, reduced in shared "
                    "memory: more parallelism when rows are few and long (in the MLP: both projections, unless "
                    "the down projection has its own schedule).",
                    "ksplit", choices["ksplit"], tiled),
            _retune("block_size", "Retune warps per block",
                    "Change the number of warps per block (occupancy vs. scheduling granularity).",
                    "warps", choices["warps"], lambda k: not k["naive"]),
            _switch_on("stage_x_smem", "Stage the activation in shared memory",
                       "Copy the activation vector to shared memory once per block as float, instead of re-reading "
                       "and widening it from global memory for every row.",
                       "x_smem", tiled),
            _switch_on("stream_loads", "Streaming (evict-first) weight loads",
                       "Load weights with the cache-streaming hint: they are read once, so they should not "
                       "push data that will be reused out of L2.",
                       "stream_loads", lambda k: not k["naive"] and not k["mma"]),
        ]
        if w.dtype == "bf16" and activation_rows(w) >= 16:  # prefill: enough rows to fill a 16-row fragment
            items += [
                _switch_on("tensor_cores", "Tensor-core GEMM (mma.sync, cp.async pipeline)",
                           "With many activation rows the GEMV is compute-bound: tile the output into blocks, stage "
                           "K slices of x and W in shared memory with cp.async, and multiply 16x8x16 fragments on "
                           "the tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate); the MLP's gate/up "
                           "kernel applies SiLU * mul to its accumulators.", "mma", lambda k: not k["naive"]),
                _retune("mma_tile_m", "Rows per tensor-core block tile",
                        "Change the output rows each block owns (reuse of every weight tile vs. blocks to fill the GPU).",
                        "tile_m", choices["tile_m"], tensor_cores),
                _retune("mma_tile_n", "Columns per tensor-core block tile",
                        "Change the output columns each block owns (reuse of every activation tile vs. parallelism).",
                        "tile_n", choices["tile_n"], tensor_cores),
                _switch_on("ldmatrix", "Load fragments with ldmatrix",
                           "Read the mma fragments from shared memory with ldmatrix.sync (one instruction moves four "
                           "8x8 bf16 matrices into the fragment layout) instead of one 32-bit load per register: "
                           "4x fewer shared-memory instructions per mma.", "ldmatrix", tensor_cores),
                _retune("mma_stages", "Shared-memory pipeline depth",
                        "Change how many K slices are in flight (cp.async ring of 1-4 stages): deeper hides more "
                        "memory latency, costs shared memory and so occupancy.", "stages", choices["stages"],
                        tensor_cores),
            ]
        if w.kind == "mlp":
            items += [
                _switch_on("l2_prefetch_down", "Prefetch the down projection into L2",
                           "While the gate/up kernel streams its weights, have each block prefetch its share of "
                           "the down-projection weights into L2 (evict-last), so the second kernel reads from L2.",
                           "l2_prefetch", lambda k: tiled(k) and k["fuse"], stream_loads=True),
                _switch_on("fuse_epilogue", "Fuse gate, up and SiLU*mul",
                           "One kernel computes the gate and up rows together and applies SiLU and the product "
                           "in registers: two launches and two intermediate round trips fewer.",
                           "fuse", lambda k: not k["mma"] and not k["down_t"]),
                _switch_on("one_kernel_mlp", "Whole MLP in one kernel (split the intermediate dimension)",
                           "Give each block a chunk of the intermediate rows: it computes SiLU(gate) * up for them "
                           "in shared memory, multiplies by the matching columns of the down projection and adds "
                           "its partial sums with fp32 atomics; the last block writes the output. No launch waits "
                           "for another, and every block streams all three weights at once.",
                           "fuse_down", tiled, vec=True),
                _switch_on("streaming_mlp", "Whole MLP in one streaming kernel (down projection read transposed)",
                           "Read the down projection transposed (a copy made once per weight), so that row j of "
                           "gate, up and down-transposed are contiguous: each warp issues all loads of its three "
                           "rows at once, computes h_j = SiLU(gate_j . x) * (up_j . x) and adds h_j * down_j to a "
                           "partial output in registers; blocks add their partial outputs with 16-byte fp32 "
                           "reductions and the last block writes the result. One pass over the weights, no "
                           "dependency between kernels, every read a whole contiguous row.", "down_t",
                           lambda k: tiled(k) and down_t_fits(w)),
                _switch_on("persistent_mlp", "Whole MLP in one persistent kernel (grid barrier)",
                           "Launch only as many blocks as fit on the GPU at once: warps compute SiLU(gate) * up "
                           "row by row into global memory, all blocks meet at a grid barrier, then each block "
                           "copies the activation into shared memory and its warps read whole, contiguous rows "
                           "of the down projection. With the L2 prefetch, the down rows stream in during the "
                           "first phase.", "persistent", tiled, vec=True),
                _switch_on("pdl_down", "Start the down kernel early (programmatic dependent launch)",
                           "Launch the down projection with programmatic stream serialization (Hopper and later): "
                           "its blocks start while the gate/up kernel's last blocks still run, ask L2 for their "
                           "weight rows, and only then wait (griddepcontrol.wait) for h. Hides the launch gap "
                           "and the first kernel's tail.", "pdl", lambda k: two_kernel(k) and k["fuse"]),
                _retune("down_block_size", "Warps per block of the down projection",
                        "Give the down projection (few long rows: hidden x intermediate) its own block size "
                        "instead of the gate/up kernel's.", "down_warps", choices["down_warps"][1:], two_kernel),
                _retune("down_split_k", "Split K of the down projection",
                        "Let several warps share each down-projection row, each summing a slice of the "
                        "intermediate dimension: more loads in flight for few, long rows.",
                        "down_ksplit", choices["down_ksplit"][1:], two_kernel),
                _retune("down_unroll", "Loads in flight in the down projection",
                        "Retune how many 16-byte loads per lane the down projection issues before using them.",
                        "down_unroll", choices["down_unroll"][1:], two_kernel),
                _retune("grid_blocks", "Blocks per SM of the persistent MLP",
                        "Change how many co-resident blocks per SM the persistent MLP launches (the grid is a "
                        "multiple of the GPU's SM count, so every SM gets the same share).",
                        "per_sm", choices["per_sm"], lambda k: tiled(k) and k["persistent"]),
                _retune("mlp_chunk", "Intermediate rows per block",
                        "Change the chunk of the intermediate dimension each block of a one-kernel MLP owns "
                        "(more blocks vs. longer contiguous reads of the down projection).",
                        "chunk", choices["chunk"], lambda k: not k["naive"] and (k["fuse_down"] or k["down_t"])),
            ]
    elif fam == "attention":
        flash = tiled
        tiled = lambda k: flash(k) and not k["mma"]  # noqa: E731 - the items below refine the CUDA-core kernel
        if w.params["phase"] == "prefill" and w.dtype == "bf16":
            items.append(_switch_on(
                "tensor_cores", "Tensor-core flash attention (mma.sync)",
                "Give each warp 16 query rows: S = Q.K^T and O += P.V as 16x8x16 mma.sync fragments over K/V tiles "
                "of 32 keys shared in shared memory, the online softmax on the score fragments (row max and sum "
                "across the 4 lanes that hold a row), P re-packed to bf16 A fragments in registers; causal tiles "
                "past the block's last row skipped.", "mma", flash))
        items += [
            MenuItem("flash", "Warp-per-key online softmax",
                     "Replace the scores buffer by an online softmax: each warp walks keys, lanes split the head "
                     "dimension, running max and sum rescale the accumulator in registers.",
                     lambda k: k["naive"], leave_naive),
            _switch_on("gqa_share", "Share K/V across the GQA group",
                       "One warp serves all query heads of a KV head, so each K/V row is read once per group.",
                       "gqa_share", tiled),
            _retune("block_size", "Retune warps per block", "Change the number of warps per block.",
                    "warps", choices["warps"], flash),
        ]
        if w.params["phase"] == "decode":
            items.append(_retune("split_kv", "Split the KV length across blocks (flash-decoding)",
                                 "Spread the KV cache over several blocks per head and merge their partial softmax "
                                 "results in a second kernel: enough blocks to fill the GPU at batch 1.",
                                 "splits", choices["splits"], tiled))
        else:
            items.append(_retune("q_block", "Query rows per warp",
                                 "Give each warp several consecutive query rows that reuse each loaded K/V row.",
                                 "q_block", choices["q_block"], tiled))
    else:
        items += [
            MenuItem("block_per_row", "Block per row",
                     "One block per row with a warp-shuffle + shared-memory reduction of the sum of squares.",
                     lambda k: k["naive"], leave_naive),
            _switch_on("vector_loads", "16-byte vector loads", "Read rows as 16-byte vectors.", "vec", tiled),
            _retune("block_size", "Retune threads per block", "Change the block size.",
                    "threads", choices["threads"], tiled),
        ]
    return items


def nki_menu(w: Workload) -> list[MenuItem]:
    """The NKI (Trainium) optimization menu for workload `w`."""
    from autocomp_compile.targets.nki.codegen import KNOB_CHOICES as NKI_CHOICES
    from autocomp_compile.targets.nki.codegen import family as nki_family

    fam = nki_family(w.kind)
    choices = NKI_CHOICES[fam]
    items: list[MenuItem] = [
        MenuItem("affine_loops", "Affine instead of sequential loops",
                 "Declare loops without loop-carried dependencies with nl.affine_range: the scheduler may overlap "
                 "iterations and double-buffer the tiles allocated in the loop body (the next tile's DMA runs while "
                 "this tile is computed), where nl.sequential_range waits for each iteration to finish.",
                 lambda k: k["loop"] == "sequential", lambda k, r: {**k, "loop": "affine"}),
    ]
    if fam == "gemv":
        items += [
            _switch_on("hoist_x", "Hoist activation loads; keep x^T in SBUF",
                       "Load the activation's transposed blocks once before the loops and keep them in SBUF across "
                       "iterations, instead of a DMA per weight tile.", "hoist_x"),
            _switch_on("psum_accumulate", "Accumulate in PSUM",
                       "Accumulate the contraction blocks of each output tile in one PSUM tile (acc += nc_matmul), "
                       "instead of copying every partial product out and adding it on the Vector Engine.", "psum_acc"),
            _retune("block_free_dim", "Block the free dimension of weight loads",
                    "Load wider weight tiles (128 partitions x load_k columns) with one DMA and walk them with a "
                    "constant inner loop of 128-column transposes: fewer, larger DMAs (>= 512 B per descriptor).",
                    "load_k", choices["load_k"]),
            _retune("batch_transposes", "Fill a PSUM bank with transposes",
                    "Transpose several 128x128 weight blocks into one 2 KiB PSUM bank (up to 512 fp32 per partition) "
                    "and evacuate them with one copy: fewer fixed-cost instructions.", "tb", choices["tb"],
                    lambda k: k["load_k"] > 128),
            MenuItem("split_evacuation", "Split PSUM evacuation over two engines",
                     "Alternate the PSUM-to-SBUF copies of transposed weights between the Vector Engine "
                     "(tensor_copy) and the Scalar Engine (activation copy), so both work in parallel.",
                     lambda k: k["evac"] == "vector", lambda k, r: {**k, "evac": "split"}),
        ]
        if w.kind == "mlp":
            items.append(_switch_on("fuse_epilogue", "Fuse SiLU * up into the matmul epilogue",
                                    "Apply SiLU on the Scalar Engine straight from the gate's PSUM tile and multiply "
                                    "by the up projection's PSUM tile, writing SwiGLU(x)^T into SBUF once, instead of "
                                    "copying both to SBUF first.", "fuse"))
    elif fam == "rmsnorm":
        items += [
            _switch_on("spread_partitions", "Spread the row over 128 partitions",
                       "Lay one row out as [128, hidden/128] so every engine works on 128 lanes, and sum the "
                       "per-partition squares across partitions with a matmul by a ones tile.", "spread"),
            _switch_on("fuse_square_reduce", "Fuse square and sum",
                       "Square on the Scalar Engine and reduce along the free axis in the same instruction "
                       "(nisa.activation_reduce).", "fused_sq"),
            _switch_on("fuse_scale", "Fuse the normalisation scale",
                       "Scale by rstd as the activation's per-partition scale, then multiply by the weight: one "
                       "instruction fewer per tile.", "fused_scale"),
        ]
    else:
        items += [
            _retune("kv_tile", "Retune the KV tile",
                    "Compute scores for 128, 256 or 512 keys per matmul (moving free size up to 512, one PSUM bank), "
                    "transposing several K blocks into one PSUM tile.", "kv_tile", choices["kv_tile"]),
            _switch_on("fused_exp", "Fused exp with bias, scale and row sum",
                       "Compute exp(scale * s - scale * max) and the row sum in one Scalar Engine instruction "
                       "(activation_reduce with a per-partition bias).", "exp_fused"),
            _switch_on("psum_accumulate", "Accumulate P @ V in PSUM",
                       "Accumulate the output over KV blocks in PSUM instead of copying each block's product out.",
                       "psum_acc"),
            _switch_on("defer_normalization", "Normalise the output, not the probabilities",
                       "Divide the [queries, head_dim] output by the row sums once at the end instead of "
                       "normalising the [queries, kv_len] probabilities.", "defer_norm"),
        ]
        if w.params["phase"] == "decode":
            items.append(_switch_on("gqa_group", "Share K/V across the GQA group",
                                    "Process all query heads of a KV head as rows of one matmul: each K/V block is "
                                    "loaded and transposed once per group instead of once per query head.", "group"))
        else:
            items.append(_switch_on("causal_skip", "Skip fully masked KV blocks",
                                    "With a causal mask, stop the KV loops at the diagonal block of each query "
                                    "block (the loop bound is static once the query-block loop is unrolled).",
                                    "causal_skip"))
    return items
