"""Compile CUDA sources to cubin with NVRTC (cuda-python bindings), or with nvcc when they are missing."""
from __future__ import annotations

import functools
import importlib
import hashlib
import os
import shutil
import subprocess
import threading
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class CudaBuild:
    ok: bool
    cubin_path: Path | None
    seconds: float
    log: str
    compiler: str


def nvrtc_available() -> bool:
    try:
        importlib.import_module("cuda.bindings.nvrtc")
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def nvrtc_version() -> str:
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    return f"nvrtc {major}.{minor}"


def _nvrtc_compile(source: str, arch: str) -> tuple[bytes | None, str]:
    from cuda.bindings import nvrtc

    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"kernel.cu", 0, [], [])
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return None, f"nvrtcCreateProgram: {err}"
    try:
        opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"--use_fast_math"]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        text = log.decode(errors="replace").strip("\x00 \n")
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            return None, text or str(err)
        _, size = nvrtc.nvrtcGetCUBINSize(prog)
        cubin = b" " * size
        nvrtc.nvrtcGetCUBIN(prog, cubin)
        return cubin, text
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _nvcc_compile(source: str, arch: str, timeout_s: float) -> tuple[bytes | None, str]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "neither NVRTC (pip install 'autocomp-compile[cuda]') nor nvcc is available"
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "kernel.cu", Path(tmp) / "kernel.cubin"
        src.write_text(source)
        proc = subprocess.run(
            [nvcc, "-cubin", f"-arch={arch}", "-O3", "-std=c++17", str(src), "-o", str(out)],
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )
        if proc.returncode != 0:
            return None, (proc.stderr or proc.stdout)[-4000:]
        return out.read_bytes(), proc.stderr[-2000:]


def build(source: str, arch: str, build_dir: Path, timeout_s: float = 120.0) -> CudaBuild:
    """Compile `source` for `arch` (e.g. "sm_90") to `build_dir/<hash>.cubin`, reusing an identical build."""
    compiler = nvrtc_version() if nvrtc_available() else "nvcc"
    digest = hashlib.sha256(f"{source}{arch}{compiler}".encode()).hexdigest()[:20]
    build_dir.mkdir(parents=True, exist_ok=True)
    path = build_dir / f"k_{digest}.cubin"
    if path.exists():
        return CudaBuild(True, path, 0.0, "", compiler)
    start = time.perf_counter()
    try:
        cubin, log = _nvrtc_compile(source, arch) if nvrtc_available() else _nvcc_compile(source, arch, timeout_s)
    except subprocess.TimeoutExpired:
        return CudaBuild(False, None, time.perf_counter() - start, f"nvcc timed out after {timeout_s:.0f} s", compiler)
    seconds = time.perf_counter() - start
    if cubin is None:
        return CudaBuild(False, None, seconds, log, compiler)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")  # unique per builder thread
    tmp.write_bytes(cubin)
    os.replace(tmp, path)
    return CudaBuild(True, path, seconds, log, compiler)
