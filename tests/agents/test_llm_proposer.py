"""Plan-then-implement against a local OpenAI-compatible server serving recorded responses: prompt
assembly, response parsing, rejections with reasons, and a full `optimize` run through the CLI."""
from __future__ import annotations

import json

import pytest

from autocomp_compile import cli, make_workload
from autocomp_compile.agents.llm import (
    PromptDocs, ResponseRejected, extract_code, implement_prompt, menu_item_of, plan_prompt,
)
from autocomp_compile.search.candidate import Candidate
from autocomp_compile.targets.base import EvalResult
from autocomp_compile.targets.cpu.target import CpuTarget
from tests.agents.llm_server import RecordedServer, Reply

N, K = 256, 512
GOOD = f"""Here is the kernel.
```c
#include <immintrin.h>
#include <stdint.h>
void autocomp_kernel(void **t, const int64_t *dims) {{
    const float *x = t[0], *w = t[1];
    float *out = t[2];
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < {N}; n++) {{
        __m256 acc = _mm256_setzero_ps();
        for (int64_t k = 0; k < {K}; k += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + n * {K} + k), _mm256_loadu_ps(x + k), acc);
        float lanes[8];
        _mm256_storeu_ps(lanes, acc);
        float s = 0.0f;
        for (int i = 0; i < 8; i++) s += lanes[i];
        out[n] = SCALE s;
    }}
}}
```"""


def good(scale: str = "") -> str:
    return GOOD.replace("SCALE ", scale)


SCALAR = f"""```c
#include <stdint.h>
void autocomp_kernel(void **t, const int64_t *dims) {{
    const float *x = t[0], *w = t[1];
    float *out = t[2];
    for (int64_t n = 0; n < {N}; n++) {{
        float s = 0.0f;
        for (int64_t k = 0; k < {K}; k++) s += x[k] * w[n * {K} + k];
        out[n] = s;
    }}
}}
```"""


def scripted(impls, translation=Reply(SCALAR), fix=Reply(good())):
    """Replies by prompt kind: translation, plan, repair, one-call code, then implementations in turn."""
    def script(body, n):
        prompt = body["messages"][0]["content"]
        if "Write a first, correct kernel" in prompt:
            return translation
        if "Propose ONE optimization plan" in prompt:
            return Reply("Menu item: [none]\nVectorize the dot products with AVX2 FMAs and split rows over threads.")
        if "Fix the kernel" in prompt:
            return fix
        script.impl += 1
        return impls[script.impl % len(impls)]

    script.impl = -1
    return script


def test_extract_code_rules():
    assert "autocomp_kernel" in extract_code(good())
    with pytest.raises(ResponseRejected, match="no code block"):
        extract_code("I would vectorize the loop.")
    with pytest.raises(ResponseRejected, match="entry point"):
        extract_code("```c\nvoid kernel(float *x) {}\n```")
    with pytest.raises(ResponseRejected, match="none in c"):
        extract_code("```python\nimport torch\n```")
    with pytest.raises(ResponseRejected, match="dlopen"):
        extract_code("```c\n#include <dlfcn.h>\nvoid autocomp_kernel(void **t, const int64_t *d) { dlopen(0, 0); }\n```")
    two = "```c\nvoid autocomp_kernel(void **t, const int64_t *d) { /* draft */ }\n```\n" + good()
    assert "_mm256_fmadd_ps" in extract_code(two)  # the last complete kernel wins
    assert menu_item_of("Menu item: [cpu-omp]\n...", ["cpu-omp"]) == "cpu-omp"
    assert menu_item_of("Menu item: [made-up]", ["cpu-omp"]) is None


def test_prompts_have_their_sections_in_order():
    target = CpuTarget(["scalar", "avx2"])
    w = make_workload("gemm", "fp32", m=1, n=N, k=K)
    root = target.lower(w)
    docs = PromptDocs.load("cpu")
    plan = plan_prompt(docs, w, root, "correctness: max error 3.2", "- [a] A: do a\n- [b] B: do b")
    order = [docs.overview[:40], "# ISA reference", "# Example", "# The kernel to optimize", "# Measurements",
             "Feedback from the evaluator", "# Optimization menu", "# Instruction", "# Rules"]
    positions = [plan.index(marker) for marker in order]
    assert positions == sorted(positions)
    assert "## bf16" not in plan and "## AVX2" in plan  # ISA sections picked for an fp32 scalar kernel
    impl = implement_prompt(docs, w, root, "Menu item: [none]\nVectorize.")
    order = [docs.overview[:40], "# ISA reference", "# The current kernel", "# The plan", "# Instruction", "# Rules"]
    positions = [impl.index(marker) for marker in order]
    assert positions == sorted(positions) and "# Example" not in impl and "# Optimization menu" not in impl


