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
