"""Kernel cache: round trip, only correct kernels, better-wins, fingerprint misses, damaged rows and
files, concurrent writers, export/import, nearest-neighbour ranking."""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import sqlite3

import pytest

from autocomp_compile.kernels_cache import CacheError, KernelCache
from autocomp_compile.search.candidate import Candidate
from autocomp_compile.targets.base import EvalResult
from autocomp_compile.workload import make_workload


class FakeTarget:
    def __init__(self, name: str = "cpu", isa: str = "avx2", codegen: str = "cpu-test"):
        self.name, self._fp = name, {"target": name, "isa": isa, "codegen": codegen}

    def fingerprint(self):
        return dict(self._fp)


def cand(code: str, latency: float, correct: bool = True, knobs=None) -> Candidate:
    c = Candidate(id="c1", parent_id="root", iteration=2, language="c", code=code, menu_ids=["vectorize", "block_rows"],
                  knobs=knobs or {"isa": "avx2", "rows": 4})
    c.result = EvalResult(correct=correct, stage="ok" if correct else "correctness", latency_ms=latency, baseline_ms=2.0,
                          latency_p99_ms=latency * 1.1, runs=10, max_abs_error=1e-3)
    return c


def gemm(n: int = 256, k: int = 512, m: int = 1):
    return make_workload("gemm", "bf16", m=m, n=n, k=k)


def test_put_get_round_trip(tmp_path):
    with KernelCache(tmp_path / "k.sqlite") as cache:
        t, w = FakeTarget(), gemm()
        assert cache.get(t, w) is None
        assert cache.put(t, w, cand("int a;", 1.0), provenance={"run": "r1"})
        e = cache.get(t, w)
        assert e.code == "int a;" and e.latency_ms == 1.0 and e.baseline_ms == 2.0 and e.speedup == 2.0
        assert e.menu_ids == ["vectorize", "block_rows"] and e.knobs == {"isa": "avx2", "rows": 4}
        assert e.provenance["run"] == "r1" and e.evidence["max_abs_error"] == 1e-3
        assert e.candidate().code == "int a;" and e.candidate().origin == f"cache:{e.key}"


def test_only_correct_kernels_are_stored(tmp_path):
    with KernelCache(tmp_path / "k.sqlite") as cache:
        with pytest.raises(ValueError, match="correctness"):
            cache.put(FakeTarget(), gemm(), cand("int a;", 1.0, correct=False))
        assert cache.entries() == []


def test_a_slower_kernel_does_not_replace_a_faster_one(tmp_path):
    with KernelCache(tmp_path / "k.sqlite") as cache:
        t, w = FakeTarget(), gemm()
        assert cache.put(t, w, cand("int fast;", 1.0))
        assert not cache.put(t, w, cand("int slow;", 2.0))
        assert cache.get(t, w).code == "int fast;"
        assert cache.put(t, w, cand("int faster;", 0.5))
        assert cache.get(t, w).code == "int faster;" and len(cache.entries()) == 1


def test_changed_fingerprint_or_codegen_or_shape_misses(tmp_path):
    with KernelCache(tmp_path / "k.sqlite") as cache:
        cache.put(FakeTarget(), gemm(), cand("int a;", 1.0))
        assert cache.get(FakeTarget(isa="avx512"), gemm()) is None
        assert cache.get(FakeTarget(codegen="cpu-other"), gemm()) is None
        assert cache.get(FakeTarget(), gemm(n=512)) is None
        assert cache.get(FakeTarget(), gemm()) is not None


