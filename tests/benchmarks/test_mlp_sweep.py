"""The GPU MLP sweep's schedule grids (benchmarks/device/mlp_sweep.py): staged search logic and legality,
checked here without a GPU."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from autocomp_compile import make_workload
from autocomp_compile.targets.cuda import codegen

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "device" / "mlp_sweep.py"
_spec = importlib.util.spec_from_file_location("mlp_sweep", _PATH)
mlp_sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mlp_sweep)

MLP = make_workload("mlp", "bf16", batch=1, hidden=2048, intermediate=8192)


def test_two_kernel_stages_keep_the_best_of_each_stage():
    measured = []

    def fake_measure(family, schedule):
        # fastest: 8 gate/up warps, unroll 8; down with 16 warps split 8 ways; pdl on
        ms = (abs(schedule["warps"] - 8) + abs(schedule["unroll"] - 8) + abs(schedule["down_warps"] - 16)
              + abs(schedule["down_ksplit"] - 8) + (0 if schedule.get("pdl") else 1)) / 100 + 0.03
        measured.append(schedule)
        return {"family": family, "schedule": schedule, "correct": True, "ms": ms}

    rows = list(mlp_sweep.two_kernel_stages(fake_measure))
    assert len(rows) == len(measured) < 60
    best = mlp_sweep.best_row(rows)["schedule"]
    assert (best["warps"], best["unroll"], best["down_warps"], best["down_ksplit"], best["pdl"]) == (8, 8, 16, 8, True)
    # the down stage starts from the best gate/up schedule, the switches from the best down schedule
    assert all(s["warps"] == 8 and s["unroll"] == 8 for s in measured[12:])
    assert all(s["down_warps"] == 16 and s["down_ksplit"] == 8 for s in measured[-8:])


def test_a_stage_without_a_correct_schedule_falls_back_to_a_default():
    rows = list(mlp_sweep.two_kernel_stages(lambda f, s: {"family": f, "schedule": s, "correct": False, "ms": 1.0}))
    assert rows and mlp_sweep.best_row(rows) is None


def test_every_grid_point_is_a_legal_schedule_of_its_family():
    grids = {"split_k": mlp_sweep.split_k_grid(), "persistent": mlp_sweep.persistent_grid(),
             "two_kernel": list(mlp_sweep.two_kernel_stages(lambda f, s: {"schedule": s})),
             "streaming": mlp_sweep.streaming_grid()}
    for family, points in grids.items():
        for p in points:
            s = p.get("schedule", p)
            k = codegen.legalize(MLP, dict(naive=False, vec=True, **s))
            assert k["fuse_down"] == (family == "split_k") and k["persistent"] == (family == "persistent"), s
            assert k["down_t"] == (family == "streaming"), s
            for name, value in s.items():
                assert k[name] == value, (family, name, s, k[name])  # the grid asks for what it gets


def test_a_row_whose_timing_failed_is_never_the_best():
    rows = [{"family": "streaming", "schedule": {}, "correct": True, "error": "CudaKernelError: launch failed"},
            {"family": "streaming", "schedule": {"warps": 4}, "correct": True, "ms": 0.03}]
    assert mlp_sweep.best_row(rows) is rows[1]
