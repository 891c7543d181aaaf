"""The parser's guard against calls outside the kernel: aliases and widened names are refused, and every
kernel the CPU and CUDA code generators write for the test workloads still passes."""
from __future__ import annotations

import pytest

from autocomp_compile.agents.llm import ResponseRejected, extract_code
from autocomp_compile.targets.cpu import codegen as cpu_codegen
from autocomp_compile.targets.cpu.isa import ISA_ORDER
from autocomp_compile.targets.cuda import codegen as cuda_codegen
from tests.helpers import SMALL, small

C_HEAD = "```c\n#include <stdint.h>\nvoid autocomp_kernel(void **t, const int64_t *dims) {\n"
CUDA_LAUNCH = ('// autocomp-launch: {"kernels":[{"name":"k","grid":[1,1,1],"block":[32,1,1],"args":["out"]}],'
               '"scratch":{}}\n')


@pytest.mark.parametrize("body", [
    'system("true");', '#define RUN system\n RUN("true");', '(system)("true");', 'void *f = (dlsym)(0, "x");',
    'execl("/bin/sh", "sh", (char *)0);', 'void *f = fopen64("/etc/passwd", "r");', 'freopen("/dev/null", "w", 0);',
    'thrd_create(0, 0, 0);', 'Py_BuildValue("");', 'void *p = PyRun_SimpleString;', 'int fd = open("/x", 0);',
    'syscall(59, 0, 0, 0);', 'popen("ls", "r");',
])
def test_calls_outside_the_kernel_are_refused_under_any_spelling(body):
    with pytest.raises(ResponseRejected, match="uses"):
        extract_code(C_HEAD + body + "\n}\n```")


def test_names_in_comments_do_not_count():
    ok = C_HEAD + "/* no system() or open() here */ // Python does not run\n}\n```"
    assert "autocomp_kernel" in extract_code(ok)


@pytest.mark.parametrize("body", ["float *p = (float *)malloc(64); free(p);", "float *p = new float[16]; delete[] p;"])
def test_cuda_device_allocation_is_refused(body):
    src = CUDA_LAUNCH + 'extern "C" __global__ void k(float *out) { ' + body + " }\n"
    with pytest.raises(ResponseRejected, match="malloc|new"):
        extract_code("```cuda\n" + src + "```", "cuda")


def _cpu_corpus() -> list[tuple[str, str]]:
    from tests.targets.cpu.test_codegen import VARIANTS

    out = []
    for wname in SMALL:
        for dtype in ("bf16", "fp32"):
            w = small(wname, dtype)
            for isa in ISA_ORDER:
                for name, variant in VARIANTS[cpu_codegen.family(w.kind)].items():
                    knobs = cpu_codegen.legalize(w, {**variant, "isa": isa}, list(ISA_ORDER))
                    out.append((f"{wname}-{dtype}-{isa}-{name}", cpu_codegen.generate(w, knobs)))
    return out


def _cuda_corpus() -> list[tuple[str, str]]:
    from tests.targets.cuda.test_cuda_target import CASES, _source

    out = [(f"{name}-{i}", _source(name, i)[2]) for name, i in CASES]
    for wname in SMALL:
        for dtype in ("bf16", "fp32"):
            w = small(wname, dtype)
            out.append((f"{wname}-{dtype}-naive", cuda_codegen.generate(w, cuda_codegen.legalize(w, {}))))
    return out


def test_every_generated_kernel_passes_the_guard():
    for name, code in _cpu_corpus():
        assert extract_code("```c\n" + code + "```", "c"), name
    for name, code in _cuda_corpus():
        assert extract_code("```cuda\n" + code + "```", "cuda"), name


KERNEL = "void autocomp_kernel(void **t, const int64_t *dims) {\n  float *out = (float *)t[2];\n  out[0] = 1.0f;\n}"


@pytest.mark.parametrize("signature", [
    "void autocomp_kernel(void ** restrict t, const int64_t * restrict dims)",
    "void autocomp_kernel(void **__restrict__ t, const int64_t *__restrict__ dims)",
    "void autocomp_kernel(void *t[], const int64_t dims[])",
    "void autocomp_kernel(void **t, int64_t const *dims)",
])
def test_entry_points_in_any_spelling_the_compiler_takes_are_found(signature):
    code = KERNEL.replace("void autocomp_kernel(void **t, const int64_t *dims)", signature)
    assert extract_code(f"```c\n{code}\n```").startswith(signature)


def test_a_prototype_after_the_kernel_is_not_taken_for_it():
    answer = f"```c\n{KERNEL}\n```\nIts signature:\n```c\nvoid autocomp_kernel(void **t, const int64_t *dims);\n```"
    assert extract_code(answer).strip() == KERNEL


def test_a_truncated_answer_is_refused_instead_of_returning_the_quoted_kernel():
    answer = f"The current kernel:\n```c\n{KERNEL}\n```\nThe new one:\n```c\n{KERNEL[:40]}"
    with pytest.raises(ResponseRejected, match="unclosed code block"):
        extract_code(answer)
