"""The LLM proposer: Autocomp's plan-then-implement with one or more models (an ensemble).

For each parent kernel, `n_plans` plan prompts (architecture overview, the ISA sections relevant to the
workload, examples, the current code, its latency and the evaluator's feedback, the optimization menu
after dropout, the instruction, the rules) go to the configured models in turn; each plan then gets
`n_impls` implementation prompts (overview, ISA, current code, the plan, the instruction, the rules).
Every prompt and response is saved; a re-run with the same prompts reads the saved responses instead of
calling a model again. Responses are parsed strictly: one code block, the target's entry point, nothing
that calls outside the kernel; rejected responses are recorded with their reason.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from autocomp_compile.agents.llm_client import LLMCallError, LLMClient
from autocomp_compile.agents.menu import apply_dropout
from autocomp_compile.search.candidate import Candidate
from autocomp_compile.workload import Workload

PROMPTS_DIR = Path(__file__).parent / "prompts"
SECTION_FILES = ("overview", "isa", "examples", "rules")


class ResponseRejected(ValueError):
    """A response that cannot become a candidate (the message says why)."""


# ---------------------------------------------------------------- prompt material


@dataclass(frozen=True)
class PromptDocs:
    """The editable markdown of one target: overview, ISA reference, examples, rules."""

    overview: str
    isa: str
    examples: str
    rules: str

    @classmethod
    def load(cls, target: str, root: str | Path | None = None) -> "PromptDocs":
        folder = Path(root) if root else PROMPTS_DIR / target
        missing = [f"{name}.md" for name in SECTION_FILES if not (folder / f"{name}.md").is_file()]
        if missing:
            raise FileNotFoundError(f"prompt folder {folder} lacks {missing}")
        return cls(*((folder / f"{name}.md").read_text().strip() for name in SECTION_FILES))

    def isa_sections(self, relevant: Sequence[str]) -> str:
        """The ISA reference's title plus its `##` sections whose heading names a relevant word."""
        head, *sections = re.split(r"(?m)^(?=## )", self.isa)
        keep = [s for s in sections if any(word.lower() in s.splitlines()[0].lower() for word in relevant)]
        return "\n".join([head.strip(), *(s.strip() for s in keep or sections)])


def relevant_words(workload: Workload, code: str) -> list[str]:
    """Words that pick ISA sections: the dtype, what the kernel computes, the extensions the code uses."""
    words = [workload.dtype, "OpenMP"]
    if workload.kind in ("mlp",):
        words += ["SiLU", "exp"]
    if workload.kind == "attention":
        words += ["exp"]
    for marker, word in (("_mm256", "AVX2"), ("_mm512", "AVX-512"), ("dpbf16", "AVX512-BF16")):
        if marker in code:
            words.append(word)
    if "_mm" not in code:
        words.append("AVX2")
    return words


def describe_workload(workload: Workload) -> str:
    tensors = "\n".join(f"- {i}: `{t.name}` {t.role} {list(t.shape)} {t.dtype}" for i, t in enumerate(workload.tensors))
    dims = ", ".join(f"dims[{i}] = {k} (tuned for {v})" for i, (k, v) in enumerate(workload.runtime_dims.items()))
    return (f"Workload `{workload.kind}` ({workload.dtype}), params {json.dumps(workload.params, sort_keys=True)}.\n"
            f"Tensors, in the order of `tensors[]`:\n{tensors}\n" + (f"Runtime dims: {dims}.\n" if dims else ""))


