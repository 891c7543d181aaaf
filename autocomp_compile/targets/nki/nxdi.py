"""Feeding NXDI (neuronx-distributed-inference): substitute our NKI kernels into NXDI's Llama modules.

UNVERIFIED: written against NXDI's public Llama modules (`NeuronLlamaMLP` with `gate_proj` / `up_proj`
ColumnParallelLinear and `down_proj` RowParallelLinear; attention classes derived from `NeuronAttentionBase`
with `perform_prefill(Q, K, V, q_len, bsz, attention_mask)`), which change between Neuron SDK releases. Nothing
here has run on a trn1. Tests exercise the wiring with stand-in modules and the NKI emulator.

Usage on a trn1, after the kernels were searched (e.g. `autocomp-compile optimize --target nki ...` there):

    from autocomp_compile.targets.nki import nxdi
    mlp_src = cache.get(get_target("nki"), mlp_workload).code
    n = nxdi.substitute_kernels(model, mlp_code=mlp_src, attention_prefill_code=prefill_src)

Each substituted forward falls back to NXDI's own when the call's shapes are not the ones the kernel was
generated for (our kernels are specialised to one shape: decode batch, per-rank intermediate size, batch,
heads and sequence length). Substituted forwards keep NXDI's return values: `(output, None)` for the MLP,
`(attn_output, FlashAttentionStrategy.NONE)` for `perform_prefill`.
With tensor parallelism, the MLP kernel runs on each rank's weight shards and its partial output is summed
across ranks with `reduce_from_tensor_model_parallel_region`, as RowParallelLinear does.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import tempfile
import types
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)
UNVERIFIED = True  # flips to False only after a run on a trn1 confirms tokens match NXDI's own modules
MLP_CLASSES = ("NeuronLlamaMLP",)
ATTENTION_CLASSES = ("NeuronLlamaAttention",)

KernelRunner = Callable[[str, list[torch.Tensor], list[int]], torch.Tensor]


def neuron_runner(code: str, inputs: list[torch.Tensor], dims: list[int]) -> torch.Tensor:
    """Run NKI source on XLA tensors through torch-neuronx (the NKI kernel is traced into the graph). The source
    defines `kernel` already decorated with `@nki.jit`: it is called as it is."""
    return _kernel_of(code)(*inputs, *dims)


@functools.lru_cache(maxsize=32)
def _kernel_of(code: str) -> Callable:
    # NKI's front end reads the kernel's source (inspect.getsource): it must come from a file.
    path = Path(tempfile.gettempdir()) / "autocomp_nki" / f"{hashlib.sha256(code.encode()).hexdigest()[:16]}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != code:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(code)
        os.replace(tmp, path)
    namespace: dict[str, Any] = {"__name__": "nki_kernel", "__file__": str(path)}
    exec(compile(code, str(path), "exec"), namespace)  # noqa: S102 - our generated kernels
    return namespace["kernel"]


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    try:
        from neuronx_distributed.parallel_layers import parallel_state
        from neuronx_distributed.parallel_layers.mappings import reduce_from_tensor_model_parallel_region
    except ImportError:
        return x  # single device (and the tests' stand-ins)
    if not parallel_state.model_parallel_is_initialized() or parallel_state.get_tensor_model_parallel_size() == 1:
        return x
    return reduce_from_tensor_model_parallel_region(x)


def mlp_unsupported(module: torch.nn.Module) -> str:
    """Why our MLP kernel cannot stand in for this NXDI MLP module, or "": it takes PyTorch's [out, in] weights
    without biases, and the input and output of a plain tensor-parallel MLP."""
    if getattr(module, "mlp_kernel_enabled", False) or getattr(module, "quantized_mlp_kernel_enabled", False):
        return "NXDI's own MLP kernel is enabled (its weights are transposed to [in, out])"
    if getattr(module, "sequence_parallel_enabled", False):
        return "sequence parallelism (NXDI gathers the input and reduce-scatters the output)"
    if any(getattr(getattr(module, name, None), "bias", None) is not None for name in ("gate_proj", "up_proj", "down_proj")):
        return "a projection has a bias"
    return ""


def _mlp_forward(module: torch.nn.Module, original: Callable, code: str, run: KernelRunner, rows: int,
                 x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    wg, wu, wd = module.gate_proj.weight, module.up_proj.weight, module.down_proj.weight
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] != rows or args or any(v is not None for v in kwargs.values()):
        return original(x, *args, **kwargs)  # another shape, or NXDI's fused rmsnorm/residual path: keep NXDI's
    out = _all_reduce(run(code, [flat.contiguous(), wg, wu, wd], []))
    return out.reshape(x.shape[:-1] + (wd.shape[0],)), None  # NeuronLlamaMLP.forward returns (output, residual)


def _no_flash_strategy() -> Any:
    """`FlashAttentionStrategy.NONE`: the output is BHSD, as our kernel's (None without NXDI, e.g. in tests)."""
    try:
        from neuronx_distributed_inference.modules.attention.attention_base import FlashAttentionStrategy
    except ImportError:
        return None
    return FlashAttentionStrategy.NONE