def test_user_prompt_folder_must_be_complete(tmp_path):
    (tmp_path / "overview.md").write_text("x")
    with pytest.raises(FileNotFoundError, match="isa.md"):
        PromptDocs.load("cpu", tmp_path)


@pytest.fixture
def server():
    impls = [Reply(good()),                       # correct and faster than the scalar root
             Reply(good("0.5f *")),               # wrong numbers
             Reply(good().replace("out[n] = ", "out[n] = oops ")),  # does not compile
             Reply("Sorry, I cannot write that kernel."),          # no code at all
             Reply(status=429),                   # rate limited, then answered on retry
             Reply(good(), delay_s=0.5)]          # slow but fine (a duplicate of the first: deduplicated)

    srv = RecordedServer(scripted(impls))
    yield srv
    srv.close()


def cli_args(server, tmp_path, *extra):
    return ["optimize", "--workload", "gemm", "--m", "1", "--n", str(N), "--k", str(K), "--dtype", "fp32",
            "--models", "openai::test-model", "--api-base", server.api_base, "--budget", "8", "--beam-size", "1",
            "--iterations", "1", "--timing-ms", "30", "--no-cache", "--quiet", "--output-dir", str(tmp_path / "runs"),
            "--json", str(tmp_path / "r.json"), *extra]


