"""Compile generated C kernels into shared objects with the system C compiler."""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from autocomp_compile.targets.cpu.isa import ISA_CFLAGS
from autocomp_compile.targets.cpu.linkage import forbidden_linkage


@dataclass
class BuildResult:
    ok: bool
    so_path: Path | None
    seconds: float
    log: str


def compiler() -> str | None:
    """The C compiler to use: $CC, else gcc, else cc."""
    for name in (os.environ.get("CC"), "gcc", "cc"):
        if name and shutil.which(name):
            return name
    return None


@functools.lru_cache(maxsize=1)
def compiler_version() -> str:
    cc = compiler()
    if cc is None:
        return "none"
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0].strip() if out else cc


@functools.lru_cache(maxsize=1)
def native_target() -> str:
    """What `-march=native` means on this host (the compiler's resolved target options), for object names:
    a build folder shared between hosts must not hand one host another's instructions."""
    cc = compiler()
    if cc is None:
        return "none"
    out = subprocess.run([cc, "-march=native", "-Q", "--help=target"], capture_output=True, text=True, check=False)
    return out.stdout


def cflags(isa: str) -> list[str]:
    return ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11", *ISA_CFLAGS[isa]]


# The standard headers generated kernels include, parsed once per compiler, flags and host into a precompiled
# header (gcc's .gch): parsing immintrin.h is ~90% of a kernel's build otherwise (0.7-1.0 s here).
_PRELUDE_HEADERS = ("stdint.h", "stdlib.h", "string.h", "math.h", "omp.h")
_VECTOR_HEADERS = ("immintrin.h",)
_DIRECTIVE = re.compile(r"^[ \t]*#[ \t]*(\w+)[ \t]*(\S*)", re.M)
_prelude_lock = threading.Lock()
_prelude_failed: set[str] = set()  # by hash: it would fail again in any build folder
_prelude_built: dict[str, Path] = {}  # by hash: one built in this process serves every build folder


def starts_with_standard_include(code: str) -> bool:
    """Whether the first preprocessor directive of `code` includes one of the prelude's standard headers: then
    no macro of its own precedes them, and including them all first changes nothing."""
    first = _DIRECTIVE.search(code)
    return first is not None and first.group(1) == "include" and \
        first.group(2) in {f"<{h}>" for h in _PRELUDE_HEADERS + _VECTOR_HEADERS}


def precompiled_prelude(isa: str, build_dir: Path) -> Path | None:
    """`build_dir/prelude/<isa>-<hash>/prelude.h`, whose precompiled form (`prelude.h.gch` beside it) gcc reads
    instead of parsing the standard headers, when a kernel is built with `-include` of it; built on first use
    (~1.5 s), and the one this process built first (in any build folder) while it exists. None where it cannot
    be (no compiler, clang, a failed build)."""
    cc = compiler()
    if cc is None or "clang" in compiler_version().lower():
        return None
    flags = [f for f in cflags(isa) if f != "-shared"]
    headers = _PRELUDE_HEADERS + (_VECTOR_HEADERS if isa != "scalar" else ())
    text = "".join(f"#include <{h}>\n" for h in headers)
    digest = hashlib.sha256((text + " ".join(flags) + compiler_version() + native_target()).encode()).hexdigest()[:16]
    header = build_dir / "prelude" / f"{isa}-{digest}" / "prelude.h"
    gch = header.with_name("prelude.h.gch")
    with _prelude_lock:
        earlier = _prelude_built.get(digest)
        if earlier is not None and earlier.with_name("prelude.h.gch").exists():
            return earlier
        if gch.exists():
            _prelude_built[digest] = header
            return header
        if digest in _prelude_failed:
            return None
        header.parent.mkdir(parents=True, exist_ok=True)
        header.write_text(text)
        tmp = gch.with_name(f"prelude.h.gch.{os.getpid()}.tmp")
        try:
            proc = subprocess.run([cc, *flags, "-x", "c-header", str(header), "-o", str(tmp)], capture_output=True,
                                  text=True, timeout=120, check=False)
        except subprocess.TimeoutExpired:
            proc = None
        if proc is None or proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            _prelude_failed.add(digest)
            return None
        os.replace(tmp, gch)  # atomic: another process building the same one never sees a partial file
        _prelude_built[digest] = header
        return header


def _log(text: str, limit: int = 4000) -> str:
    """The compiler's output, its head kept first (where the root-cause error is) and its tail after."""
    if len(text) <= limit:
        return text
    return text[: limit * 3 // 4] + "\n[...]\n" + text[-limit // 4:]


def build(code: str, isa: str, build_dir: Path, timeout_s: float = 60.0) -> BuildResult:
    """Compile `code` to `build_dir/<hash>.so`; reuses an existing object for identical code and flags."""
    cc = compiler()
    if cc is None:
        return BuildResult(False, None, 0.0, "no C compiler found: install gcc (apt install gcc) or set $CC")
    flags = cflags(isa)
    digest = hashlib.sha256((code + " ".join(flags) + compiler_version() + native_target()).encode()).hexdigest()[:20]
    build_dir.mkdir(parents=True, exist_ok=True)
    so_path = build_dir / f"k_{digest}.so"
    if so_path.exists():
        return BuildResult(True, so_path, 0.0, "")
    src = build_dir / f"k_{digest}.c"
    src.write_text(code)
    tmp = so_path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")  # unique per builder thread
    prelude = precompiled_prelude(isa, build_dir) if starts_with_standard_include(code) else None
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [cc, *flags, *(["-include", str(prelude)] if prelude else []), str(src), "-o", str(tmp), "-lm"],
            capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return BuildResult(False, None, time.perf_counter() - start, f"compiler timed out after {timeout_s:.0f} s")
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        return BuildResult(False, None, seconds, _log(proc.stderr or proc.stdout))
    forbidden = forbidden_linkage(tmp)
    if forbidden:  # never stored under the code's hash: the same code is refused again on every build
        tmp.unlink(missing_ok=True)
        return BuildResult(False, None, seconds, forbidden)
    os.replace(tmp, so_path)  # atomic: concurrent builders of the same code never see a partial file
    return BuildResult(True, so_path, seconds, _log(proc.stderr, 2000))