def prefill_shape(code: str) -> tuple[int, int, int, int]:
    """(batch, heads, kv_heads, seq_len) an attention prefill kernel from `codegen` was generated for."""
    out = re.search(r"out = nl\.ndarray\(\((\d+), (\d+), (\d+), \d+\)", code)
    group = re.search(r"kvh = h // (\d+)", code)
    if not out or not group:
        raise ValueError("not an attention prefill kernel of autocomp_compile's NKI code generator")
    batch, heads, seq = (int(g) for g in out.groups())
    return batch, heads, heads // int(group.group(1)), seq


def _prefill_forward(module: torch.nn.Module, original: Callable, code: str, run: KernelRunner, seq_len: int,
                     Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, q_len: int, bsz: int, attention_mask: Any = None,
                     *args: Any, **kwargs: Any) -> Any:
    batch, heads, kv_heads, _ = prefill_shape(code)
    # The kernel is causal only: right padding (keys past a sequence's end come after its queries) or one
    # sequence, as NXDI's own attention kernel requires.
    left_padded = bsz > 1 and getattr(module, "padding_side", "right") != "right"
    if q_len != seq_len or Q.dim() != 4 or (bsz, Q.shape[0], Q.shape[1], K.shape[1]) != (batch, batch, heads, kv_heads) \
            or left_padded:
        return original(Q, K, V, q_len, bsz, attention_mask, *args, **kwargs)
    out = run(code, [Q.contiguous(), K.contiguous(), V.contiguous()], [])  # [b, heads, s, d], causal
    return out, _no_flash_strategy()  # perform_prefill returns (attn_output, flash_attn_strategy)


def substitute_kernels(model: torch.nn.Module, mlp_code: str | None = None, mlp_rows: int = 1,
                       attention_prefill_code: str | None = None, prefill_seq_len: int = 256,
                       run: KernelRunner = neuron_runner) -> int:
    """Replace the forward of NXDI Llama MLPs (and `perform_prefill` of Llama attention) in `model` by calls
    to our NKI kernels. Returns the number of modules changed. UNVERIFIED on hardware (see the module doc).

    Parameters
    ----------
    model: an NXDI Llama model (any nn.Module containing `NeuronLlamaMLP` / `NeuronLlamaAttention`).
    mlp_code: NKI source of an "mlp" kernel generated for the per-rank shapes (hidden, intermediate / tp).
    mlp_rows: tokens per call the MLP kernel was generated for (decode batch).
    attention_prefill_code: NKI source of a causal "attention" prefill kernel for the per-rank heads (its batch
        and head counts are read from the source; calls with others run NXDI's own code).
    prefill_seq_len: the sequence length that kernel was generated for.
    run: how a kernel is called (default: torch-neuronx on a NeuronCore).
    """
    if attention_prefill_code:
        prefill_shape(attention_prefill_code)  # fail now, not at the first prefill, on a kernel of another kind
    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if mlp_code and name in MLP_CLASSES:
            why = mlp_unsupported(module)
            if why:
                log.warning("autocomp: %s keeps NXDI's MLP: %s", name, why)
                continue
            original = module.forward
            module.forward = types.MethodType(
                lambda self, x, *a, _o=original, **k: _mlp_forward(self, _o, mlp_code, run, mlp_rows, x, *a, **k), module)
            changed += 1
        elif attention_prefill_code and name in ATTENTION_CLASSES and hasattr(module, "perform_prefill"):
            original = module.perform_prefill
            module.perform_prefill = types.MethodType(
                lambda self, *a, _o=original, **k: _prefill_forward(self, _o, attention_prefill_code, run,
                                                                    prefill_seq_len, *a, **k), module)
            changed += 1
    return changed
