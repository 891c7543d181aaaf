import pytest

from autocomp_compile.search.candidate import Candidate, normalized_code_hash
from autocomp_compile.targets.base import EvalResult


def _nki(code: str) -> Candidate:
    return Candidate(id="c", parent_id=None, iteration=0, language="nki", code=code)


def test_python_kernels_keep_floor_division_and_indentation_in_their_hash():
    base = "def f(K):\n    x = K // 128  # tile\n    return x\n"
    assert _nki(base).code_hash != _nki(base.replace("// 128", "// 64")).code_hash
    assert _nki(base).code_hash != _nki("def f(K):\n    x = K // 128\nreturn x\n").code_hash
    assert _nki(base).code_hash == _nki("def f(K):\n\n    x = K // 128\n    return x   \n").code_hash


def test_c_kernels_ignore_comments_and_whitespace():
    assert normalized_code_hash("int a; // x\n  int b; /* y */", "c") == normalized_code_hash("int a;\nint b;", "c")
    assert normalized_code_hash("x = K / 2;", "cuda") != normalized_code_hash("x = K / 4;", "cuda")


def test_python_code_that_does_not_tokenize_still_hashes():
    broken = "def f(:\n  x = (\n"
    assert normalized_code_hash(broken, "nki") == normalized_code_hash(broken + "\n\n", "nki")
    assert normalized_code_hash(broken, "nki") != normalized_code_hash(broken.replace("x", "y"), "nki")


@pytest.mark.parametrize("latency", [float("nan"), 0.0, -2.0, None])
def test_a_latency_no_kernel_can_have_ranks_last(latency):
    c = Candidate(id="c", parent_id=None, iteration=0, language="c", code="x")
    c.result = EvalResult(correct=True, stage="ok", latency_ms=latency)
    assert c.latency_ms == float("inf")
