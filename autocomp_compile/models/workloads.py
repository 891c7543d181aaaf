"""The kernel workloads of a model, found by tracing it (on the meta device) through the graph passes.

This is what `autocomp-compile warm` optimizes: exactly the workloads the `autocomp` backend will
look up when it compiles the same model, at the same batch size and sequence lengths.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from autocomp_compile.models.llama import Llama, LlamaConfig, get_config
from autocomp_compile.workload import Workload, WorkloadError, torch_dtype


def model_workloads(
    config: LlamaConfig | str,
    dtype: str = "bf16",
    batch: int = 1,
    prefill_lens: Sequence[int] = (),
    decode: bool = True,
    max_seq_len: int | None = None,
    kinds: Sequence[str] | None = None,
    device: str = "cpu",
) -> list[Workload]:
    """Distinct workloads of decoding (and prefilling `prefill_lens` tokens) with the compact Llama.

    `device` is where the model will run ("cuda" for the CUDA target): attention lowers to a
    different aten op on each device, so the graph is traced there.
    """
    from torch._dynamo.backends.common import aot_autograd

    from autocomp_compile.passes import ALL_KINDS
    from autocomp_compile.passes.fx import find_subgraphs

    model_dtype = torch_dtype(dtype)
    cfg = get_config(config) if isinstance(config, str) else config
    if max_seq_len is not None:
        cfg = dataclasses.replace(cfg, max_seq_len=max_seq_len)
    if batch < 1 or any(n < 1 or n > cfg.max_seq_len for n in prefill_lens):
        raise WorkloadError(f"batch must be >= 1 and prefill lengths in [1, {cfg.max_seq_len}]")
    found: dict[str, Workload] = {}

    def collect(gm: torch.fx.GraphModule, example_inputs: object) -> object:
        # with the backend's kinds: without "mlp", an MLP's projections are gemm workloads, as the backend finds them
        for match in find_subgraphs(gm, ALL_KINDS if kinds is None else tuple(kinds)):
            if match.workload is not None and (kinds is None or match.kind in kinds):
                found.setdefault(match.workload.signature(), match.workload)

        def do_not_run(*args: object) -> None:
            raise _Traced

        return do_not_run

    # Real tensors on the device (the graph must be the device's: attention lowers differently on the meta
    # device); the weights' memory is never touched, but the RoPE tables, the causal mask and the KV caches are
    # written: max_seq_len^2 bytes for the mask.
    with torch.device("meta"):
        model = Llama(cfg).to(model_dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    model.init_buffers()
    model.setup_caches(batch)
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=collect), dynamic=False, fullgraph=True)
    calls = [(n, torch.arange(n, device=device)) for n in prefill_lens]
    if decode:
        calls.append((1, torch.tensor([cfg.max_seq_len // 2], device=device)))
    try:
        # One recompilation per shape, counted with the process's earlier compilations of the same forward: past
        # dynamo's limit a fullgraph compile raises instead of tracing. Raised by what these calls need.
        limit = torch._dynamo.config.recompile_limit + len(calls) + 1
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=limit):
            for seq, pos in calls:
                try:
                    compiled(torch.zeros(batch, seq, dtype=torch.long, device=device), pos, last_only=True)
                except _Traced:
                    pass
    finally:
        torch._dynamo.reset()
    return list(found.values())


class _Traced(Exception):
    """Raised instead of running a graph that was traced only to collect its workloads."""
