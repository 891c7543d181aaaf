"""Optional Weights & Biases logging of a search: the best latency after every evaluated round.

`--wandb` turns it on; without WANDB_API_KEY the run is logged offline (`wandb sync` uploads it later).
"""
from __future__ import annotations

import os
from typing import Any, Callable

from autocomp_compile.search.candidate import Candidate

ProgressFn = Callable[[int, int, "Candidate | None", "float | None"], None]


class WandbLogger:
    """A progress callback (BeamSearch's signature) that logs to one wandb run per workload."""

    def __init__(self, project: str, name: str, config: dict[str, Any], directory: str | None = None):
        try:
            import wandb
        except ImportError:
            raise RuntimeError("--wandb needs wandb: pip install wandb") from None
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.run = wandb.init(project=project, name=name, config=config, mode=mode, dir=directory, reinit=True)
        self.mode = mode

    def __call__(self, done: int, total: int, best: Candidate | None, baseline_ms: float | None) -> None:
        metrics: dict[str, Any] = {"candidates_evaluated": done}
        if best is not None and best.result is not None and best.result.latency_ms is not None:
            metrics["best_latency_ms"] = best.result.latency_ms
            if baseline_ms:
                metrics["speedup_vs_eager"] = baseline_ms / best.result.latency_ms
        self.run.log(metrics, step=done)

    def finish(self) -> None:
        self.run.finish()


def chain(*callbacks: ProgressFn | None) -> ProgressFn | None:
    """One progress callback calling each of the given ones (None entries skipped)."""
    active = [c for c in callbacks if c is not None]
    if not active:
        return None

    def call(done: int, total: int, best: Candidate | None, baseline_ms: float | None) -> None:
        for c in active:
            c(done, total, best, baseline_ms)

    return call
