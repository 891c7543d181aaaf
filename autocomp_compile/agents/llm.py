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
import os
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from autocomp_compile.agents.llm_client import LLMCallError, LLMClient, usage_sum
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
    filter_isa: bool = True  # only the CPU reference is split by relevance; CUDA's sections all apply

    @classmethod
    def load(cls, target: str, root: str | Path | None = None) -> "PromptDocs":
        folder = Path(root) if root else PROMPTS_DIR / target
        missing = [f"{name}.md" for name in SECTION_FILES if not (folder / f"{name}.md").is_file()]
        if missing:
            raise FileNotFoundError(f"prompt folder {folder} lacks {missing}")
        return cls(*((folder / f"{name}.md").read_text().strip() for name in SECTION_FILES), filter_isa=target == "cpu")

    def isa_sections(self, relevant: Sequence[str]) -> str:
        """The ISA reference's title plus its `##` sections whose heading names a relevant word (CPU), or the
        whole reference (other targets)."""
        if not self.filter_isa:
            return self.isa
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


PLAN_INSTRUCTION = (
    "# Instruction\nPropose ONE optimization plan for this kernel: pick the menu item it applies "
    "(start your answer with `Menu item: [id]`, or `Menu item: [none]`), then describe the concrete changes "
    "step by step. Do not write the code yet.")
ONE_CALL_INSTRUCTION = (
    "# Instruction\nPick ONE optimization (start your answer with `Menu item: [id]` or `Menu item: [none]`), "
    "say in a few lines what you change, then give the complete new kernel.")


def plan_prompt(docs: PromptDocs, workload: Workload, parent: Candidate, feedback: str, menu_text: str,
                instruction: str = PLAN_INSTRUCTION) -> str:
    latency = f"{parent.latency_ms:.4f} ms" if parent.result and parent.result.correct else "not measured"
    baseline = parent.result.baseline_ms if parent.result else None
    return "\n\n".join([
        docs.overview,
        docs.isa_sections(relevant_words(workload, parent.code)),
        docs.examples,
        "# The kernel to optimize\n" + describe_workload(workload) + f"\n```{parent.language}\n{parent.code}\n```",
        f"# Measurements\nLatency: {latency}" + (f"; PyTorch eager: {baseline:.4f} ms" if baseline else "")
        + (f"\nFeedback from the evaluator:\n{feedback}" if feedback else ""),
        "# Optimization menu\n" + menu_text,
        instruction,
        docs.rules,
    ])


IMPLEMENT_INSTRUCTION = "# Instruction\nApply the plan to the current kernel and answer with the complete new kernel."


def implement_prompt(docs: PromptDocs, workload: Workload, parent: Candidate, plan: str,
                     instruction: str = IMPLEMENT_INSTRUCTION) -> str:
    return "\n\n".join([
        docs.overview,
        docs.isa_sections(relevant_words(workload, parent.code)),
        "# The current kernel\n" + describe_workload(workload) + f"\n```{parent.language}\n{parent.code}\n```",
        "# The plan\n" + plan,
        instruction,
        docs.rules,
    ])


def translate_prompt(docs: PromptDocs, workload: Workload, reference_source: str) -> str:
    return "\n\n".join([
        docs.overview,
        docs.isa_sections(relevant_words(workload, "")),
        docs.examples,
        "# What to compute\n" + describe_workload(workload)
        + f"\nThe PyTorch reference (inputs and outputs in `t`, params in `p`, runtime dims in `rt`):\n"
        f"```python\n{reference_source}\n```",
        "# Instruction\nWrite a first, correct kernel for this workload on this target. Favour correctness over speed.",
        docs.rules,
    ])


def one_call_prompt(docs: PromptDocs, workload: Workload, parent: Candidate, feedback: str, menu_text: str) -> str:
    """Plan and code in one call (--skip-planning): the plan prompt with an instruction to write the code."""
    return plan_prompt(docs, workload, parent, feedback, menu_text, ONE_CALL_INSTRUCTION)


def repair_prompt(docs: PromptDocs, workload: Workload, failed: Candidate) -> str:
    r = failed.result
    error = (r.message or "") + ("\n" + r.stderr if getattr(r, "stderr", None) else "") if r else ""
    return "\n\n".join([
        docs.overview,
        docs.isa_sections(relevant_words(workload, failed.code)),
        "# The kernel that failed\n" + describe_workload(workload) + f"\n```{failed.language}\n{failed.code}\n```",
        f"# What went wrong (stage: {r.stage if r else '?'})\n```\n{error.strip()[-3000:]}\n```",
        "# Instruction\nFix the kernel so that it compiles and computes the right result; keep its optimizations. "
        "Answer with the complete fixed kernel.",
        docs.rules,
    ])