def test_optimize_with_an_llm_through_the_cli(server, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMP_LLM_BACKOFF_S", "0.01")
    argv = ["optimize", "--workload", "gemm", "--m", "1", "--n", str(N), "--k", str(K), "--dtype", "fp32",
            "--models", "openai::test-model", "--api-base", server.api_base, "--budget", "9", "--beam-size", "1",
            "--plans", "2", "--impls", "3", "--iterations", "1", "--timing-ms", "30", "--no-cache", "--quiet",
            "--output-dir", str(tmp_path / "runs"), "--json", str(tmp_path / "r.json")]
    assert cli.main(argv) == 0
    row = json.loads((tmp_path / "r.json").read_text())
    assert row["correct"] and row["best_ms"] < row["naive_ms"]
    assert row["failures"].get("compile") == 1 and row["failures"].get("correctness") == 1
    run = next((tmp_path / "runs").iterdir())
    rejected = [json.loads(line) for line in (run / "llm" / "rejected.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejected] == ["no code block in the response"]
    best = json.loads((run / "result.json").read_text())
    assert best["best_id"].startswith("i1")  # the translation (seed0) was correct but scalar
    seed = json.loads(next(run.glob("iter-000/seed0/candidate.json")).read_text())
    assert seed["origin"] == "llm:openai::test-model" and seed["result"]["correct"]
    # a re-run reads every response back from the run directory: no new request reaches the server
    before = len(server.requests)
    (tmp_path / "r.json").unlink()
    assert cli.main(argv) == 0
    assert len(server.requests) == before
    assert json.loads((tmp_path / "r.json").read_text())["best_ms"] == row["best_ms"]


def test_missing_key_fails_before_any_work(monkeypatch, capsys):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    assert cli.main(["optimize", "--workload", "gemm", "--models", "anthropic::claude-x"]) == 2
    assert "ANTHROPIC_API_KEY" in capsys.readouterr().err


def test_repair_fixes_a_kernel_that_did_not_compile(tmp_path):
    broken = Reply(good().replace("out[n] = ", "out[n] = oops "))
    srv = RecordedServer(scripted([broken]))
    try:
        assert cli.main(cli_args(srv, tmp_path, "--plans", "1", "--impls", "1", "--repair", "--no-translate")) == 0
    finally:
        srv.close()
    row = json.loads((tmp_path / "r.json").read_text())
    assert row["failures"] == {"compile": 1} and row["best_id"] == "i1r00" and row["best_ms"] < row["naive_ms"]
    assert any("Fix the kernel" in r["messages"][0]["content"] and "error" in r["messages"][0]["content"]
               for r in srv.requests)


def test_skip_planning_asks_for_code_in_one_call(tmp_path):
    srv = RecordedServer(scripted([Reply("Menu item: [none]\nVectorize.\n" + good())]))
    try:
        assert cli.main(cli_args(srv, tmp_path, "--plans", "1", "--impls", "2", "--skip-planning", "--no-translate")) == 0
    finally:
        srv.close()
    prompts = [r["messages"][0]["content"] for r in srv.requests]
    assert prompts and not any("Propose ONE optimization plan" in p for p in prompts)
    assert all("give the complete new kernel" in p for p in prompts)
    assert json.loads((tmp_path / "r.json").read_text())["correct"]


def test_translation_prompt_carries_the_pytorch_reference():
    from autocomp_compile.agents.llm import reference_source, translate_prompt

    w = make_workload("mlp", "bf16", batch=1, hidden=64, intermediate=128)
    src = reference_source(w)
    assert "def _mlp_reference" in src and "def _linear_f32" in src  # with the helper it calls
    prompt = translate_prompt(PromptDocs.load("cpu"), w, src)
    assert prompt.index("# What to compute") < prompt.index("def _mlp_reference") < prompt.index("# Instruction")
    assert "## bf16" in prompt and "## Exp and SiLU" in prompt


def test_cuda_prompts_and_responses():
    from autocomp_compile.targets.cuda.target import CudaTarget

    target = CudaTarget()
    w = make_workload("gemm", "bf16", m=1, n=256, k=512)
    root = target.lower(w)  # code generation needs no GPU
    docs = PromptDocs.load("cuda")
    plan = plan_prompt(docs, w, root, "", "- [a] A: do a")
    order = ["# Target: NVIDIA GPU", "# CUDA reference", "# Example", "# The kernel to optimize",
             "# Optimization menu", "# Instruction", "# Rules"]
    positions = [plan.index(marker) for marker in order]
    assert positions == sorted(positions) and "## bf16" in plan
    assert plan.index("```cuda\n// autocomp-launch", positions[3]) < positions[4]  # the kernel, fenced as CUDA
    ok = "```cuda\n" + root.code + "```"
    assert extract_code(ok, "cuda").startswith("// autocomp-launch:")
    with pytest.raises(ResponseRejected, match="launch line"):
        extract_code("```cuda\nextern \"C\" __global__ void gemv() {}\n```", "cuda")
    with pytest.raises(ResponseRejected, match="no `extern"):
        extract_code('```cuda\n// autocomp-launch: {"kernels":[{"name":"k2","grid":[1,1,1],"block":[32,1,1],'
                     '"args":[]}]}\nextern "C" __global__ void gemv() {}\n```', "cuda")
    with pytest.raises(ResponseRejected, match="cudaMalloc"):
        extract_code("```cuda\n" + root.code.replace("float a = 0.0f;", "float a = 0.0f; cudaMalloc(0, 4);") + "```",
                     "cuda")


def test_apply_edits():
    from autocomp_compile.agents.llm import apply_edits

    code = "int a = 1;\nint b = 2;\nint c = 1;\n"
    assert apply_edits(code, "<<<<<<< OLD\nint b = 2;\n=======\nint b = 3;\n>>>>>>> NEW") == "int a = 1;\nint b = 3;\nint c = 1;\n"
    with pytest.raises(ResponseRejected, match="occurs 2 times"):
        apply_edits(code, "<<<<<<< OLD\n= 1;\n=======\n= 5;\n>>>>>>> NEW")
    with pytest.raises(ResponseRejected, match="occurs 0 times"):
        apply_edits(code, "<<<<<<< OLD\nint z;\n=======\nint y;\n>>>>>>> NEW")
    with pytest.raises(ResponseRejected, match="no <<<<<<< OLD"):
        apply_edits(code, "rewrite it all")


def test_edits_and_extra_menu_through_the_cli(tmp_path):
    root = CpuTarget().lower(make_workload("gemm", "fp32", m=1, n=N, k=K)).code.strip()
    body = extract_code(good()).strip()
    edit = Reply(f"<<<<<<< OLD\n{root}\n=======\n{body}\n>>>>>>> NEW")

    def script(body_, n):
        prompt = body_["messages"][0]["content"]
        if "List up to 5 further optimizations" in prompt:
            return Reply("- [x-tile] Tile the rows: keep x in L1.\nnot a menu line")
        if "Propose ONE optimization plan" in prompt:
            return Reply("Menu item: [x-tile]\nReplace the loops.")
        return edit

    srv = RecordedServer(script)
    try:
        argv = cli_args(srv, tmp_path, "--plans", "1", "--impls", "1", "--edits", "--extra-menu", "--no-translate",
                        "--dropout", "0")
        assert cli.main(argv) == 0
    finally:
        srv.close()
    plans = [r["messages"][0]["content"] for r in srv.requests if "Propose ONE" in r["messages"][0]["content"]]
    assert plans and "- [x-tile] Tile the rows" in plans[0]
    impl = [r["messages"][0]["content"] for r in srv.requests if "OLD" in r["messages"][0]["content"]]
    assert impl and "<<<<<<< OLD" in impl[0]
    assert json.loads((tmp_path / "r.json").read_text())["correct"]
    # The edit applied and its kernel passed (not whether it timed faster: a unit test on 2 shared cores)
    edited = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/iter-001/*/candidate.json")]
    assert [c["code"].strip() for c in edited] == [body] and edited[0]["result"]["correct"]


# ---------------------------------------------------------------- the proposer with a local fake completion


def fake_proposer(answer, tmp_path=None, **kw):
    """An LLMProposer over a fake completion function: `answer(prompt)` is the reply text (None: no choices)."""
    from types import SimpleNamespace as NS

    from autocomp_compile.agents.llm import LLMProposer
    from autocomp_compile.agents.llm_client import LLMClient

    prompts = []

    def completion(**kwargs):
        prompts.append(kwargs["messages"][0]["content"])
        text = answer(prompts[-1])
        if isinstance(text, Exception):
            raise text
        return NS(choices=[NS(message=NS(content=text))], usage=NS(prompt_tokens=1, completion_tokens=1))

    client = LLMClient(["openai::fake"], api_base="http://127.0.0.1:9/v1", completion_fn=completion, max_retries=0)
    proposer = LLMProposer(client, **kw)
    proposer.prompts = prompts
    return proposer


def gemm_root():
    target = CpuTarget(["scalar", "avx2"])
    w = make_workload("gemm", "fp32", m=1, n=N, k=K)
    return target, w, target.lower(w)


def test_each_attached_run_keeps_its_own_transcripts(tmp_path):
    proposer = fake_proposer(lambda p: "answer")
    for run in ("a", "b"):
        proposer.attach_run_dir(tmp_path / run)
        proposer._ask([("openai::fake", "the same prompt", "k")])
        assert len(list((tmp_path / run / "llm").glob("*.json"))) == 2  # the response and usage.json
    assert len(proposer.prompts) == 2
    proposer.attach_run_dir(tmp_path / "a")  # a re-run of the first: answered from its transcripts
    proposer._ask([("openai::fake", "the same prompt", "k")])
    assert len(proposer.prompts) == 2
    fixed = fake_proposer(lambda p: "answer", transcript_dir=tmp_path / "fixed")
    fixed.attach_run_dir(tmp_path / "c")
    assert fixed.transcript_dir == tmp_path / "fixed"


def test_usage_json_counts_its_own_directory_calls_across_runs(tmp_path):
    proposer = fake_proposer(lambda p: "answer")
    usage = lambda run: json.loads((tmp_path / run / "llm" / "usage.json").read_text())  # noqa: E731
    proposer.attach_run_dir(tmp_path / "a")
    proposer._ask([("openai::fake", "first", "k")])
    proposer.attach_run_dir(tmp_path / "b")  # the same client, another search (as in warm)
    proposer._ask([("openai::fake", "second", "k"), ("openai::fake", "third", "k")])
    assert usage("a")["calls"] == 1 and usage("b")["calls"] == 2 and usage("b")["per_model"]["openai::fake"]["calls"] == 2
    rerun = fake_proposer(lambda p: "answer")  # a re-run into the first directory, in a new process
    rerun.attach_run_dir(tmp_path / "a")
    rerun._ask([("openai::fake", "first", "k"), ("openai::fake", "fourth", "k")])  # one answered from the transcript
    assert usage("a")["calls"] == 2 and usage("a")["prompt_tokens"] == 2
    assert usage("a")["per_model"] == {"openai::fake": {"calls": 2, "prompt_tokens": 2, "completion_tokens": 2,
                                                        "cost_usd": 0.0}}


def test_a_failed_repair_is_recorded_against_the_kernel_it_repairs(tmp_path):
    target, w, root = gemm_root()
    proposer = fake_proposer(lambda p: "no code here", repair=True)
    broken = Candidate(id="i1-root-l0-0", parent_id="root", iteration=1, language="c", code="bad", plan="p",
                       origin="llm:openai::fake")
    broken.result = EvalResult(correct=False, stage="compile", message="error: oops")
    assert proposer.repair([broken], w, target, 2) == []
    assert [(r["parent"], r["stage"]) for r in proposer.rejected] == [("i1-root-l0-0", "repair")]


def test_an_unreadable_transcript_is_asked_again(tmp_path):
    proposer = fake_proposer(lambda p: "fresh", transcript_dir=tmp_path)
    path = proposer._path("openai::fake", "q", "k")
    for broken in ('{"model": "openai::fake", "prom', '{"model": "openai::fake"}', "[]"):
        path.write_text(broken)
        assert proposer._ask([("openai::fake", "q", "k")]) == ["fresh"]
        assert json.loads(path.read_text())["response"] == "fresh"
        path.unlink()
    assert proposer._ask([("openai::fake", "q", "k")]) == ["fresh"] and len(proposer.prompts) == 4
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_apply_edits_locates_every_old_in_the_parent():
    from autocomp_compile.agents.llm import apply_edits

    code = "a();\nb();\nc();\n"
    # the first NEW contains the second OLD: both still refer to the parent
    both = "<<<<<<< OLD\na();\n=======\nb();\na();\n>>>>>>> NEW\n<<<<<<< OLD\nb();\n=======\nB();\n>>>>>>> NEW"
    assert apply_edits(code, both) == "b();\na();\nB();\nc();\n"
    # an OLD that only exists in another edit's NEW is refused
    inserted = "<<<<<<< OLD\nc();\n=======\nc(); d();\n>>>>>>> NEW\n<<<<<<< OLD\nd();\n=======\ne();\n>>>>>>> NEW"
    with pytest.raises(ResponseRejected, match="edit 2: its OLD text occurs 0 times"):
        apply_edits(code, inserted)
    overlap = "<<<<<<< OLD\na();\nb();\n=======\nx\n>>>>>>> NEW\n<<<<<<< OLD\nb();\nc();\n=======\ny\n>>>>>>> NEW"
    with pytest.raises(ResponseRejected, match="overlap"):
        apply_edits(code, overlap)
    # edits given out of order are spliced at their own places
    reordered = "<<<<<<< OLD\nc();\n=======\nC();\n>>>>>>> NEW\n<<<<<<< OLD\na();\n=======\nA();\n>>>>>>> NEW"
    assert apply_edits(code, reordered) == "A();\nb();\nC();\n"


@pytest.mark.parametrize("kind, params", [("gemm", dict(m=1, n=256, k=512)), ("gemm", dict(m=64, n=256, k=512)),
                                          ("mlp", dict(batch=1, hidden=256, intermediate=512))])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cuda_prompts_carry_the_whole_reference(kind, params, dtype):
    from autocomp_compile.targets.cuda.target import CudaTarget

    w = make_workload(kind, dtype, **params)
    root = CudaTarget().lower(w)
    docs = PromptDocs.load("cuda")
    for prompt in (plan_prompt(docs, w, root, "", "- [a] A: do a"), implement_prompt(docs, w, root, "plan")):
        for section in ("## Memory", "## Warps", "## Launch", "## Programmatic dependent launch",
                        "## Prepacked weights and vector reductions"):
            assert section in prompt
        assert docs.isa in prompt


def test_an_empty_plan_is_rejected_not_implemented():
    target, w, root = gemm_root()
    proposer = fake_proposer(lambda p: "" if "Propose ONE" in p else good())
    out = proposer.propose(root, w, target, "", n_plans=2, n_impls=2, rng=__import__("random").Random(0), iteration=1)
    assert out == [] and len(proposer.prompts) == 2
    assert [r["reason"] for r in proposer.rejected] == ["empty plan", "empty plan"]


def test_a_failed_extra_menu_call_is_recorded():
    target, w, root = gemm_root()
    proposer = fake_proposer(lambda p: ValueError("400 context length exceeded") if "List up to 5" in p
                             else "Menu item: [none]\nplan" if "Propose ONE" in p else good(), extra_menu=True)
    out = proposer.propose(root, w, target, "", n_plans=1, n_impls=1, rng=__import__("random").Random(0), iteration=1)
    assert len(out) == 1
    assert proposer.rejected[0]["stage"] == "menu" and "context length" in proposer.rejected[0]["reason"]


@pytest.mark.parametrize("line", ["Menu item: [{}]", "**Menu item:** [{}]", "**Menu item: [{}]**", "Menu item: [`{}`]",
                                  "Menu item: [ {} ]"])
def test_menu_item_forms(line):
    assert menu_item_of(line.format("cpu-omp") + "\n...", ["cpu-omp"]) == "cpu-omp"


def test_an_extra_menu_item_picked_by_the_plan_is_recorded():
    target, w, root = gemm_root()
    proposer = fake_proposer(lambda p: "- [x-tile] Tile the rows: keep x in L1." if "List up to 5" in p
                             else "**Menu item:** [`x-tile`]\nTile." if "Propose ONE" in p else good(), extra_menu=True,
                             dropout=0.0)
    (child,) = proposer.propose(root, w, target, "", n_plans=1, n_impls=1, rng=__import__("random").Random(0),
                                iteration=1)
    assert child.menu_ids[-1] == "x-tile"
