"""Optimization menus: named, documented optimizations, each a concrete change of a kernel's schedule.

An LLM planner sees the menu as text (id, title, description); the offline proposer applies
`MenuItem.apply`, which moves one or more knobs of the parent's schedule, drawing any parameter
(a block size, a prefetch distance) from the given random generator.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from autocomp_compile.targets.cpu.codegen import KNOB_CHOICES, family
from autocomp_compile.workload import Workload

Knobs = dict[str, Any]


@dataclass(frozen=True)
class MenuItem:
    id: str
    title: str
    description: str
    applies: Callable[[Knobs], bool]
    apply: Callable[[Knobs, random.Random], Knobs]

    def as_text(self) -> str:
        return f"- [{self.id}] {self.title}: {self.description}"


def _pick_other(choices: tuple, current: Any, rng: random.Random, above: bool = False) -> Any:
    options = [c for c in choices if c != current and (not above or c > current)]
    return rng.choice(options) if options else current


def cpu_menu(w: Workload, isas: list[str]) -> list[MenuItem]:
    """The CPU optimization menu for workload `w` on a host with vector ISAs `isas`."""
    fam = family(w.kind)
    choices = KNOB_CHOICES[fam]
    simd = [i for i in isas if i != "scalar" and (i != "avx512bf16" or w.dtype == "bf16")]
    items: list[MenuItem] = []

    if simd:
        items.append(MenuItem(
            "vectorize", "Use SIMD vectors",
            "Replace scalar loops by vector loads and fused multiply-adds with the host's vector ISA "
            f"({', '.join(simd)}), converting bf16 to fp32 in registers.",
            lambda k: k["isa"] == "scalar",
            lambda k, r: {**k, "isa": r.choice(simd)},
        ))
    wider = [i for i in simd if i.startswith("avx512")]
    if wider:
        items.append(MenuItem(
            "wider_vectors", "Use 512-bit vectors",
            "Move from 256-bit AVX2 to 512-bit AVX-512 registers: twice the elements per instruction.",
            lambda k: k["isa"] == "avx2",
            lambda k, r: {**k, "isa": r.choice(wider)},
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
        items += [
            MenuItem(
                "block_rows", "Block output rows",
                "Compute several output rows per pass over the activation vector: the activation is loaded "
                "once for all of them and more independent loads are in flight.",
                lambda k: True,
                lambda k, r: {**k, "rows": _pick_other(choices["rows"], k["rows"], r)},
            ),
            MenuItem(
                "unroll_k", "Unroll the reduction loop",
                "Unroll the K loop with independent accumulators to hide FMA latency and cut loop overhead.",
                lambda k: True,
                lambda k, r: {**k, "unroll": _pick_other(choices["unroll"], k["unroll"], r)},
            ),
            MenuItem(
                "prefetch", "Software prefetch of weight rows",
                "Issue prefetches a fixed distance ahead in every weight row so DRAM latency is hidden.",
                lambda k: k["isa"] != "scalar",
                lambda k, r: {**k, "prefetch": _pick_other(choices["prefetch"][1:], k["prefetch"], r)},
            ),
        ]
        if w.dtype == "bf16" and any(i in ("avx2", "avx512") for i in isas):
            items.append(MenuItem(
                "bf16_split", "Even/odd bf16 split",
                "Load 2x the vector width of bf16 weights at once and widen even and odd elements with a "
                "shift and a mask, against an activation stored de-interleaved to match.",
                lambda k: k["isa"] in ("avx2", "avx512") and not k["bf16_split"],
                lambda k, r: {**k, "bf16_split": True},
            ))
        if "avx512bf16" in isas and w.dtype == "bf16":
            items.append(MenuItem(
                "bf16_dot", "bf16 dot-product instructions",
                "Keep the activation in bf16 and use vdpbf16ps: 32 products per instruction, fp32 accumulation.",
                lambda k: k["isa"] != "avx512bf16",
                lambda k, r: {**k, "isa": "avx512bf16", "bf16_split": False},
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
                lambda k: not k["gqa_share"],
                lambda k, r: {**k, "gqa_share": True},
            ),
        ]
        if w.params["phase"] == "prefill":
            items.append(MenuItem(
                "q_block", "Block query rows",
                "Attend several consecutive query rows per pass over K/V so that each key row is reused from cache.",
                lambda k: True,
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
