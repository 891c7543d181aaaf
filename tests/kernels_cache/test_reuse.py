"""The cache inside optimize(): hits skip the search, misses replay similar workloads' schedules, winners
are stored; and the CLI's warm and cache commands."""
from __future__ import annotations

import json

from autocomp_compile import EvalSettings, SearchConfig, make_workload, optimize
from autocomp_compile import cli
from autocomp_compile.kernels_cache import KernelCache

FAST = EvalSettings(timing_budget_ms=20, correctness_sets=3)


def test_hit_skips_search_and_miss_reuses_nearest(tmp_path):
    cache = KernelCache(tmp_path / "k.sqlite")
    a = make_workload("gemm", "bf16", m=1, n=256, k=512)
    b = make_workload("gemm", "bf16", m=1, n=512, k=256)
    first = optimize(a, "cpu", SearchConfig(budget=8), FAST, tmp_path / "out", cache=cache)
    assert first.best is not None and not first.from_cache and first.reused == []
    assert cache.get(__import__("autocomp_compile").get_target("cpu"), a).code == first.best.code

    again = optimize(a, "cpu", SearchConfig(budget=8), FAST, tmp_path / "out", cache=cache)
    assert again.from_cache and again.candidates_evaluated == 0 and again.best.code == first.best.code
    assert again.best.latency_ms == first.best.latency_ms

    other = optimize(b, "cpu", SearchConfig(budget=8), FAST, tmp_path / "out", cache=cache)
    assert other.reused == [first.cache_key]
    seed = next(c for c in other.candidates if c.origin.startswith("reuse:"))
    assert seed.id == "seed0" and seed.correct and seed.menu_ids == first.best.menu_ids
    assert seed.knobs == first.best.knobs  # the schedule, re-legalised for the new shape (no change needed here)
    result = json.loads(next((tmp_path / "out").glob("gemm-*/result.json")).read_text())
    assert "reused" in result


def test_a_gemm_schedule_seeds_an_mlp_search_on_the_cpu(tmp_path):
    """The GEMV family shares one schedule space: a cached GEMM's packed panels start an MLP's search."""
    import pytest

    from autocomp_compile import get_target
    from autocomp_compile.search.candidate import Candidate
    from autocomp_compile.targets.base import EvalResult

    cpu = get_target("cpu")
    if cpu.isas[-1] == "scalar":
        pytest.skip("packed panels need a vector ISA; this host has none")
    cache = KernelCache(tmp_path / "k.sqlite")
    gemm = make_workload("gemm", "bf16", m=12, n=40, k=64)
    knobs = cpu.legalize(gemm, {"isa": cpu.isas[-1], "pack": 1, "pack_rows": 4, "threads": "static"})
    done = Candidate(id="c1", parent_id="root", iteration=3, language="c", code=cpu.generate(gemm, knobs),
                     menu_ids=["vectorize", "pack_panels"], knobs=knobs)
    done.result = EvalResult(correct=True, stage="ok", latency_ms=0.01, baseline_ms=0.02, runs=10)
    assert cache.put(cpu, gemm, done)
    mlp = make_workload("mlp", "bf16", batch=12, hidden=64, intermediate=96)
    r = optimize(mlp, "cpu", SearchConfig(budget=4), FAST, tmp_path / "out", cache=cache)
    assert r.reused == [cache.get(cpu, gemm).key]
    seed = next(c for c in r.candidates if c.origin.startswith("reuse:"))
    assert seed.correct and (seed.knobs["pack"], seed.knobs["pack_rows"]) == (1, 4) and "cached gemm kernel" in seed.plan


def test_no_reuse_when_disabled(tmp_path):
    cache = KernelCache(tmp_path / "k.sqlite")
    optimize(make_workload("gemm", "bf16", m=1, n=256, k=512), "cpu", SearchConfig(budget=4), FAST, tmp_path / "o", cache=cache)
    r = optimize(make_workload("gemm", "bf16", m=1, n=128, k=512), "cpu", SearchConfig(budget=4), FAST, tmp_path / "o",
                 cache=cache, reuse=0)
    assert r.reused == [] and not any(c.origin.startswith("reuse:") for c in r.candidates)


def test_warm_is_idempotent_and_cache_commands_work(tmp_path, capsys):
    argv = ["warm", "--model", "tiny-llama", "--budget", "4", "--timing-ms", "20", "--output-dir", str(tmp_path / "o"),
            "--quiet", "--json", str(tmp_path / "w1.json")]
    assert cli.main(argv) == 0
    first = json.loads((tmp_path / "w1.json").read_text())
    # the workloads the backend looks up for the tiny model: two projection shapes, attention, MLP, LM head
    assert [r["from_cache"] for r in first] == [False] * 5 and all(r["correct"] for r in first)
    argv[-1] = str(tmp_path / "w2.json")
    assert cli.main(argv) == 0
    second = json.loads((tmp_path / "w2.json").read_text())
    assert [r["from_cache"] for r in second] == [True] * 5
    assert [r["candidates_evaluated"] for r in second] == [0] * 5
    assert cli.main(argv[:-1] + [str(tmp_path / "w3.json"), "--kinds", "lm_head"]) == 0
    one = json.loads((tmp_path / "w3.json").read_text())  # warm writes a list, one workload or many
    assert isinstance(one, list) and len(one) == 1 and one[0]["from_cache"]
    capsys.readouterr()

    assert cli.main(["cache", "ls"]) == 0
    listing = capsys.readouterr().out.strip().splitlines()
    assert len(listing) == 5 and {line.split()[2] for line in listing} == {"attention", "mlp", "lm_head", "gemm"}
    key = listing[0].split()[0]
    assert cli.main(["cache", "show", key[:8]]) == 0
    assert "autocomp_kernel" in capsys.readouterr().out
    assert cli.main(["cache", "show", "nosuchkey"]) == 2
    assert "no cache entry" in capsys.readouterr().err
    assert cli.main(["cache", "export", str(tmp_path / "c.json")]) == 0
    assert cli.main(["cache", "clear"]) == 2  # stdin is no terminal here: not without --yes
    assert "cache clear would delete 5 kernel(s)" in capsys.readouterr().err
    assert cli.main(["cache", "clear", "--yes"]) == 0 and "deleted 5" in capsys.readouterr().out
    assert cli.main(["cache", "import", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "imported 5 kernel(s), refused 0" in out and "checked (run against the reference" in out
    assert cli.main(["cache", "import", str(tmp_path / "c.json")]) == 0  # again: nothing new, nothing to check
    out = capsys.readouterr().out
    assert "imported 0 kernel(s)" in out and "5 not imported" in out and "checked" not in out
    (tmp_path / "bad.json").write_text("{}")
    assert cli.main(["cache", "import", str(tmp_path / "bad.json")]) == 2
