"""The run directory: every candidate's plan, code and result, per iteration; resume from it.

Layout::

    output/<run-name>/config.json          settings, workload, target fingerprint
    output/<run-name>/iter-003/<id>/kernel.c, plan.md, candidate.json
    output/<run-name>/iter-003/beam.json   ids of the beam after the iteration
    output/<run-name>/result.json          summary when the run ends
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from autocomp_compile.search.candidate import Candidate
from autocomp_compile.targets.base import EvalResult

_SUFFIX = {"c": "c", "cuda": "cu", "nki": "py"}


class RunConflict(RuntimeError):
    """The run directory holds a run with different settings."""


def _write_json(path: Path, data: Any) -> None:
    # A temporary file of this writer's own: two searches sharing a run directory never rename each other's
    # half-written file, and an interrupted write never leaves half a file.
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDirectory:
    def __init__(self, root: Path, config: dict[str, Any]):
        self.root = root
        self.config = config
        cfg_path = root / "config.json"
        if cfg_path.exists():
            try:
                existing = json.loads(cfg_path.read_text())
            except (ValueError, UnicodeDecodeError) as exc:  # written atomically: only an edit breaks it
                raise RunConflict(f"{cfg_path} is not valid JSON ({exc}); delete that run directory or pick "
                                  "another --run-name") from None
            if existing != json.loads(json.dumps(config, default=str)):
                raise RunConflict(
                    f"{root} holds a run with different settings; pick another --run-name or delete that directory"
                )
        root.mkdir(parents=True, exist_ok=True)
        _write_json(cfg_path, config)

    def iteration_dir(self, iteration: int) -> Path:
        d = self.root / f"iter-{iteration:03d}"
        d.mkdir(exist_ok=True)
        return d

    def save_candidate(self, c: Candidate) -> None:
        d = self.iteration_dir(c.iteration) / c.id
        d.mkdir(exist_ok=True)
        (d / f"kernel.{_SUFFIX.get(c.language, 'txt')}").write_text(c.code)
        (d / "plan.md").write_text(c.plan + "\n")
        _write_json(d / "candidate.json", c.to_dict())

    def save_beam(self, iteration: int, beam: list[Candidate]) -> None:
        _write_json(self.iteration_dir(iteration) / "beam.json", [c.id for c in beam])

    def save_result(self, summary: dict[str, Any]) -> None:
        _write_json(self.root / "result.json", summary)

    def load_results(self) -> dict[str, EvalResult]:
        """Results of candidates evaluated by an earlier (possibly interrupted) run, by code hash."""
        memo: dict[str, EvalResult] = {}
        for path in sorted(self.root.glob("iter-*/*/candidate.json")):
            try:
                d = json.loads(path.read_text())
                if d.get("result"):
                    memo[d["code_hash"]] = EvalResult.from_dict(d["result"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # a damaged candidate file: that candidate is simply evaluated again
        return memo