EDIT_INSTRUCTION = (
    "# Instruction\nApply the plan as edits to the current kernel, not as a new file. For each change write\n"
    "<<<<<<< OLD\n(exact lines of the current kernel, unique in it)\n=======\n(their replacement)\n>>>>>>> NEW\n"
    "Give as many such blocks as the plan needs, and nothing else.")
_EDIT = re.compile(r"<<<<<<< OLD\n(.*?)\n=======\n(.*?)\n?>>>>>>> NEW", re.S)


def _edit_span(code: str, old: str, i: int) -> tuple[int, int]:
    """Where edit `i`'s OLD text sits in the parent's code; it must occur there exactly once."""
    count = code.count(old)
    if count != 1:
        raise ResponseRejected(f"edit {i + 1}: its OLD text occurs {count} times in the kernel (must be exactly once)")
    start = code.index(old)
    return start, start + len(old)


def apply_edits(code: str, response: str) -> str:
    """The parent's code with the response's OLD/NEW edit blocks applied: every OLD is located in the parent
    (exactly once, not overlapping another), then all replacements are spliced in at once."""
    edits = _EDIT.findall(response)
    if not edits:
        raise ResponseRejected("no <<<<<<< OLD / ======= / >>>>>>> NEW edit blocks in the response")
    spans = sorted((*_edit_span(code, old, i), i, new) for i, (old, new) in enumerate(edits))
    for (_, end, i, _), (start, _, j, _) in zip(spans, spans[1:]):
        if start < end:
            raise ResponseRejected(f"edits {min(i, j) + 1} and {max(i, j) + 1} overlap in the kernel")
    for start, end, _, new in reversed(spans):
        code = code[:start] + new + code[end:]
    return code


def extra_menu_prompt(docs: PromptDocs, workload: Workload, parent: Candidate, menu_text: str) -> str:
    return "\n\n".join([
        docs.overview,
        "# The kernel\n" + describe_workload(workload) + f"\n```{parent.language}\n{parent.code}\n```",
        "# Optimizations already on the menu\n" + menu_text,
        "# Instruction\nList up to 5 further optimizations that could make THIS kernel faster on this target and "
        "are not on the menu, one per line as `- [short-id] Title: one-sentence description`.",
    ])


_MENU_LINE = re.compile(r"\s*- \[([\w.-]+)\] .+")


def parse_menu_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if _MENU_LINE.match(line)][:5]


def menu_line_id(line: str) -> str:
    m = _MENU_LINE.match(line)
    return m.group(1) if m else ""


def reference_source(workload: Workload) -> str:
    """The source of the workload's float32 reference (and the helpers it calls from the same module)."""
    import inspect

    from autocomp_compile import references
    from autocomp_compile.references import get_kind

    fn = get_kind(workload.kind).reference
    parts = [inspect.getsource(fn)]
    for name in fn.__code__.co_names:
        helper = getattr(references, name, None)
        if inspect.isfunction(helper) and helper.__module__ == references.__name__ and helper is not fn:
            parts.insert(0, inspect.getsource(helper))
    return "\n".join(parts).strip()


# ---------------------------------------------------------------- responses

_BLOCK = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.S)
# The entry point's definition (not a prototype), its two parameters in any spelling the compiler takes
# (`restrict`, `__restrict__`, `int64_t const *`, array form); the compiler checks the types.
_ENTRY_C = re.compile(r"\bvoid\s+autocomp_kernel\s*\(\s*void\b[^,;{}()]*,\s*[^,;{}()]*\bint64_t\b[^,;{}()]*\)\s*\{")
LLM_LANGUAGES = frozenset({"c", "cuda"})  # what extract_code takes and the built-in prompts cover
# Names of calls outside the kernel (processes, libraries, files, sockets, threads, the Python C API), matched
# as identifiers anywhere in the code so that an alias (`#define RUN system`, `(system)(...)`) is caught too.
_FORBIDDEN = re.compile(r"\b(system|popen|fork|vfork|clone|exec[lv]\w*|fexecve|posix_spawn\w*|dlopen|dlsym|dlvsym|dlmopen"
                        r"|fopen\w*|freopen\w*|fdopen|open|open64|openat\w*|creat|socket|connect|syscall"
                        r"|pthread_create|thrd_create|_?Py[A-Z_]\w*)\b")


