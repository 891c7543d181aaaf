"""Where autocomp-compile keeps its files: `$AUTOCOMP_CACHE_DIR`, by default ~/.cache/autocomp_compile."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("AUTOCOMP_CACHE_DIR") or Path.home() / ".cache" / "autocomp_compile")


def build_dir(target: str) -> Path:
    """Compiled kernels of one target (shared objects, cubins), named by a hash of code and flags."""
    return cache_dir() / "build" / target
