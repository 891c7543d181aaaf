"""Greedy generation over the compact Llama's static KV cache, with per-phase timings."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from autocomp_compile.models.llama import Llama

Forward = Callable[..., torch.Tensor]


@dataclass
class Generation:
    tokens: torch.Tensor  # [batch, new tokens]
    prefill_s: float
    decode_s: list[float] = field(default_factory=list)  # one entry per decode step
    logits: list[torch.Tensor] = field(default_factory=list)  # last-position logits per step, if kept

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens/sec of one sequence's decoding (multiply by the batch for the batch's throughput)."""
        return len(self.decode_s) / sum(self.decode_s) if self.decode_s else float("nan")


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host timer measures it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model: Llama, prompt: torch.Tensor, max_new_tokens: int, forward: Forward | None = None,
             keep_logits: bool = False, prefill_forward: Forward | None = None) -> Generation:
    """Greedy decoding of `max_new_tokens` (>= 0) tokens after `prompt` [batch, length]: exactly that many (no
    end-of-sequence stop), every row of the batch with the same prompt length (no attention mask or padding).

    `forward` is the callable to run (e.g. `torch.compile(model, ...)`); it defaults to the model.
    `prefill_forward`, if given, runs the prompt instead (e.g. eager prefill, compiled decode).
    The KV cache is reset for the prompt's batch size first. Positions live on the prompt's device;
    on a GPU each timing ends after the device finished the step.
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, length >= 1] token ids, got shape {tuple(prompt.shape)}")
    batch, length = prompt.shape
    if prompt.numel() and (int(prompt.min()) < 0 or int(prompt.max()) >= model.config.vocab):
        # on a GPU an out-of-range id is a device-side assert that leaves the process's CUDA context unusable
        raise ValueError(f"prompt token ids must be in [0, {model.config.vocab}), got "
                         f"{int(prompt.min())}..{int(prompt.max())}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:  # nothing to generate: the prompt is not run
        return Generation(torch.empty(batch, 0, dtype=torch.long), prefill_s=0.0)
    # the last new token is never fed back: positions up to length + max_new_tokens - 2 are written
    if length + max_new_tokens - 1 > model.config.max_seq_len:
        raise ValueError(f"prompt ({length}) + new tokens ({max_new_tokens}) need {length + max_new_tokens - 1} "
                         f"cache positions, more than max_seq_len ({model.config.max_seq_len}); a model loaded "
                         "with load_pretrained(..., max_seq_len=N) or built from a config with a larger "
                         "max_seq_len holds more")
    forward = model if forward is None else forward
    prefill_forward = forward if prefill_forward is None else prefill_forward
    model.setup_caches(batch)
    return timed_greedy(lambda ids, pos: prefill_forward(ids, pos, last_only=True)[:, -1],
                        lambda ids, pos: forward(ids, pos, last_only=True)[:, -1], prompt, max_new_tokens, keep_logits)


Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def timed_greedy(prefill: Step, decode: Step, prompt: torch.Tensor, max_new_tokens: int,
                 keep_logits: bool = False) -> Generation:
    """The greedy loop of `generate`, for any model whose cache is ready: `prefill(prompt, positions)` and
    `decode(tokens [batch, 1], positions)` return the last position's logits [batch, vocab]. Each phase is timed
    (on a GPU to the end of its device work); `max_new_tokens` >= 1."""
    batch, length = prompt.shape
    device = prompt.device
    _synchronize(device)
    t0 = time.perf_counter()
    logits = prefill(prompt, torch.arange(length, device=device))
    nxt = logits.argmax(-1)
    _synchronize(device)
    out = Generation(torch.empty(batch, max_new_tokens, dtype=torch.long), time.perf_counter() - t0)
    out.tokens[:, 0] = nxt
    if keep_logits:
        out.logits.append(logits.float().clone())
    for i in range(1, max_new_tokens):
        t0 = time.perf_counter()
        logits = decode(nxt[:, None], torch.tensor([length + i - 1], device=device))
        nxt = logits.argmax(-1)
        _synchronize(device)
        out.decode_s.append(time.perf_counter() - t0)
        out.tokens[:, i] = nxt
        if keep_logits:
            out.logits.append(logits.float().clone())
    return out