def plan_prompt(docs: PromptDocs, workload: Workload, parent: Candidate, feedback: str, menu_text: str) -> str:
    latency = f"{parent.latency_ms:.4f} ms" if parent.result and parent.result.correct else "not measured"
    baseline = parent.result.baseline_ms if parent.result else None
    return "\n\n".join([
        docs.overview,
        docs.isa_sections(relevant_words(workload, parent.code)),
        docs.examples,
        "# The kernel to optimize\n" + describe_workload(workload) + f"\n```c\n{parent.code}\n```",
        f"# Measurements\nLatency: {latency}" + (f"; PyTorch eager: {baseline:.4f} ms" if baseline else "")
        + (f"\nFeedback from the evaluator:\n{feedback}" if feedback else ""),
        "# Optimization menu\n" + menu_text,
        "# Instruction\nPropose ONE optimization plan for this kernel: pick the menu item it applies "
        "(start your answer with `Menu item: [id]`, or `Menu item: [none]`), then describe the concrete changes "
        "step by step. Do not write the code yet.",
        docs.rules,
    ])


def implement_prompt(docs: PromptDocs, workload: Workload, parent: Candidate, plan: str) -> str:
    return "\n\n".join([
        docs.overview,
        docs.isa_sections(relevant_words(workload, parent.code)),
        "# The current kernel\n" + describe_workload(workload) + f"\n```c\n{parent.code}\n```",
        "# The plan\n" + plan,
        "# Instruction\nApply the plan to the current kernel and answer with the complete new kernel.",
        docs.rules,
    ])


# ---------------------------------------------------------------- responses

_BLOCK = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.S)
_ENTRY_C = re.compile(r"\bvoid\s+autocomp_kernel\s*\(\s*void\s*\*\s*\*\s*\w*\s*,\s*const\s+int64_t\s*\*\s*\w*\s*\)")
_FORBIDDEN = re.compile(r"\b(dlopen|dlsym|system|popen|fork|execv\w*|Py[A-Z]\w*|pthread_create|fopen|socket)\s*\(")


def extract_code(response: str, language: str = "c") -> str:
    """The kernel in a response: the last fenced block (C/C++/CUDA or unlabelled) that has the entry point."""
    blocks = [(lang.lower(), body.strip()) for lang, body in _BLOCK.findall(response)]
    if not blocks:
        raise ResponseRejected("no code block in the response")
    usable = [b for lang, b in blocks if lang in ("", "c", "cpp", "c++", "cuda", "cu")]
    if not usable:
        raise ResponseRejected(f"code blocks in {sorted({lang for lang, _ in blocks})}, none in C")
    with_entry = [b for b in usable if _ENTRY_C.search(b)]
    if not with_entry:
        raise ResponseRejected("no `void autocomp_kernel(void **tensors, const int64_t *dims)` entry point")
    code = with_entry[-1]
    bad = _FORBIDDEN.search(code)
    if bad:
        raise ResponseRejected(f"calls {bad.group(1)}(): kernels compute everything themselves (rules)")
    return code + "\n"


def menu_item_of(plan: str, menu_ids: Sequence[str]) -> str | None:
    m = re.search(r"Menu item:\s*\[([^\]]+)\]", plan)
    return m.group(1).strip() if m and m.group(1).strip() in menu_ids else None


# ---------------------------------------------------------------- the proposer