_LAUNCH = "// autocomp-launch:"
# The harness launches every kernel on PyTorch's stream; device code must not launch work of its own
# (dynamic parallelism, fire-and-forget or tail launches run outside the timed region) or allocate.
_FORBIDDEN_CUDA = re.compile(r"(cudaStream\w*|cudaMalloc\w*|cudaLaunch\w*|cudaGraph\w*|<<<|#\s*include|printf\s*\("
                             r"|\bmalloc\b|\bfree\b|\bnew\b)")
_COMMENT_OR_STRING = re.compile(r'"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'|//[^\n]*|/\*.*?\*/', re.S)


def _without_comments(code: str) -> str:
    """The code with its comments blanked (string literals kept), for the forbidden-name checks."""
    return _COMMENT_OR_STRING.sub(lambda m: m.group(0) if m.group(0)[0] in "\"'" else " ", code)


_BOUNDS = r"(?:__launch_bounds__\s*\([^)]*\)\s*)?"


def _cuda_entry(code: str) -> str | None:
    """Why a CUDA source does not follow the launch convention, or None when it does."""
    if not code.startswith(_LAUNCH):
        return f"the first line must be the launch line `{_LAUNCH} {{...}}`"
    try:
        spec = json.loads(code.split("\n", 1)[0][len(_LAUNCH):])
        names = [k["name"] for k in spec["kernels"]]
    except (ValueError, KeyError, TypeError) as exc:
        return f"bad launch line: {exc}"
    missing = [n for n in names if not re.search(rf'extern\s+"C"\s+__global__\s+{_BOUNDS}void\s+{_BOUNDS}{re.escape(n)}\s*\(',
                                                   code)]
    return f"no `extern \"C\" __global__` kernel named {missing}" if missing or not names else None


def extract_code(response: str, language: str = "c") -> str:
    """The kernel in a response: the last fenced block in the target's language that has its entry point
    (C: `autocomp_kernel`; CUDA: the launch line and the kernels it names)."""
    blocks = [(lang.lower(), body.strip()) for lang, body in _BLOCK.findall(response)]
    if not blocks:
        raise ResponseRejected("no code block in the response")
    if response.count("```") % 2:  # a block opened and never closed: the answer was cut off
        raise ResponseRejected("the response ends inside an unclosed code block (truncated answer?)")
    langs = ("", "cuda", "cu", "cpp", "c++") if language == "cuda" else ("", "c", "cpp", "c++")
    usable = [b for lang, b in blocks if lang in langs]
    if not usable:
        raise ResponseRejected(f"code blocks in {sorted({lang for lang, _ in blocks})}, none in {language}")
    if language == "cuda":
        reasons = [_cuda_entry(b) for b in usable]
        with_entry = [b for b, why in zip(usable, reasons) if why is None]
        if not with_entry:
            raise ResponseRejected(reasons[-1] or "no kernel")
        code = with_entry[-1]
        bad = _FORBIDDEN_CUDA.search(_without_comments(code))
    else:
        with_entry = [b for b in usable if _ENTRY_C.search(b)]
        if not with_entry:
            raise ResponseRejected("no `void autocomp_kernel(void **tensors, const int64_t *dims)` entry point")
        code = with_entry[-1]
        bad = _FORBIDDEN.search(_without_comments(code))
    if bad:
        raise ResponseRejected(f"uses {bad.group(1)}: kernels compute everything themselves (rules)")
    return code + "\n"


_MENU_ITEM = re.compile(r"Menu item:\**\s*\[\s*`?([^\]`]+?)`?\s*\]")


def menu_item_of(plan: str, menu_ids: Sequence[str]) -> str | None:
    """The menu id a plan names (`Menu item: [id]`, also bold or with the id in backticks), if on the menu."""
    m = _MENU_ITEM.search(plan)
    return m.group(1).strip() if m and m.group(1).strip() in menu_ids else None


# ---------------------------------------------------------------- the proposer


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, so that a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_usage(path: Path) -> dict[str, Any]:
    """An earlier run's usage record, or {} when there is none or it is not one (it is then replaced)."""
    try:
        usage = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return usage if isinstance(usage, dict) else {}


def _read_transcript(path: Path | None) -> str | None:
    """A saved response, or None when there is none or it cannot be read whole (then the call is made again)."""
    if path is None:
        return None
    try:
        response = json.loads(path.read_text())["response"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return response if isinstance(response, str) else None


class LLMProposer:
    """Plan-then-implement through `LLMClient`; samples are split across the models (round robin)."""

    name = "llm"

    def __init__(self, client: LLMClient, models: Sequence[str] | None = None, dropout: float = 0.7,
                 prompts_dir: str | Path | None = None, transcript_dir: str | Path | None = None,
                 skip_planning: bool = False, repair: bool = False, translate: bool = True, edits: bool = False,
                 extra_menu: bool = False):
        self.client = client
        self.edits = edits
        self.extra_menu = extra_menu
        self.skip_planning = skip_planning
        self.repair_failed = repair
        self.translate_first = translate
        self.models = list(models or client.specs)
        self.name = f"llm[{','.join(self.models)}]"
        self.dropout = dropout
        self.prompts_dir = prompts_dir
        self.transcript_dir = Path(transcript_dir) if transcript_dir else None
        self._fixed_transcripts = self.transcript_dir is not None  # else each run keeps its own under run_dir/llm
        self.rejected: list[dict[str, Any]] = []
        self._docs: dict[str, PromptDocs] = {}
        self._start_usage_record()

    def attach_run_dir(self, run_dir: Path) -> None:
        """Save prompts and responses under the search's run directory (and reuse them on a re-run)."""
        if not self._fixed_transcripts:
            self.transcript_dir = Path(run_dir) / "llm"
        self._start_usage_record()

    def _start_usage_record(self) -> None:
        """`usage.json` counts its directory's calls: what an earlier run recorded there plus the client's calls
        from now on (the client may have served other runs before, as in `warm`)."""
        self._usage_base = self.client.usage.to_dict()
        self._usage_earlier = _read_usage(self.transcript_dir / "usage.json") if self.transcript_dir else {}

    def _write_usage(self) -> None:
        since = usage_sum(self.client.usage.to_dict(), self._usage_base, sign=-1)
        _write_atomic(self.transcript_dir / "usage.json", json.dumps(usage_sum(self._usage_earlier, since), indent=1))

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
            saved = _read_transcript(path)
            if saved is not None:
                out.append(saved)
            else:
                out.append(None)
                todo.append((len(out) - 1, model, prompt, path))
        answers = self.client.complete_many([(m, [{"role": "user", "content": p}]) for _, m, p, _ in todo]) if todo else []
        for (i, model, prompt, path), answer in zip(todo, answers):
            out[i] = answer
            if path is not None and isinstance(answer, str):
                _write_atomic(path, json.dumps({"model": model, "prompt": prompt, "response": answer}, indent=1))
        if todo and self.transcript_dir is not None:  # the run's record of calls, tokens and cost so far
            self._write_usage()
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

    def _code_candidates(self, answers: Sequence[str | LLMCallError], models: Sequence[str],
                         parents: Sequence[Candidate | None], stage: str, make: Any,
                         language: str = "c") -> list[Candidate]:
        """Candidates from code-bearing answers; failures and unusable answers are recorded as rejections
        against the answer's parent (None: the workload's reference, as for translations)."""
        out = []
        for k, (model, answer, parent) in enumerate(zip(models, answers, parents)):
            owner = parent or Candidate(id="reference", parent_id=None, iteration=0, language="", code="", plan="")
            if isinstance(answer, LLMCallError):
                self._reject(owner, model, stage, str(answer))
                continue
            try:
                code = extract_code(answer, language)
            except ResponseRejected as exc:
                self._reject(owner, model, stage, str(exc))
                continue
            out.append(make(k, model, code, answer))
        return out

    def translate(self, workload: Workload, target: Any) -> list[Candidate]:
        """First kernels written from the PyTorch reference, one per model (the translation phase)."""
        if not self.translate_first:
            return []
        prompt = translate_prompt(self.docs(target), workload, reference_source(workload))
        answers = self._ask([(m, prompt, "translate") for m in self.models])
        return self._code_candidates(answers, self.models, [None] * len(answers), "translate", lambda k, model, code, text: Candidate(
            id=f"translate-{k}", parent_id=None, iteration=0, language=target.language, code=code,
            plan=f"Translation of the PyTorch reference by {model}.", models=[model], origin=f"llm:{model}"),
            target.language)

    def repair(self, failed: Sequence[Candidate], workload: Workload, target: Any, iteration: int) -> list[Candidate]:
        """One more call per failed candidate, with its compiler or correctness error."""
        docs = self.docs(target)
        todo = [c for c in failed if c.result is not None and not c.result.correct and c.origin.startswith("llm:")]
        models = [c.origin.split(":", 1)[1] if c.origin.split(":", 1)[1] in self.models else self.models[0] for c in todo]
        answers = self._ask([(m, repair_prompt(docs, workload, c), f"repair-{iteration}-{c.code_hash}")
                             for m, c in zip(models, todo)])
        return self._code_candidates(answers, models, todo, "repair", lambda k, model, code, text: Candidate(
            id=f"{todo[k].id}-fix", parent_id=todo[k].parent_id, iteration=iteration, language=target.language,
            code=code, plan=todo[k].plan + "\n\nRepaired after: " + (todo[k].result.message or todo[k].result.stage),
            menu_ids=list(todo[k].menu_ids), models=[model], origin=f"llm:{model}"), target.language)

    def _extra_menu(self, docs: PromptDocs, workload: Workload, parent: Candidate, items: Sequence[Any],
                    iteration: int) -> list[str]:
        """Once per parent: the model proposes menu items of its own (Autocomp's LLM-generated menu)."""
        if not self.extra_menu:
            return []
        prompt = extra_menu_prompt(docs, workload, parent, "\n".join(m.as_text() for m in items))
        model = self.models[iteration % len(self.models)]
        (answer,) = self._ask([(model, prompt, f"menu-{parent.code_hash}")])
        if isinstance(answer, LLMCallError):
            self._reject(parent, model, "menu", str(answer))
            return []
        return parse_menu_lines(answer)

    def propose(self, parent: Candidate, workload: Workload, target: Any, feedback: str, n_plans: int, n_impls: int,
                rng: random.Random, iteration: int) -> list[Candidate]:
        docs = self.docs(target)
        items = [m for m in target.menu(workload) if parent.knobs is None or m.applies(parent.knobs)]
        extra = self._extra_menu(docs, workload, parent, items, iteration)
        ids = [m.id for m in items] + [menu_line_id(line) for line in extra]

        def menu_text() -> str:
            kept = [m.as_text() for m in (apply_dropout(items, self.dropout, rng) or items)]
            return "\n".join(kept + [line for line in extra if rng.random() >= self.dropout])
        if self.skip_planning:
            reqs = []
            for p in range(n_plans * n_impls):
                model = self.models[(iteration + p) % len(self.models)]
                reqs.append((model, one_call_prompt(docs, workload, parent, feedback, menu_text()),
                             f"code-{iteration}-{parent.id}-{p}"))
            answers = self._ask(reqs)
            return self._code_candidates(answers, [m for m, _, _ in reqs], [parent] * len(reqs), "code", lambda k, model, code, text:
                                         Candidate(id=f"i{iteration}-{parent.id}-c{k}", parent_id=parent.id,
                                                   iteration=iteration, language=target.language, code=code, plan=text,
                                                   menu_ids=parent.menu_ids + [i for i in [menu_item_of(text, ids)] if i],
                                                   models=[model], origin=f"llm:{model}"), target.language)
        plan_reqs = []
        for p in range(n_plans):
            model = self.models[(iteration + p) % len(self.models)]
            prompt = plan_prompt(docs, workload, parent, feedback, menu_text())
            plan_reqs.append((model, prompt, f"plan-{iteration}-{parent.id}-{p}"))
        plans = self._ask(plan_reqs)
        impl_reqs, impl_meta = [], []
        for p, (plan, (plan_model, _, _)) in enumerate(zip(plans, plan_reqs)):
            if isinstance(plan, LLMCallError):
                self._reject(parent, plan_model, "plan", str(plan))
                continue
            if not (plan or "").strip():
                self._reject(parent, plan_model, "plan", "empty plan")
                continue
            for i in range(n_impls):
                model = self.models[(iteration + p + i) % len(self.models)]
                prompt = implement_prompt(docs, workload, parent, plan,
                                          EDIT_INSTRUCTION if self.edits else IMPLEMENT_INSTRUCTION)
                impl_reqs.append((model, prompt, f"impl-{iteration}-{parent.id}-{p}-{i}"))
                impl_meta.append((p, i, plan, plan_model))
        children = []
        for (model, _, _), (p, i, plan, plan_model), answer in zip(impl_reqs, impl_meta, self._ask(impl_reqs)):
            if isinstance(answer, LLMCallError):
                self._reject(parent, model, "implement", str(answer))
                continue
            try:
                if self.edits:  # the edited kernel must pass the same checks as a whole one
                    answer = f"```{target.language}\n{apply_edits(parent.code, answer)}```"
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
