"""Greedy generation over the compact Llama's static KV cache, with per-phase timings."""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from autocomp_compile.models.llama import Llama

Forward = Callable[..., torch.Tensor]
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


@dataclass(frozen=True)
class PrefillChunk:
    """One prefill call: prompt tokens [start, start + tokens), run padded to `padded` tokens."""

    start: int
    tokens: int
    padded: int


def prefill_chunks(length: int, buckets: Sequence[int], max_seq_len: int) -> list[PrefillChunk]:
    """How a prompt of `length` tokens runs through prefill buckets (the context-encoding buckets of NxD Inference).

    Without buckets: one call of the prompt as it is. With them: chunks of the largest bucket while more remain,
    then the rest padded on the right to the smallest bucket that holds it, so that a compiled model sees only
    bucket lengths (one graph and one set of cached kernels per bucket, whatever the prompt's length). A pad that
    would run past the cache's `max_seq_len` positions is left off (that last chunk runs at its own length).
    """
    buckets = list(buckets)  # a NumPy array has no truth value
    bad = [b for b in buckets
           if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 1 <= b <= max_seq_len]
    if bad:
        raise ValueError(f"prefill buckets must be integers in [1, max_seq_len={max_seq_len}], got {bad}")
    if not buckets:
        return [PrefillChunk(0, length, length)]
    sizes = sorted({int(b) for b in buckets})  # NumPy integers too
    chunks, start = [], 0
    while length - start > sizes[-1]:
        chunks.append(PrefillChunk(start, sizes[-1], sizes[-1]))
        start += sizes[-1]
    rest = length - start
    padded = next(b for b in sizes if b >= rest)
    chunks.append(PrefillChunk(start, rest, padded if start + padded <= max_seq_len else rest))
    return chunks


def bucketed_prefill(forward: Forward, chunks: Sequence[PrefillChunk]) -> Step:
    """A prefill step that runs the prompt through `forward` in `chunks` (`prefill_chunks` of its length), each
    padded on the right with token 0, and returns the logits of the prompt's last real token. Exact for a causal
    model over a static cache: no real token attends to a pad, and decoding overwrites each padded cache position
    before it reads it."""

    def run(prompt: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        logits = None
        for c in chunks:
            # a new tensor: a slice of a longer prompt keeps its strides, on which a compiled graph guards
            ids = prompt.new_zeros(prompt.shape[0], c.padded)
            ids[:, : c.tokens] = prompt[:, c.start : c.start + c.tokens]
            pos = positions[c.start] + torch.arange(c.padded, device=prompt.device)
            last = torch.tensor([c.tokens - 1], device=prompt.device)
            logits = forward(ids, pos, logits_at=last)[:, 0]
        return logits

    return run


@torch.no_grad()
def generate(model: Llama, prompt: torch.Tensor, max_new_tokens: int, forward: Forward | None = None,
             keep_logits: bool = False, prefill_forward: Forward | None = None,
             prefill_buckets: Sequence[int] = ()) -> Generation:
    """Greedy decoding of `max_new_tokens` (>= 0) tokens after `prompt` [batch, length]: exactly that many (no
    end-of-sequence stop), every row of the batch with the same prompt length (no attention mask or padding).

    `forward` is the callable to run (e.g. `torch.compile(model, ...)`); it defaults to the model.
    `prefill_forward`, if given, runs the prompt instead (e.g. eager prefill, compiled decode).
    `prefill_buckets` (e.g. `(64, 128, 256)`): run the prompt padded to these lengths (see `prefill_chunks`), so
    that a model compiled with `dynamic=False` compiles one prefill graph per bucket, not one per prompt length,
    and uses the kernels warmed for the buckets (`autocomp-compile warm --prefill 64 --prefill 128 ...`).
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
    chunks = prefill_chunks(length, prefill_buckets, model.config.max_seq_len)  # bad buckets fail before anything runs
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
    if len(prefill_buckets):
        prefill = bucketed_prefill(prefill_forward, chunks)
    else:
        prefill = lambda ids, pos: prefill_forward(ids, pos, last_only=True)[:, -1]  # noqa: E731
    model.setup_caches(batch)
    return timed_greedy(prefill, lambda ids, pos: forward(ids, pos, last_only=True)[:, -1], prompt, max_new_tokens,
                        keep_logits)


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