class LLMProposer:
    """Plan-then-implement through `LLMClient`; samples are split across the models (round robin)."""

    name = "llm"

    def __init__(self, client: LLMClient, models: Sequence[str] | None = None, dropout: float = 0.7,
                 prompts_dir: str | Path | None = None, transcript_dir: str | Path | None = None):
        self.client = client
        self.models = list(models or client.specs)
        self.name = f"llm[{','.join(self.models)}]"
        self.dropout = dropout
        self.prompts_dir = prompts_dir
        self.transcript_dir = Path(transcript_dir) if transcript_dir else None
        self.rejected: list[dict[str, Any]] = []
        self._docs: dict[str, PromptDocs] = {}

    def attach_run_dir(self, run_dir: Path) -> None:
        """Save prompts and responses under the search's run directory (and reuse them on a re-run)."""
        if self.transcript_dir is None:
            self.transcript_dir = Path(run_dir) / "llm"

    def docs(self, target: Any) -> PromptDocs:
        if target.name not in self._docs:
            self._docs[target.name] = PromptDocs.load(target.name, self.prompts_dir)
        return self._docs[target.name]

    def _ask(self, requests: list[tuple[str, str, str]]) -> list[str | LLMCallError]:
        """(model, prompt, sample key) -> response text, from the transcript when this exact call was made."""
        out: list[str | LLMCallError | None] = []
        todo = []
        for model, prompt, key in requests:
            path = self._path(model, prompt, key)
            if path is not None and path.exists():
                out.append(json.loads(path.read_text())["response"])
            else:
                out.append(None)
                todo.append((len(out) - 1, model, prompt, path))
        answers = self.client.complete_many([(m, [{"role": "user", "content": p}]) for _, m, p, _ in todo])
        for (i, model, prompt, path), answer in zip(todo, answers):
            out[i] = answer
            if path is not None and isinstance(answer, str):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"model": model, "prompt": prompt, "response": answer}, indent=1))
        return out  # type: ignore[return-value]

    def _path(self, model: str, prompt: str, key: str) -> Path | None:
        if self.transcript_dir is None:
            return None
        digest = hashlib.sha256(f"{model}\0{key}\0{prompt}".encode()).hexdigest()[:16]
        return self.transcript_dir / f"{digest}.json"

    def _reject(self, parent: Candidate, model: str, stage: str, why: str) -> None:
        self.rejected.append({"parent": parent.id, "model": model, "stage": stage, "reason": why})
        if self.transcript_dir is not None:
            self.transcript_dir.mkdir(parents=True, exist_ok=True)
            with open(self.transcript_dir / "rejected.jsonl", "a") as f:
                f.write(json.dumps(self.rejected[-1]) + "\n")

    def propose(self, parent: Candidate, workload: Workload, target: Any, feedback: str, n_plans: int, n_impls: int,
                rng: random.Random, iteration: int) -> list[Candidate]:
        docs = self.docs(target)
        items = [m for m in target.menu(workload) if parent.knobs is None or m.applies(parent.knobs)]
        plan_reqs = []
        for p in range(n_plans):
            menu = apply_dropout(items, self.dropout, rng) or items
            model = self.models[(iteration + p) % len(self.models)]
            prompt = plan_prompt(docs, workload, parent, feedback, "\n".join(m.as_text() for m in menu))
            plan_reqs.append((model, prompt, f"plan-{iteration}-{parent.id}-{p}"))
        plans = self._ask(plan_reqs)
        impl_reqs, impl_meta = [], []
        for p, (plan, (plan_model, _, _)) in enumerate(zip(plans, plan_reqs)):
            if isinstance(plan, LLMCallError):
                self._reject(parent, plan_model, "plan", str(plan))
                continue
            for i in range(n_impls):
                model = self.models[(iteration + p + i) % len(self.models)]
                impl_reqs.append((model, implement_prompt(docs, workload, parent, plan),
                                  f"impl-{iteration}-{parent.id}-{p}-{i}"))
                impl_meta.append((p, i, plan, plan_model))
        children = []
        ids = [m.id for m in items]
        for (model, _, _), (p, i, plan, plan_model), answer in zip(impl_reqs, impl_meta, self._ask(impl_reqs)):
            if isinstance(answer, LLMCallError):
                self._reject(parent, model, "implement", str(answer))
                continue
            try:
                code = extract_code(answer, target.language)
            except ResponseRejected as exc:
                self._reject(parent, model, "parse", str(exc))
                continue
            item = menu_item_of(plan, ids)
            children.append(Candidate(
                id=f"i{iteration}-{parent.id}-l{p}-{i}", parent_id=parent.id, iteration=iteration,
                language=target.language, code=code, plan=plan,
                menu_ids=parent.menu_ids + ([item] if item else []), knobs=None,
                models=[plan_model, model], origin=f"llm:{model}",
            ))
        return children
