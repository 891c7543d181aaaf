"""Which schedules the GPU MLP breakdown (benchmarks/device/mlp_breakdown.py) times, checked without a GPU."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "device" / "mlp_breakdown.py"
_spec = importlib.util.spec_from_file_location("mlp_breakdown", _PATH)
mlp_breakdown = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mlp_breakdown)

ROWS = [
    {"family": "streaming", "schedule": {"down_t": True, "warps": 4, "chunk": 32}, "correct": True, "ms": 0.030},
    {"family": "streaming", "schedule": {"down_t": True, "warps": 8, "chunk": 16}, "correct": False, "ms": 0.010},
    {"family": "streaming", "schedule": {"down_t": True, "warps": 2, "chunk": 64}, "correct": True, "ms": 0.031},
    {"family": "two_kernel", "schedule": {"fuse": True, "warps": 8, "unroll": 4}, "correct": True, "ms": 0.045},
    {"family": "split_k", "schedule": {"fuse_down": True, "chunk": 32}, "correct": True, "ms": 0.020},
    {"family": "two_kernel", "schedule": {"fuse": True, "warps": 16}, "error": "build failed"},
]


def test_the_sweeps_fastest_correct_row_of_each_family_is_timed(tmp_path):
    sweep = tmp_path / "mlp_sweep.json"
    sweep.write_text(json.dumps({"rows": ROWS}))
    knobs, streaming = mlp_breakdown.schedules(str(sweep), None, None)
    assert knobs == {"naive": False, "vec": True, "fuse": True, "warps": 8, "unroll": 4}
    assert streaming == {"naive": False, "vec": True, "down_t": True, "warps": 4, "chunk": 32}  # not the wrong one


def test_explicit_schedules_win_and_a_missing_sweep_keeps_the_defaults(tmp_path):
    sweep = tmp_path / "mlp_sweep.json"
    sweep.write_text(json.dumps({"rows": ROWS[:3]}))  # no two-kernel row
    knobs, streaming = mlp_breakdown.schedules(str(sweep), None, '{"down_t": true, "warps": 2}')
    assert knobs == mlp_breakdown.SWEEP_BEST and streaming == {"down_t": True, "warps": 2}
    assert mlp_breakdown.schedules(str(tmp_path / "absent.json"), None, None) == (
        mlp_breakdown.SWEEP_BEST, mlp_breakdown.STREAMING)
