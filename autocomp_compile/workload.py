"""What one kernel must compute: `Workload` and `TensorSpec`.

A workload is plain data (kind, params, tensor specs, runtime dims) so that it pickles to worker
processes and hashes to a stable cache key. Its PyTorch reference, eager baseline and input
factory live in `autocomp_compile.references`, looked up by `kind`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}


# Per kind, the parameter that counts activation rows (see `Workload.rows_param`).
ROWS_PARAM = {"gemm": "m", "lm_head": "batch", "mlp": "batch", "rmsnorm": "rows"}


class WorkloadError(ValueError):
    """A workload that cannot exist: unknown kind or dtype, impossible shape."""


@dataclass(frozen=True)
class TensorSpec:
    """One kernel argument. `shape` holds concrete dims (maximums for runtime-sized ones)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    role: str = "input"  # "input" (activation), "weight" or "output"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize


@dataclass(frozen=True)
class Workload:
    """What one kernel must compute.

    `params` are the static parameters (heads, eps, batch, ...); `runtime_dims` name the dims the
    kernel receives as arguments at call time (e.g. the KV length during decode) with the value of
    the bucket the kernel is tuned for. Kernels see inputs, then outputs, in declaration order.
    """

    kind: str
    dtype: str
    params: dict[str, Any]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    runtime_dims: dict[str, int] = field(default_factory=dict)

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return self.inputs + self.outputs

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dtype": self.dtype,
            "params": dict(sorted(self.params.items())),
            "tensors": [[t.name, list(t.shape), t.dtype, t.role] for t in self.tensors],
            "runtime_dims": dict(sorted(self.runtime_dims.items())),
        }

    def signature(self) -> str:
        """Stable hash of everything that defines the computation (cache key part)."""
        blob = json.dumps(self.describe(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def name(self) -> str:
        """Readable name: kind, dtype, form (attention's phase) and the integer parameters the form uses."""
        from autocomp_compile.references import get_kind

        unused = set(get_kind(self.kind).unused(self.params))
        params = sorted((k, v) for k, v in self.params.items() if k not in unused)
        forms = [v for _, v in params if isinstance(v, str)]
        dims = [f"{k}{v}" for k, v in params if isinstance(v, (int, bool))]
        return "_".join([self.kind, self.dtype, *forms, *dims])

    def shape_class(self) -> str:
        """Coarse family used by schedule reuse: decode/prefill, gemv, square/tall/wide GEMM."""
        if self.kind == "attention":
            return str(self.params["phase"])
        if self.kind in ("gemm", "lm_head", "mlp"):
            m = self.params[self.rows_param()]
            if m <= 8:
                return "gemv"
            n = self.params.get("n", self.params.get("vocab", self.params.get("hidden", 1)))
            k = self.params.get("k", self.params.get("hidden", 1))
            if max(m, n) >= 4 * min(m, n):
                return "tall" if m > n else "wide"
            return "square" if k <= 4 * max(m, n) else "deep"
        return "rows"

    def arithmetic_intensity(self) -> float | None:
        """Flops per byte moved (`flops() / bytes_moved()`) of a GEMV-family workload; None for the other kinds."""
        flops = self.flops()
        return None if flops is None else flops / self.bytes_moved()

    def rows_param(self) -> str | None:
        """The parameter that counts activation rows (tokens x batch, or a prefill's tokens): what differs between
        a workload warmed for one prompt length and the same computation at another; None for decode attention."""
        if self.kind == "attention":
            return "seq_len" if self.params["phase"] == "prefill" else None
        return ROWS_PARAM.get(self.kind)

    def bytes_moved(self) -> int:
        """Bytes a kernel must read and write at the tuned runtime dims (the roofline's numerator)."""
        from autocomp_compile.references import get_kind

        return get_kind(self.kind).bytes_moved(self)

    def flops(self) -> int | None:
        """Multiply-adds x 2 of a GEMV-family workload (GEMM, LM head, MLP); None for the other kinds."""
        p = self.params
        if self.kind == "gemm":
            return 2 * p["m"] * p["n"] * p["k"]
        if self.kind == "lm_head":
            return 2 * p["batch"] * p["vocab"] * p["hidden"]
        if self.kind == "mlp":
            return 6 * p["batch"] * p["hidden"] * p["intermediate"]
        return None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name ("bf16", "fp32"); `WorkloadError` for any other name."""
    try:
        return DTYPES[name]
    except KeyError:
        raise WorkloadError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def make_workload(kind: str, dtype: str = "bf16", **params: Any) -> Workload:
    """Build a workload of `kind` ("attention", "mlp", "lm_head", "rmsnorm", "gemm").

    Missing params default to Llama-3.2-1B decode shapes. Raises `WorkloadError` on bad input.
    """
    from autocomp_compile.references import get_kind

    torch_dtype(dtype)
    return get_kind(kind).build(dtype, params)


def workload_from_dict(d: dict[str, Any]) -> Workload:
    """Rebuild a workload from `Workload.describe()` (e.g. a kernel cache row); checks it round-trips."""
    w = make_workload(d["kind"], d["dtype"], **d["params"])
    if w.describe() != {**d, "params": dict(sorted(d["params"].items())), "runtime_dims": dict(sorted(d["runtime_dims"].items()))}:
        raise WorkloadError(f"stored workload does not match this version's definition of {d['kind']!r}")
    return w
