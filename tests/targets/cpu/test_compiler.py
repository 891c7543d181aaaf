"""Building kernels: object names that a shared build folder cannot confuse, logs that keep the first error."""
from __future__ import annotations

import pytest

from autocomp_compile.targets.cpu import compiler

pytestmark = pytest.mark.skipif(compiler.compiler() is None, reason="no C compiler on this machine")

CODE = "int add_one(int x) { return x + 1; }\n"


def test_objects_are_named_for_what_march_native_means_here(tmp_path, monkeypatch):
    here = compiler.build(CODE, "scalar", tmp_path)
    assert here.ok and compiler.build(CODE, "scalar", tmp_path).so_path == here.so_path  # reused
    # Another host sharing the folder (an AVX-512 node, say) resolves -march=native to other options.
    monkeypatch.setattr(compiler, "native_target", lambda: "-march= sapphirerapids")
    other = compiler.build(CODE, "scalar", tmp_path)
    assert other.ok and other.so_path != here.so_path


def test_a_failed_build_keeps_its_first_error(tmp_path):
    broken = "".join(f"undeclared_type_{i} v{i};\n" for i in range(400))
    result = compiler.build(broken, "scalar", tmp_path)
    assert not result.ok and "undeclared_type_0" in result.log


def test_long_compiler_output_keeps_head_and_tail():
    text = "first error\n" + "x" * 10_000 + "\nlast line"
    log = compiler._log(text)
    assert log.startswith("first error") and log.endswith("last line") and len(log) < 4100
    assert compiler._log("short") == "short"


def test_generated_kernels_build_with_the_precompiled_standard_headers(tmp_path, monkeypatch):
    from autocomp_compile.targets.cpu import codegen
    from tests.helpers import small

    if "clang" in compiler.compiler_version().lower():
        pytest.skip("precompiled headers are used with gcc only")
    w = small("gemm", "bf16")
    code = codegen.generate(w, codegen.naive_knobs(w))
    assert compiler.starts_with_standard_include(code)
    header = compiler.precompiled_prelude("scalar", tmp_path)
    assert header is not None and header.with_name("prelude.h.gch").exists()
    assert compiler.precompiled_prelude("scalar", tmp_path) == header  # built once
    # gcc -H marks a precompiled header it reads with "!" (with "x" one it found unusable)
    monkeypatch.setattr(compiler, "cflags", lambda isa, real=compiler.cflags: [*real(isa), "-H"])
    result = compiler.build(code, "scalar", tmp_path / "with-H")
    assert result.ok
    assert f"! {compiler.precompiled_prelude('scalar', tmp_path / 'with-H')}.gch" in result.log


def test_one_precompiled_prelude_serves_every_build_folder_of_the_process(tmp_path):
    first = compiler.precompiled_prelude("scalar", tmp_path / "a")
    if first is None:
        pytest.skip("no precompiled headers with this compiler")
    assert compiler.precompiled_prelude("scalar", tmp_path / "b") == first
    assert not (tmp_path / "b" / "prelude").exists()
    first.with_name("prelude.h.gch").unlink()  # gone (a deleted folder): built again where asked
    again = compiler.precompiled_prelude("scalar", tmp_path / "b")
    assert again is not None and again.is_relative_to(tmp_path / "b") and again.with_name("prelude.h.gch").exists()


def test_code_that_defines_macros_before_its_includes_builds_without_them(tmp_path):
    gnu = "#define _GNU_SOURCE\n#include <stdlib.h>\n#include <math.h>\nfloat f(float x) { return fabsf(x); }\n"
    assert not compiler.starts_with_standard_include(gnu)
    assert compiler.starts_with_standard_include("/* a comment */\n#include <stdint.h>\nint x;\n")
    assert not compiler.starts_with_standard_include("#include \"mine.h\"\n")
    assert compiler.build(gnu, "scalar", tmp_path).ok
    assert not (tmp_path / "prelude").exists()  # nothing precompiled for it
