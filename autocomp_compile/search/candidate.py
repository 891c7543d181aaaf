"""A candidate kernel: its code, how it was derived, and how it fared."""
from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from autocomp_compile.targets.base import EvalResult

_COMMENTS = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)


def normalized_code_hash(code: str) -> str:
    """Hash of the code without comments and whitespace: candidates that differ only there are duplicates."""
    body = _COMMENTS.sub("", code)
    body = re.sub(r"\s+", "", body)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


@dataclass
class Candidate:
    id: str
    parent_id: str | None
    iteration: int
    language: str
    code: str
    plan: str = ""
    menu_ids: list[str] = field(default_factory=list)  # optimization sequence from the root
    knobs: dict[str, Any] | None = None  # offline proposer's schedule
    models: list[str] = field(default_factory=list)  # LLMs that wrote the plan / code
    origin: str = "search"  # "lower", "search", "reuse:<cache key>"
    result: EvalResult | None = None

    @property
    def code_hash(self) -> str:
        return normalized_code_hash(self.code)

    @property
    def correct(self) -> bool:
        return self.result is not None and self.result.correct

    @property
    def latency_ms(self) -> float:
        if self.result is None or not self.result.correct or self.result.latency_ms is None:
            return float("inf")
        return self.result.latency_ms

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["code_hash"] = self.code_hash
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Candidate":
        d = {k: v for k, v in d.items() if k != "code_hash"}
        result = d.pop("result", None)
        return cls(**d, result=EvalResult.from_dict(result) if result else None)
