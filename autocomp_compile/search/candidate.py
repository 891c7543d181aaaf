"""A candidate kernel: its code, how it was derived, and how it fared."""
from __future__ import annotations

import math

import hashlib
import io
import re
import tokenize
from dataclasses import asdict, dataclass, field
from typing import Any

from autocomp_compile.targets.base import EvalResult

_C_COMMENTS = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
PYTHON_LANGUAGES = frozenset({"nki", "python", "triton"})


def normalized_code_hash(code: str, language: str = "c") -> str:
    """Hash of the code without comments and insignificant whitespace: candidates that differ only there are
    duplicates. C-like code (C, CUDA) drops all whitespace; Python code (NKI) keeps its tokens and indentation
    structure, where `//` is floor division and `#` starts a comment."""
    body = _python_tokens(code) if language in PYTHON_LANGUAGES else re.sub(r"\s+", "", _C_COMMENTS.sub("", code))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _python_tokens(code: str) -> str:
    """Python source as its token sequence without comments and blank lines (indentation kept as INDENT/DEDENT);
    code that does not tokenize (an LLM's broken answer) is kept whole but for trailing spaces and blank lines."""
    try:
        tokens = [f"{tok.type}:{tok.string}" for tok in tokenize.generate_tokens(io.StringIO(code).readline)
                  if tok.type not in (tokenize.COMMENT, tokenize.NL)]
    except (tokenize.TokenError, SyntaxError):
        return "\n".join(line.rstrip() for line in code.splitlines() if line.strip())
    return "\x00".join(tokens)


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
        return normalized_code_hash(self.code, self.language)

    @property
    def correct(self) -> bool:
        return self.result is not None and self.result.correct

    @property
    def latency_ms(self) -> float:
        r = self.result
        if r is None or not r.correct or r.latency_ms is None or not math.isfinite(r.latency_ms) or r.latency_ms <= 0:
            return float("inf")  # a latency no kernel can have (NaN, 0, negative) never ranks a candidate first
        return r.latency_ms

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["code_hash"] = self.code_hash
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Candidate":
        d = {k: v for k, v in d.items() if k != "code_hash"}
        result = d.pop("result", None)
        return cls(**d, result=EvalResult.from_dict(result) if result else None)
