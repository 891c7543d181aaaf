"""The persistent kernel cache: one sqlite file (WAL mode) shared by every process on the machine.

Key: (target fingerprint, workload signature, code-generator version). Only candidates that passed
every correctness check are stored. A row whose code no longer matches its hash, that cannot be
decoded or that holds an invalid value (e.g. a latency that is not a positive number) is reported,
skipped and replaced by the next kernel stored for its key; a database file that sqlite cannot read
is moved aside and a new one started, so a damaged cache never stops a compilation.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import reprlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from autocomp_compile.paths import cache_dir
from autocomp_compile.search.candidate import Candidate, normalized_code_hash
from autocomp_compile.workload import Workload

log = logging.getLogger(__name__)

EXPORT_FORMAT = "autocomp-kernel-cache/1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kernels (
    key TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    fingerprint_hash TEXT NOT NULL,
    codegen TEXT NOT NULL,
    signature TEXT NOT NULL,
    kind TEXT NOT NULL,
    shape_class TEXT NOT NULL,
    workload TEXT NOT NULL,
    language TEXT NOT NULL,
    code TEXT NOT NULL,
    code_hash TEXT NOT NULL,
    menu_ids TEXT NOT NULL,
    knobs TEXT,
    models TEXT NOT NULL,
    latency_ms REAL NOT NULL,
    baseline_ms REAL,
    evidence TEXT NOT NULL,
    provenance TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS kernels_by_kind ON kernels (fingerprint_hash, kind);
"""
_COLUMNS = (
    "key target fingerprint fingerprint_hash codegen signature kind shape_class workload language code code_hash "
    "menu_ids knobs models latency_ms baseline_ms evidence provenance created updated"
).split()


class CacheError(RuntimeError):
    """A cache operation that cannot be done (e.g. importing a file of another format)."""


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_key(fingerprint: dict[str, Any], signature: str, codegen: str) -> str:
    return hashlib.sha256(f"{fingerprint_hash(fingerprint)}|{signature}|{codegen}".encode()).hexdigest()[:20]


@dataclass
class CacheEntry:
    key: str
    target: str
    fingerprint: dict[str, Any]
    codegen: str
    signature: str
    kind: str
    shape_class: str
    workload: dict[str, Any]
    language: str
    code: str
    code_hash: str
    menu_ids: list[str]
    knobs: dict[str, Any] | None
    models: list[str]
    latency_ms: float
    baseline_ms: float | None
    evidence: dict[str, Any]
    provenance: dict[str, Any]
    created: float
    updated: float

    @property
    def speedup(self) -> float | None:
        return self.baseline_ms / self.latency_ms if self.baseline_ms else None

    @property
    def unchecked(self) -> bool:
        """Imported from a file and not yet run on this machine: its code passed the integrity checks, but its
        correctness and latency are only the file's word until `optimize.check_imported` evaluates it here."""
        return bool(self.provenance.get("unchecked"))

    @property
    def reproducible(self) -> bool:
        """Whether the kernel may serve deterministic mode: cached by a deterministic target variant, a generated
        schedule (knobs) of a target that is its own variant (every generated CPU and NKI kernel fixes its
        reduction order), or one that passed the evaluator's repeat check."""
        return bool(self.fingerprint.get("deterministic") or self.knobs is not None or self.evidence.get("repeatable"))

    def candidate(self) -> Candidate:
        return Candidate(id=f"cache:{self.key}", parent_id=None, iteration=0, language=self.language, code=self.code,
                         plan=f"Cached kernel {self.key}", menu_ids=list(self.menu_ids), knobs=self.knobs,
                         models=list(self.models), origin=f"cache:{self.key}")


def _row_to_entry(row: sqlite3.Row) -> CacheEntry:
    d = dict(zip(_COLUMNS, row))
    for name in ("fingerprint", "workload", "menu_ids", "knobs", "models", "evidence", "provenance"):
        d[name] = json.loads(d[name]) if d[name] is not None else None
    d.pop("fingerprint_hash")
    return CacheEntry(**d)


_STRING_FIELDS = ("key", "target", "codegen", "signature", "kind", "shape_class", "language", "code", "code_hash")
_OBJECT_FIELDS = ("fingerprint", "workload", "evidence", "provenance")


