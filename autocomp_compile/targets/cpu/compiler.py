"""Compile generated C kernels into shared objects with the system C compiler."""
from __future__ import annotations

import functools
import hashlib
import os
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
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [cc, *flags, str(src), "-o", str(tmp), "-lm"], capture_output=True, text=True, timeout=timeout_s, check=False
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
