"""targets/cpu/linkage.py: the compiled kernel's outside calls, checked after the preprocessor."""
from __future__ import annotations

import platform

import pytest

from autocomp_compile.agents.llm import extract_code
from autocomp_compile.targets.cpu.compiler import build
from tests.helpers import hand_gemm

HIDDEN = "#include <stdlib.h>\n#include <unistd.h>\n#include <omp.h>\n#define CAT(a, b) a##b\n"


@pytest.mark.parametrize("call, name", [("CAT(sys, tem)(\"true\");", "system"), ("CAT(for, k)();", "fork"),
                                        ("CAT(get, pid)();", "getpid"),
                                        ("CAT(omp_set_num, _threads)(1);", "omp_set_num_threads")])
def test_a_call_hidden_by_token_pasting_passes_the_text_check_but_not_the_build(tmp_path, call, name):
    code = HIDDEN + hand_gemm(after=call)
    assert extract_code(f"```c\n{code}\n```")  # the name never appears in the source
    b = build(code, "scalar", tmp_path)
    assert not b.ok and f"calls {name}" in b.log and b.so_path is None
    assert not list(tmp_path.glob("*.so"))  # not stored: the same code is refused on every build


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 system-call instruction")
def test_a_system_call_instruction_is_refused(tmp_path):
    code = hand_gemm(after='CAT(__as, m__) volatile("syscall" ::: "rcx", "r11", "memory");')
    b = build("#define CAT(a, b) a##b\n" + code, "scalar", tmp_path)
    assert not b.ok and "`syscall` instruction" in b.log


def test_math_memory_and_openmp_calls_are_allowed(tmp_path):
    code = "#include <math.h>\n#include <string.h>\n#include <stdlib.h>\n#include <omp.h>\n" + hand_gemm(
        before="float *tmp = malloc(4 * sizeof(float)); memset(tmp, 0, 4 * sizeof(float));",
        store="out[m * N + n] = s + 0.0f * expf(tmp[0]) * sqrtf(1.0f) * (float)omp_get_num_threads();",
        after="free(tmp);")
    assert build(code, "scalar", tmp_path).ok