def _is_positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _invalid(e: CacheEntry) -> str | None:
    """Why `e` holds a value no cache entry can have (a wrong type, a latency that is not a positive
    number), or None when every field is usable."""
    for name in _STRING_FIELDS:
        if not isinstance(getattr(e, name), str):
            return f"{name} is not a string ({reprlib.repr(getattr(e, name))})"
    for name in _OBJECT_FIELDS:
        if not isinstance(getattr(e, name), dict):
            return f"{name} is not an object ({reprlib.repr(getattr(e, name))})"
    if e.knobs is not None and not isinstance(e.knobs, dict):
        return f"knobs is neither an object nor null ({reprlib.repr(e.knobs)})"
    for name in ("menu_ids", "models"):
        value = getattr(e, name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return f"{name} is not a list of strings ({reprlib.repr(value)})"
    if not isinstance(e.workload.get("dtype"), str) or not isinstance(e.workload.get("params"), dict):
        return "workload lacks a dtype string or a params object"
    if not _is_positive(e.latency_ms):
        return f"latency_ms is not a positive number ({reprlib.repr(e.latency_ms)})"
    if e.baseline_ms is not None and not _is_positive(e.baseline_ms):
        return f"baseline_ms is neither a positive number nor null ({reprlib.repr(e.baseline_ms)})"
    for name in ("created", "updated"):
        value = getattr(e, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return f"{name} is not a time ({reprlib.repr(value)})"
    return None


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """Whether sqlite says the file is damaged or not a database (not locked, busy or unwritable)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:  # raised by the module itself, e.g. for a file that is not a database at all
        return "malformed" in str(exc) or "not a database" in str(exc)
    return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _undecodable(row: tuple) -> bool:
    """Whether a row holds text that was not UTF-8 (decoded with surrogates by the connection's text factory)."""
    for value in row:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def _valid_entry(row: sqlite3.Row) -> CacheEntry | None:
    """The entry of `row`, or None (with a warning) when the row cannot be decoded, holds an invalid
    value or its code does not match its hash."""
    if _undecodable(row):
        log.warning("kernel cache: skipping undecodable row %s (text that is not UTF-8)", ascii(row[0]))
        return None
    try:
        entry = _row_to_entry(row)
    except (ValueError, TypeError) as exc:
        log.warning("kernel cache: skipping undecodable row %s (%s)", row[0], exc)
        return None
    problem = _invalid(entry)
    if problem is not None:
        log.warning("kernel cache: skipping invalid row %s (%s)", entry.key, problem)
        return None
    if not _code_matches_hash(entry):
        log.warning("kernel cache: skipping %s: its code does not match its hash (edited or corrupted)", entry.key)
        return None
    return entry


def _code_matches_hash(entry: "CacheEntry") -> bool:
    """Whether an entry's code still has the hash it was stored with: by its language's normalisation, or by the
    C one that every language used before Python kernels (NKI) kept `//` and indentation in their hash."""
    return entry.code_hash in (normalized_code_hash(entry.code, entry.language), normalized_code_hash(entry.code))


def _machine(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The machine part of a fingerprint: without the code generator's version and the deterministic-variant mark."""
    return {k: v for k, v in fingerprint.items() if k not in ("codegen", "deterministic")}


def _shape_distance(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Sum of |log ratio| over the integer parameters the two workloads share."""
    total = 0.0
    for name in set(a) & set(b):
        x, y = a[name], b[name]
        if isinstance(x, bool) or isinstance(y, bool) or not isinstance(x, int) or not isinstance(y, int):
            total += 0.0 if x == y else 1.0
        elif x > 0 and y > 0:
            total += abs(math.log(x / y))
    return total


class KernelCache:
    """Correct kernels by (target fingerprint, workload signature, code-generator version)."""

    FILE_NAME = "kernels.sqlite"

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else cache_dir() / self.FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = self._open()

    # ------------------------------------------------------------ connection

    @classmethod
    def in_directory(cls, directory: str | Path | None) -> "KernelCache":
        """The cache file in `directory` (a `cache_dir` argument), or the default cache when it is None."""
        return cls(Path(directory) / cls.FILE_NAME if directory else None)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        # text that is not UTF-8 (a damaged row) decodes with surrogates, which _valid_entry refuses row by row,
        # instead of failing the whole query
        conn.text_factory = lambda b: b.decode("utf-8", "surrogateescape")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=60000")
        conn.executescript(_SCHEMA)
        conn.execute("SELECT count(*) FROM kernels").fetchone()
        return conn

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):  # locked, busy, read-only, I/O: the file is fine, leave it where it is
                raise CacheError(f"kernel cache {self.path}: cannot open it ({exc})") from None
            self._quarantine(exc)
            return self._connect()

    def _quarantine(self, exc: Exception) -> None:
        """Move a damaged cache file (and its WAL files) aside, so that a new one starts in its place."""
        broken = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-"
                                     f"{time.time_ns() % 1_000_000_000:09d}")
        log.warning("kernel cache %s is unreadable (%s); moved to %s and starting a new one", self.path, exc, broken)
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                os.replace(p, Path(str(broken) + suffix))

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "KernelCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ reading

    def _entries(self, where: str = "", args: tuple = ()) -> Iterator[CacheEntry]:
        try:
            rows = self._conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM kernels {where}", args).fetchall()
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise CacheError(f"kernel cache {self.path}: cannot read it ({exc})") from None
            # damage the open-time check did not reach: a damaged cache never stops a compilation
            self._conn.close()
            self._quarantine(exc)
            self._conn = self._connect()
            return
        for row in rows:
            entry = _valid_entry(row)
            if entry is not None:
                yield entry

    def get(self, target: Any, workload: Workload) -> CacheEntry | None:
        """The cached kernel for `workload` on `target`, or None."""
        fp = target.fingerprint()
        key = cache_key(fp, workload.signature(), fp.get("codegen", ""))
        return next(self._entries("WHERE key = ?", (key,)), None)

    def show(self, prefix: str) -> CacheEntry | None:
        """The entry whose key is or starts with `prefix` (taken literally), or None when there is none.
        Raises CacheError for an empty prefix and for one that more than one key starts with."""
        if not prefix:
            raise CacheError("an empty key prefix matches every cache entry; give a key or the start of one")
        keys = [k for (k,) in self._conn.execute(
            "SELECT key FROM kernels WHERE substr(key, 1, ?) = ? ORDER BY key", (len(prefix), prefix))]
        if prefix in keys:
            keys = [prefix]
        if len(keys) > 1:
            shown = ", ".join(keys[:10]) + (", ..." if len(keys) > 10 else "")
            raise CacheError(f"key prefix {prefix!r} matches {len(keys)} cache entries: {shown}; give more of the key")
        return next(self._entries("WHERE key = ?", (keys[0],)), None) if keys else None

    def entries(self, target: str | None = None) -> list[CacheEntry]:
        if target:
            return list(self._entries("WHERE target = ? ORDER BY kind, updated", (target,)))
        return list(self._entries("ORDER BY target, kind, updated"))

    def row_counts(self, target: Any, workload: Workload) -> list[int]:
        """The other row counts (`Workload.rows_param`: tokens) for which this machine's cache holds `workload`'s
        computation, every other parameter and the dtype equal: the lengths a prompt can be padded to."""
        name = workload.rows_param()
        if name is None:
            return []
        fp = target.fingerprint()
        rows = self._entries("WHERE fingerprint_hash = ? AND codegen = ? AND kind = ?",
                             (fingerprint_hash(fp), fp.get("codegen", ""), workload.kind))
        rest = {k: v for k, v in workload.params.items() if k != name}
        return sorted({e.workload["params"][name] for e in rows if e.workload.get("dtype") == workload.dtype
                       and {k: v for k, v in e.workload["params"].items() if k != name} == rest}
                      - {workload.params[name]})

    def nearest(self, target: Any, workload: Workload, limit: int = 3) -> list[CacheEntry]:
        """Solved workloads of the same kind (or of a kind that shares its schedule space on this target:
        `target.schedule_kinds`) on the same target, most similar first: same shape class before other
        classes, the same kind before the others, this machine before others of the target (another GPU or
        CPU model; an imported cache), this code generator before older ones, then by dtype and distance
        between shape parameters. Another machine's entry for this very workload counts too, and so does an entry an
        older code generator made here: a schedule (knobs) is re-legalised and its code generated anew,
        so it is a starting point wherever the knobs still mean the same; its code is never reused. Only
        entries with a schedule (knobs) are offered: LLM-written code cannot be re-targeted to a shape."""
        fp = target.fingerprint()
        here, codegen = fingerprint_hash(fp), fp.get("codegen", "")
        kinds = tuple(getattr(target, "schedule_kinds", lambda kind: (kind,))(workload.kind))
        rows = self._entries(
            f"WHERE target = ? AND kind IN ({', '.join('?' * len(kinds))}) AND NOT (fingerprint_hash = ? AND signature = ?)",
            (target.name, *kinds, here, workload.signature()),
        )
        cls = workload.shape_class()
        this_machine = _machine(fp)
        ranked = sorted(
            (e for e in rows if e.knobs is not None), key=lambda e: (e.shape_class != cls, e.kind != workload.kind,
                                 _machine(e.fingerprint) != this_machine,
                                 e.codegen != codegen, e.workload.get("dtype") != workload.dtype,
                                 _shape_distance(e.workload["params"], workload.params)),
        )
        return ranked[:limit]

    # ------------------------------------------------------------ writing

    def put(self, target: Any, workload: Workload, candidate: Candidate, provenance: dict[str, Any] | None = None) -> bool:
        """Store `candidate` if it passed every check and beats what is cached. Returns whether it was stored."""
        r = candidate.result
        if r is None or not r.correct or r.latency_ms is None:
            raise ValueError("only kernels that passed every correctness check can be cached")
        fp = target.fingerprint()
        now = time.time()
        entry = CacheEntry(
            key=cache_key(fp, workload.signature(), fp.get("codegen", "")), target=target.name, fingerprint=fp,
            codegen=fp.get("codegen", ""), signature=workload.signature(), kind=workload.kind,
            shape_class=workload.shape_class(), workload=workload.describe(), language=candidate.language,
            code=candidate.code, code_hash=candidate.code_hash, menu_ids=candidate.menu_ids, knobs=candidate.knobs,
            models=candidate.models, latency_ms=r.latency_ms,
            baseline_ms=r.baseline_ms if _is_positive(r.baseline_ms) else None,  # an unusable baseline: no speedup
            evidence={"stage": r.stage, "max_abs_error": r.max_abs_error, "runs": r.runs, "p99_ms": r.latency_p99_ms,
                      **({"repeatable": True} if r.extra.get("repeatable") else {})},
            provenance={"candidate": candidate.id, "origin": candidate.origin, **(provenance or {})},
            created=now, updated=now,
        )
        problem = _invalid(entry)
        if problem is not None:  # e.g. a latency of 0 or NaN: it would replace a good entry by an unusable one
            raise ValueError(f"not cached: {problem}")
        return self._upsert(entry)

    def _upsert(self, e: CacheEntry) -> bool:
        values = {name: getattr(e, name, None) for name in _COLUMNS if name != "fingerprint_hash"}
        for name in ("fingerprint", "workload", "menu_ids", "knobs", "models", "evidence", "provenance"):
            values[name] = json.dumps(values[name], sort_keys=True, default=str)
        values["fingerprint_hash"] = fingerprint_hash(e.fingerprint)
        with self._transaction() as conn:
            row = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM kernels WHERE key = ?", (e.key,)).fetchone()
            old = _valid_entry(row) if row is not None else None  # a damaged row is replaced, whatever it claims
            # A kernel checked for reproducibility takes the place of a faster unchecked one: deterministic mode
            # asked for it, and the unchecked one could not serve that mode. A kernel evaluated here takes the
            # place of an imported one not yet evaluated here (whose latency is the file's word), never the reverse.
            if old is not None and e.unchecked and not old.unchecked:
                return False
            if old is not None and old.latency_ms <= e.latency_ms and not (e.reproducible and not old.reproducible) \
                    and not (old.unchecked and not e.unchecked):
                return False
            if old is not None:
                values["created"] = old.created
            conn.execute(
                f"INSERT OR REPLACE INTO kernels ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})",
                [values[name] for name in _COLUMNS],
            )
        return True

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")  # take the write lock now: concurrent writers queue, none is lost
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def remove(self, key: str) -> bool:
        """Delete one entry; returns whether it was there."""
        with self._transaction() as conn:
            return conn.execute("DELETE FROM kernels WHERE key = ?", (key,)).rowcount > 0

    def clear(self, target: str | None = None) -> int:
        with self._transaction() as conn:
            cur = conn.execute("DELETE FROM kernels WHERE target = ?", (target,)) if target else conn.execute("DELETE FROM kernels")
            return cur.rowcount

    # ------------------------------------------------------------ moving caches between machines

    def export(self, path: str | Path, target: str | None = None) -> int:
        """Write the entries (of `target`, or all) to the JSON file `path`; returns how many."""
        own = {Path(str(self.path) + suffix).resolve() for suffix in ("", "-wal", "-shm")}
        if Path(path).resolve() in own:
            raise CacheError(f"{path} is the kernel cache itself: export to another file")
        entries = self.entries(target)
        payload = {"format": EXPORT_FORMAT, "entries": [e.__dict__ for e in entries]}
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        os.replace(tmp, path)
        return len(entries)

    def import_(self, path: str | Path, codegen_versions: dict[str, str]) -> tuple[int, list[str], int, int]:
        """Import an exported file. Every entry's integrity is verified (code hash, key, description); its
        correctness and latency cannot be, by reading a file: entries are stored `unchecked`, and the first use
        on a machine whose fingerprint they match evaluates them there (`optimize.check_imported`) before they
        count as a cache hit. An entry written by another code-generator version than `codegen_versions[target]`
        can never be a cache hit (the version is part of the key); it is kept when it has a schedule (knobs), as a
        starting point for schedule reuse, and refused otherwise. Returns (imported, refusals, imported as reuse
        seeds only, not imported because the cache holds an entry as fast or faster, or one evaluated here)."""
        imported, refused, seeds_only, kept = 0, [], 0, 0
        for d in _read_export(path):
            try:
                e = CacheEntry(**d)
            except TypeError as exc:
                refused.append(f"malformed entry: {exc}")
                continue
            problem = _invalid(e)
            if problem is not None:
                refused.append(f"{e.key}: {problem}")
                continue
            want = codegen_versions.get(e.target)
            if want is None:
                refused.append(f"{e.key}: unknown target {e.target!r}")
            elif e.codegen != want and e.knobs is None:
                refused.append(f"{e.key}: written by code generator {e.codegen!r} (this installation has {want!r}) "
                               f"and has no schedule to reuse")
            elif not _code_matches_hash(e):
                refused.append(f"{e.key}: code does not match its hash")
            elif cache_key(e.fingerprint, e.signature, e.codegen) != e.key:
                refused.append(f"{e.key}: key does not match its fingerprint and workload")
            elif (mismatch := _description_mismatch(e)):
                refused.append(f"{e.key}: {mismatch}")
            else:
                e.provenance = {**e.provenance, "unchecked": True, "imported_from": str(path)}
                stored = self._upsert(e)
                imported += stored
                seeds_only += stored and e.codegen != want
                kept += not stored
        return imported, refused, seeds_only, kept


def _description_mismatch(e: CacheEntry) -> str:
    """Why an entry's readable fields (workload, kind, target) disagree with what its key was made from (its
    signature and fingerprint), or "" when they agree: `cache ls` and schedule reuse read those fields."""
    signature = hashlib.sha256(json.dumps(e.workload, sort_keys=True).encode()).hexdigest()[:16]
    if signature != e.signature:
        return "its workload description does not match its signature"
    if e.workload.get("kind") != e.kind:
        return f"kind {e.kind!r} differs from its workload's {e.workload.get('kind')!r}"
    if e.fingerprint.get("target") != e.target:
        return f"target {e.target!r} differs from its fingerprint's {e.fingerprint.get('target')!r}"
    return ""


def _read_export(path: str | Path) -> list[Any]:
    """The entries of the export file `path`. Raises CacheError when it cannot be read or is not an export."""
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # ValueError: invalid JSON or not UTF-8 text
        raise CacheError(f"cannot read {path}: {exc}") from None
    if not isinstance(payload, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(payload), "a number")
        raise CacheError(f"{path} is not an autocomp-compile cache export (it holds {kind}, not an object)")
    if payload.get("format") != EXPORT_FORMAT:
        raise CacheError(f"{path} is not an autocomp-compile cache export (format {payload.get('format')!r})")
    entries = payload.get("entries", [])
    if not isinstance(entries, list):
        raise CacheError(f"{path} is not an autocomp-compile cache export (its entries are not a list)")
    return entries
