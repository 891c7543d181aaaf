"""What a compiled CPU kernel reaches outside itself: only the math, memory and OpenMP runtime functions that
kernels need, and no system-call instruction.

Checked on the shared object, after the preprocessor and the compiler have run, so that names a source hides
from the text checks of agents/llm.py (token pasting such as `CAT(sys, tem)`, line continuations) are seen
as what they became: an undefined dynamic symbol or a `syscall` instruction.
"""
from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

# Symbols every shared object built by gcc refers to (weak, from the C runtime's start files).
# abort and failed assert()s only end the isolated worker process (a crash of that candidate).
_RUNTIME = {"__gmon_start__", "__cxa_finalize", "_ITM_registerTMCloneTable", "_ITM_deregisterTMCloneTable",
            "__stack_chk_fail", "abort", "__assert_fail"}
_MEMORY = {"malloc", "calloc", "realloc", "free", "aligned_alloc", "posix_memalign", "memcpy", "memmove", "memset",
           "memcmp", "__memcpy_chk", "__memset_chk", "__memmove_chk"}
_MATH = {f"{name}{suffix}" for suffix in ("", "f") for name in (
    "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "pow", "sqrt", "cbrt", "rsqrt", "tanh", "erf", "erfc",
    "sin", "cos", "tan", "sinh", "cosh", "fabs", "fmax", "fmin", "fma", "floor", "ceil", "round", "trunc", "rint",
    "lrint", "lround", "nearbyint", "fmod", "remainder", "ldexp", "frexp", "sincos", "hypot", "atan", "atan2")}
# OpenMP: parallel regions, loops, barriers, reductions, thread ids (not omp_set_*: the process's thread count
# is the harness's, see evaluation/job.py).
_OPENMP = re.compile(r"GOMP_\w+|omp_get_\w+|omp_in_parallel")
# The old split entry points open a thread team in one call and close it in another: a kernel could return with
# the team open (torch then runs on one thread) or keep it computing after it returned. `#pragma omp parallel`
# compiles to GOMP_parallel, which returns only when the region is done.
_OPENMP_SPLIT = re.compile(r"GOMP_parallel(_loop_\w+|_sections)?_start|GOMP_parallel_end")
_SYSCALL = re.compile(r"\t(syscall|sysenter|int\s+\$0x80)\b")


def undefined_symbols(so_path: Path) -> list[str] | None:
    """The dynamic symbols `so_path` leaves for the loader to resolve, or None when `nm` is not installed."""
    nm = shutil.which("nm")
    if nm is None:
        return None
    out = subprocess.run([nm, "-D", "--undefined-only", "--format=posix", str(so_path)], capture_output=True,
                         text=True, check=False).stdout
    return sorted({line.split()[0].split("@")[0] for line in out.splitlines() if line.strip()})


def forbidden_linkage(so_path: Path) -> str:
    """Why the kernel in `so_path` may not run in the harness (it calls outside the allowed runtime functions or
    makes system calls itself), or "" when it may. Unchecked parts (no `nm`, no `objdump`, not x86) pass."""
    symbols = undefined_symbols(so_path)
    disallowed = [s for s in symbols or [] if (s not in _RUNTIME | _MEMORY | _MATH and not _OPENMP.fullmatch(s))
                  or _OPENMP_SPLIT.fullmatch(s)]
    if disallowed:
        return (f"the compiled kernel calls {', '.join(disallowed)}: kernels may call only math, memory and OpenMP "
                f"runtime functions (rules)")
    objdump = shutil.which("objdump")
    if objdump and platform.machine() in ("x86_64", "AMD64", "i686"):
        code = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(so_path)], capture_output=True, text=True,
                              check=False).stdout
        found = _SYSCALL.search(code)
        if found:
            return f"the compiled kernel contains a `{found.group(1)}` instruction: kernels make no system calls (rules)"
    return ""