def test_a_row_whose_code_was_altered_is_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "k.sqlite"
    with KernelCache(path) as cache:
        cache.put(FakeTarget(), gemm(), cand("int a;", 1.0))
        cache.put(FakeTarget(), gemm(n=128), cand("int b;", 1.0))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE kernels SET code = 'int evil;' WHERE code = 'int a;'")
    conn.execute("UPDATE kernels SET menu_ids = '{not json' WHERE code = 'int b;'")
    conn.commit()
    conn.close()
    with caplog.at_level(logging.WARNING), KernelCache(path) as cache:
        assert cache.get(FakeTarget(), gemm()) is None
        assert cache.get(FakeTarget(), gemm(n=128)) is None
        assert cache.entries() == []
        assert cache.put(FakeTarget(), gemm(n=64), cand("int c;", 1.0))  # still a working cache
    assert "does not match its hash" in caplog.text and "undecodable" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_database_file_is_moved_aside(tmp_path, caplog, damage):
    path = tmp_path / "k.sqlite"
    with KernelCache(path) as cache:
        for n in (64, 128, 256, 512):
            cache.put(FakeTarget(), gemm(n=n), cand(f"int k{n};", 1.0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"this is not a database" * 100)
    with caplog.at_level(logging.WARNING), KernelCache(path) as cache:
        cache.entries()
        assert cache.put(FakeTarget(), gemm(), cand("int a;", 1.0))
        assert cache.get(FakeTarget(), gemm()).code == "int a;"
    assert "unreadable" in caplog.text
    assert list(tmp_path.glob("k.sqlite.corrupt-*"))


def _writer(args):
    path, worker, count = args
    with KernelCache(path) as cache:
        for i in range(count):
            cache.put(FakeTarget(), gemm(n=8 * (worker * count + i + 1)), cand(f"int w{worker}_{i};", 1.0 + i))
    return count


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "k.sqlite"
    KernelCache(path).close()
    with mp.get_context("spawn").Pool(4) as pool:
        assert sum(pool.map(_writer, [(str(path), w, 25) for w in range(4)])) == 100
    with KernelCache(path) as cache:
        entries = cache.entries()
        assert len(entries) == 100
        assert {e.code for e in entries} == {f"int w{w}_{i};" for w in range(4) for i in range(25)}
        assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_export_import_round_trip_and_refusals(tmp_path):
    src = KernelCache(tmp_path / "a.sqlite")
    src.put(FakeTarget(), gemm(), cand("int a;", 1.0))
    src.put(FakeTarget(), gemm(n=128), cand("int b;", 1.5))
    llm_written = cand("int g;", 0.1)
    llm_written.knobs = None  # code without a schedule
    src.put(FakeTarget("cuda", "sm90", "cuda-test"), gemm(), llm_written)
    src.put(FakeTarget("cuda", "sm90", "cuda-test"), gemm(n=128), cand("int g_knobs;", 0.1, knobs={"warps": 8}))
    assert src.export(tmp_path / "cache.json") == 4
    dst = KernelCache(tmp_path / "b.sqlite")
    imported, refused, seeds_only, _ = dst.import_(tmp_path / "cache.json", {"cpu": "cpu-test", "cuda": "cuda-other"})
    # another generator's entry: kept when it has a schedule to reuse (never a hit), refused when it has none
    assert (imported, seeds_only) == (3, 1) and len(refused) == 1 and "no schedule to reuse" in refused[0]
    assert {e.code for e in dst.entries()} == {"int a;", "int b;", "int g_knobs;"}
    assert dst.get(FakeTarget(), gemm()).latency_ms == 1.0
    cuda_now = FakeTarget("cuda", "sm90", "cuda-other")
    assert dst.get(cuda_now, gemm(n=128)) is None
    assert [e.code for e in dst.nearest(cuda_now, gemm(n=128))] == ["int g_knobs;"]
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(CacheError, match="not an autocomp-compile cache export"):
        dst.import_(tmp_path / "bad.json", {"cpu": "cpu-test"})


def test_import_verifies_code_hashes(tmp_path):
    import json

    src = KernelCache(tmp_path / "a.sqlite")
    src.put(FakeTarget(), gemm(), cand("int a;", 1.0))
    src.export(tmp_path / "c.json")
    payload = json.loads((tmp_path / "c.json").read_text())
    payload["entries"][0]["code"] = "int tampered;"
    (tmp_path / "c.json").write_text(json.dumps(payload))
    imported, refused, _, _ = KernelCache(tmp_path / "b.sqlite").import_(tmp_path / "c.json", {"cpu": "cpu-test"})
    assert imported == 0 and "does not match its hash" in refused[0]


def test_nearest_prefers_same_shape_class_then_closest_shape(tmp_path):
    with KernelCache(tmp_path / "k.sqlite") as cache:
        t = FakeTarget()
        cache.put(t, gemm(m=1, n=4096, k=4096), cand("int gemv_big;", 1.0))
        cache.put(t, gemm(m=1, n=1024, k=1024), cand("int gemv_small;", 1.0))
        cache.put(t, gemm(m=512, n=512, k=512), cand("int square;", 1.0))
        cache.put(t, make_workload("rmsnorm"), cand("int other_kind;", 1.0))
        cache.put(FakeTarget(isa="avx512"), gemm(m=1, n=2048, k=2048), cand("int other_host;", 1.0))
        near = cache.nearest(t, gemm(m=1, n=2048, k=1536), limit=4)
        # same shape class first, this machine before another host, then by distance
        assert [e.code for e in near] == ["int gemv_small;", "int gemv_big;", "int other_host;", "int square;"]
        assert cache.nearest(t, gemm(m=1, n=1024, k=1024))[0].code == "int gemv_big;"  # never itself
        assert cache.nearest(t, gemm(m=384, n=512, k=512))[0].code == "int square;"


def test_nearest_offers_kinds_that_share_the_schedule_space_after_the_same_kind(tmp_path):
    class SharingTarget(FakeTarget):
        def schedule_kinds(self, kind):
            return ("gemm", "lm_head", "mlp") if kind in ("gemm", "lm_head", "mlp") else (kind,)

    mlp = lambda batch: make_workload("mlp", "bf16", batch=batch, hidden=2048, intermediate=8192)  # noqa: E731
    with KernelCache(tmp_path / "k.sqlite") as cache:
        t = SharingTarget()
        cache.put(t, gemm(m=64, n=2048, k=2048), cand("int gemm_prompt;", 1.0))
        cache.put(t, mlp(1), cand("int mlp_decode;", 1.0))
        cache.put(t, mlp(48), cand("int mlp_prompt;", 1.0))
        cache.put(t, make_workload("rmsnorm"), cand("int other_family;", 1.0))
        # the shape class first (a 64-row prompt is "wide"), the same kind before another of the family
        assert [e.code for e in cache.nearest(t, mlp(64))] == ["int mlp_prompt;", "int gemm_prompt;", "int mlp_decode;"]
        assert [e.code for e in cache.nearest(t, gemm(m=32, n=512, k=2048))] == ["int gemm_prompt;", "int mlp_prompt;",
                                                                                 "int mlp_decode;"]
        assert [e.code for e in cache.nearest(FakeTarget(), mlp(64))] == ["int mlp_prompt;", "int mlp_decode;"]


def test_nearest_offers_another_machines_kernel_for_the_same_workload(tmp_path):
    with KernelCache(tmp_path / "k.sqlite") as cache:
        h100, h200 = FakeTarget("cuda", "sm90-h100", "cuda-test"), FakeTarget("cuda", "sm90-h200", "cuda-test")
        cache.put(h100, gemm(), cand("int from_h100;", 1.0, knobs={"warps": 8}))
        cache.put(FakeTarget("cpu", "avx2", "cuda-test"), gemm(), cand("int other_target;", 1.0))
        assert [e.code for e in cache.nearest(h200, gemm())] == ["int from_h100;"]  # not a hit, a seed
        assert cache.get(h200, gemm()) is None
        assert cache.nearest(h100, gemm()) == []  # on its own machine it is the cache hit, never a seed


def test_nearest_offers_an_older_code_generators_schedule_after_the_current_ones(tmp_path):
    with KernelCache(tmp_path / "k.sqlite") as cache:
        old, new = FakeTarget("cuda", "sm90-h100", "cuda-old"), FakeTarget("cuda", "sm90-h100", "cuda-new")
        cache.put(old, gemm(), cand("int old_same_shape;", 1.0, knobs={"warps": 8}))
        cache.put(new, gemm(m=1, n=1024, k=1024), cand("int new_other_shape;", 1.0, knobs={"warps": 4}))
        cache.put(FakeTarget("cuda", "sm90-h200", "cuda-new"), gemm(), cand("int new_other_gpu;", 1.0, knobs={}))
        no_schedule = cand("int llm_written;", 0.5)
        no_schedule.knobs = None
        cache.put(new, gemm(m=1, n=512, k=512), no_schedule)  # code without knobs cannot seed another shape
        assert cache.get(new, gemm()) is None  # an older generator's kernel is never a hit
        # this GPU first (current generator, then older), then another GPU
        assert [e.code for e in cache.nearest(new, gemm())] == ["int new_other_shape;", "int old_same_shape;",
                                                                "int new_other_gpu;"]


def test_clear_by_target(tmp_path):
    with KernelCache(tmp_path / "k.sqlite") as cache:
        cache.put(FakeTarget(), gemm(), cand("int a;", 1.0))
        cache.put(FakeTarget("cuda", "sm90", "cuda-test"), gemm(), cand("int g;", 1.0))
        assert cache.clear("cuda") == 1
        assert [e.target for e in cache.entries()] == ["cpu"]
        assert cache.clear() == 1 and cache.entries() == []


def _export_one(tmp_path, **changes):
    """An export file of one genuine entry, with `changes` made to that entry; and the genuine file."""
    import json

    src = KernelCache(tmp_path / "src.sqlite")
    src.put(FakeTarget(), gemm(), cand("int a;", 1.0))
    src.export(tmp_path / "genuine.json")
    payload = json.loads((tmp_path / "genuine.json").read_text())
    payload["entries"][0].update(changes)
    (tmp_path / "changed.json").write_text(json.dumps(payload))
    return tmp_path / "changed.json", tmp_path / "genuine.json"


@pytest.mark.parametrize("field, value", [("latency_ms", "fast"), ("latency_ms", 0), ("latency_ms", -1.0),
                                          ("baseline_ms", "slow"), ("workload", "garbage"), ("code", None),
                                          ("menu_ids", "vectorize"), ("knobs", [1])])
def test_import_refuses_entries_with_invalid_values(tmp_path, field, value):
    changed, genuine = _export_one(tmp_path, **{field: value})
    with KernelCache(tmp_path / "dst.sqlite") as dst:
        imported, refused, _, _ = dst.import_(changed, {"cpu": "cpu-test"})
        assert imported == 0 and len(refused) == 1 and field in refused[0]
        assert dst.entries() == [] and dst.nearest(FakeTarget(), gemm(n=128)) == []
        # a refused fake (e.g. a negative latency) does not stand in the way of the genuine kernel
        assert dst.import_(genuine, {"cpu": "cpu-test"})[:2] == (1, [])
        assert dst.get(FakeTarget(), gemm()).latency_ms == 1.0


@pytest.mark.parametrize("column, value", [("latency_ms", "fast"), ("latency_ms", 0), ("workload", '"garbage"'),
                                           ("baseline_ms", -2.0), ("knobs", "[1]")])
def test_a_row_with_an_invalid_value_is_skipped_with_a_warning(tmp_path, caplog, column, value):
    path = tmp_path / "k.sqlite"
    with KernelCache(path) as cache:
        cache.put(FakeTarget(), gemm(), cand("int a;", 1.0))
        cache.put(FakeTarget(), gemm(n=128), cand("int b;", 1.0))
    conn = sqlite3.connect(path)  # a database an older version wrote, or one edited by hand
    conn.execute(f"UPDATE kernels SET {column} = ? WHERE code = 'int a;'", (value,))
    conn.commit()
    conn.close()
    with caplog.at_level(logging.WARNING), KernelCache(path) as cache:
        assert [e.code for e in cache.entries()] == ["int b;"]
        assert [e.speedup for e in cache.entries()] == [2.0]
        assert cache.get(FakeTarget(), gemm()) is None
        assert [e.code for e in cache.nearest(FakeTarget(), gemm(n=64))] == ["int b;"]
    assert "invalid row" in caplog.text and column in caplog.text


@pytest.mark.parametrize("content", [b"\xff\xfe\x00\x81binary", b"[1, 2]", b'"hello"', b"null", b"true", b"5",
                                     b'{"format": "autocomp-kernel-cache/1", "entries": 5}',
                                     b'{"format": "autocomp-kernel-cache/1", "entries": {"a": 1}}'])
def test_importing_a_malformed_file_is_a_cache_error(tmp_path, capsys, content):
    from autocomp_compile import cli

    (tmp_path / "bad.json").write_bytes(content)
    with KernelCache(tmp_path / "k.sqlite") as cache, pytest.raises(CacheError, match="bad.json"):
        cache.import_(tmp_path / "bad.json", {"cpu": "cpu-test"})
    assert cli.main(["cache", "import", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autocomp-compile: error:") and "Traceback" not in err


@pytest.mark.parametrize("damage", ["code = 'int evil;'", "menu_ids = '{not json'", "latency_ms = 'fast'"])
def test_a_damaged_row_is_replaced_by_a_new_kernel(tmp_path, caplog, damage):
    path = tmp_path / "k.sqlite"
    with KernelCache(path) as cache:
        cache.put(FakeTarget(), gemm(), cand("int a;", 1.0))
    conn = sqlite3.connect(path)
    conn.execute(f"UPDATE kernels SET {damage}")
    conn.commit()
    conn.close()
    with caplog.at_level(logging.WARNING), KernelCache(path) as cache:
        assert cache.get(FakeTarget(), gemm()) is None
        # slower than what the damaged row claims, but the damaged row cannot be used: the new kernel wins
        assert cache.put(FakeTarget(), gemm(), cand("int slower;", 2.0))
        assert cache.get(FakeTarget(), gemm()).code == "int slower;"
        assert not cache.put(FakeTarget(), gemm(), cand("int slowest;", 3.0))  # a valid row still wins
        assert [e.code for e in cache.entries()] == ["int slower;"]


def test_show_matches_a_literal_key_prefix(tmp_path):
    with KernelCache(tmp_path / "k.sqlite") as cache:
        for n in range(1, 18):  # 17 keys of hex digits: at least two start with the same digit
            cache.put(FakeTarget(), gemm(n=8 * n), cand(f"int k{n};", 1.0))
        keys = [e.key for e in cache.entries()]
        shared = next(c for c in "0123456789abcdef" if sum(k.startswith(c) for k in keys) > 1)
        with pytest.raises(CacheError, match=f"matches {sum(k.startswith(shared) for k in keys)} cache entries"):
            cache.show(shared)
        with pytest.raises(CacheError, match="empty"):
            cache.show("")
        assert cache.show("%") is None and cache.show("_" + keys[0][1:]) is None
        assert cache.show(keys[0][:-1] + "%") is None
        assert cache.show(keys[0]).key == keys[0] and cache.show(keys[0][:12]).key == keys[0]


def _seventeen_in_the_default_cache() -> tuple[list[str], str]:
    """17 entries in the default cache (this test's AUTOCOMP_CACHE_DIR): their keys, and a first digit two share."""
    with KernelCache() as cache:
        for n in range(1, 18):
            cache.put(FakeTarget(), gemm(n=8 * n), cand(f"int k{n};", 1.0))
        keys = [e.key for e in cache.entries()]
    return keys, next(c for c in "0123456789abcdef" if sum(k.startswith(c) for k in keys) > 1)


def test_cli_cache_show_refuses_an_empty_or_ambiguous_prefix(capsys):
    from autocomp_compile import cli

    keys, shared = _seventeen_in_the_default_cache()
    assert cli.main(["cache", "show", shared]) == 2
    err = capsys.readouterr().err
    assert "matches" in err and all(k in err for k in keys if k.startswith(shared))
    assert cli.main(["cache", "show", ""]) == 2 and "empty" in capsys.readouterr().err
    assert cli.main(["cache", "show", "%"]) == 2 and "no cache entry" in capsys.readouterr().err
    assert cli.main(["cache", "show", keys[0][:10]]) == 0 and keys[0] in capsys.readouterr().out


def test_cli_cache_rm_deletes_only_when_every_key_names_one_entry(capsys):
    from autocomp_compile import cli

    keys, shared = _seventeen_in_the_default_cache()
    assert cli.main(["cache", "rm", keys[0], shared]) == 2 and "matches" in capsys.readouterr().err
    assert cli.main(["cache", "rm", keys[0], "%"]) == 2 and "no cache entry with key '%'" in capsys.readouterr().err
    with KernelCache() as cache:
        assert len(cache.entries()) == 17  # a bad key deletes nothing
    assert cli.main(["cache", "rm", keys[0][:12], keys[1], keys[0]]) == 0
    out = capsys.readouterr().out
    assert out.count("deleted") == 2 and keys[0] in out and '"n":' in out
    with KernelCache() as cache:
        assert sorted(e.key for e in cache.entries()) == sorted(keys[2:])


def test_a_cache_in_a_directory_and_the_default_one(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMP_CACHE_DIR", str(tmp_path / "default"))
    assert KernelCache.in_directory(tmp_path / "mine").path == tmp_path / "mine" / "kernels.sqlite"
    assert KernelCache.in_directory(None).path == tmp_path / "default" / "kernels.sqlite"


def _filled(path, n=3):
    with KernelCache(path) as cache:
        for i in range(n):
            cache.put(FakeTarget(), gemm(n=64 * (i + 1)), cand(f"int k{i};", 1.0))


def test_a_locked_cache_is_an_error_and_stays_where_it_is(tmp_path):
    """Locked is not damaged: moving the file aside would hand the lock holder's writes to the quarantine."""
    _filled(tmp_path / "k.sqlite")
    holder = sqlite3.connect(tmp_path / "k.sqlite", isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        cache = object.__new__(KernelCache)
        cache.path = tmp_path / "k.sqlite"
        real_connect = sqlite3.connect
        with pytest.MonkeyPatch.context() as mp:  # a short timeout: the holder never lets go
            mp.setattr(sqlite3, "connect", lambda *a, **k: real_connect(*a, **{**k, "timeout": 0.1}))
            with pytest.raises(CacheError, match="cannot open"):
                cache._conn = cache._open()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not list(tmp_path.glob("k.sqlite.corrupt-*"))
    with KernelCache(tmp_path / "k.sqlite") as cache:
        assert len(cache.entries()) == 3


def test_a_row_with_text_that_is_not_utf8_is_skipped(tmp_path, caplog):
    _filled(tmp_path / "k.sqlite")
    with KernelCache(tmp_path / "k.sqlite") as cache:
        key = cache.entries()[0].key
    conn = sqlite3.connect(tmp_path / "k.sqlite")
    conn.execute("UPDATE kernels SET provenance = CAST(x'ff7b7d' AS TEXT) WHERE key = ?", (key,))
    conn.commit()
    conn.close()
    with caplog.at_level(logging.WARNING), KernelCache(tmp_path / "k.sqlite") as cache:
        assert len(cache.entries()) == 2 and cache.show(key) is None
    assert "not UTF-8" in caplog.text


class _DamagedPages:
    """A connection whose row reads hit damage (pages that the open-time count did not touch, such as a long
    kernel's overflow pages): what sqlite raises then."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql, *args):
        if sql.startswith("SELECT") and "FROM kernels" in sql:
            err = sqlite3.DatabaseError("database disk image is malformed")
            err.sqlite_errorcode = sqlite3.SQLITE_CORRUPT
            raise err
        return self.conn.execute(sql, *args)

    def close(self):
        self.conn.close()


def test_damage_found_only_by_a_query_moves_the_cache_aside(tmp_path, caplog):
    path = tmp_path / "k.sqlite"
    _filled(path)
    with caplog.at_level(logging.WARNING), KernelCache(path) as cache:
        cache._conn = _DamagedPages(cache._conn)
        assert cache.entries() == []  # no exception: a damaged cache never stops a compilation
        assert cache.put(FakeTarget(), gemm(), cand("int again;", 1.0)) and len(cache.entries()) == 1
    assert list(tmp_path.glob("k.sqlite.corrupt-*")) and "moved to" in caplog.text


def test_export_onto_the_cache_file_itself_is_refused(tmp_path):
    _filled(tmp_path / "k.sqlite")
    with KernelCache(tmp_path / "k.sqlite") as cache:
        with pytest.raises(CacheError, match="the kernel cache itself"):
            cache.export(tmp_path / "k.sqlite")
        assert len(cache.entries()) == 3


@pytest.mark.parametrize("edit, why", [
    (lambda d: d["workload"]["params"].update(n=4096), "description does not match its signature"),
    (lambda d: d.update(target="nki"), "differs from its fingerprint"),
])
def test_import_refuses_entries_whose_description_does_not_match_their_key(tmp_path, edit, why):
    _filled(tmp_path / "a.sqlite", n=1)
    with KernelCache(tmp_path / "a.sqlite") as cache:
        cache.export(tmp_path / "e.json")
    payload = json.loads((tmp_path / "e.json").read_text())
    edit(payload["entries"][0])
    (tmp_path / "e.json").write_text(json.dumps(payload))
    with KernelCache(tmp_path / "b.sqlite") as dst:
        imported, refused, _, _ = dst.import_(tmp_path / "e.json", {"cpu": "cpu-test", "nki": "cpu-test"})
    assert imported == 0 and len(refused) == 1 and why in refused[0]


def test_import_counts_entries_the_cache_already_has_as_fast(tmp_path):
    _filled(tmp_path / "a.sqlite")
    with KernelCache(tmp_path / "a.sqlite") as cache:
        cache.export(tmp_path / "e.json")
        assert cache.import_(tmp_path / "e.json", {"cpu": "cpu-test"}) == (0, [], 0, 3)


@pytest.mark.parametrize("latency", [float("nan"), 0.0, -1.0, float("inf")])
def test_an_impossible_latency_is_refused_and_keeps_the_cached_kernel(tmp_path, latency):
    with KernelCache(tmp_path / "k.sqlite") as cache:
        t, w = FakeTarget(), gemm()
        assert cache.put(t, w, cand("int good;", 1.0))
        with pytest.raises(ValueError, match="latency_ms is not a positive number"):
            cache.put(t, w, cand("int bad;", latency))
        assert cache.get(t, w).code == "int good;"


def test_an_unusable_baseline_is_stored_as_none(tmp_path):
    with KernelCache(tmp_path / "k.sqlite") as cache:
        t, w = FakeTarget(), gemm()
        c = cand("int k;", 1.0)
        c.result.baseline_ms = float("nan")
        assert cache.put(t, w, c)
        e = cache.get(t, w)
        assert e.baseline_ms is None and e.speedup is None


def test_imported_entries_are_unchecked_and_never_displace_a_kernel_measured_here(tmp_path):
    src = KernelCache(tmp_path / "a.sqlite")
    src.put(FakeTarget(), gemm(), cand("int fast;", 0.001))  # the file's word
    src.export(tmp_path / "e.json")
    dst = KernelCache(tmp_path / "b.sqlite")
    dst.put(FakeTarget(), gemm(), cand("int here;", 1.0))
    assert dst.import_(tmp_path / "e.json", {"cpu": "cpu-test"})[3] == 1  # kept: the one measured here stays
    assert dst.get(FakeTarget(), gemm()).code == "int here;"
    empty = KernelCache(tmp_path / "c.sqlite")
    assert empty.import_(tmp_path / "e.json", {"cpu": "cpu-test"})[0] == 1
    e = empty.get(FakeTarget(), gemm())
    assert e.unchecked and e.provenance["imported_from"] == str(tmp_path / "e.json")
    assert empty.put(FakeTarget(), gemm(), cand("int checked;", 5.0))  # measured here, slower: still replaces it
    assert not empty.get(FakeTarget(), gemm()).unchecked
    assert empty.remove(empty.get(FakeTarget(), gemm()).key) and empty.get(FakeTarget(), gemm()) is None
