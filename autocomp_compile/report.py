"""Result tables and progress display shared by the CLI and the benchmarks."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def results_table(rows: list[dict[str, Any]], title: str) -> Table:
    """One row per workload: eager, naive and best latency, speedup, achieved and % of read bandwidth."""
    table = Table(title=title)
    for col in ("workload", "eager ms", "naive ms", "best ms", "speedup", "GB/s", "% read BW", "candidates", "correct"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for r in rows:
        gbps = r["bytes_moved"] / (r["best_ms"] * 1e6) if r.get("best_ms") else None
        pct = r.get("percent_of_read_bw")
        table.add_row(
            r["label"],
            _fmt(r.get("baseline_ms")),
            _fmt(r.get("naive_ms")),
            _fmt(r.get("best_ms")),
            _fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else ""),
            _fmt(gbps, ".1f"),
            _fmt(pct, ".0f"),
            str(r.get("candidates_evaluated", "-")),
            "yes" if r.get("correct") else "NO",
        )
    return table


def run_off_line(label: str, run_off: dict[str, Any] | None) -> str | None:
    """One line when a search's run-off named another winner than the fastest timed alone, found a finalist
    wrong, or did not finish (`BeamSearch.run_off`'s record); None otherwise."""
    if not run_off:
        return None
    if "error" in run_off:
        failed = f"; failed when evaluated again: {', '.join(run_off['failed_again'])}" if run_off["failed_again"] else ""
        return f"{label}: the run-off did not finish ({run_off['error'][:200]}){failed}; winner {run_off['winner']}"
    finalists = {f["id"]: f for f in run_off["finalists"]}
    wrong = [i for i, f in finalists.items() if f["wrong"]]
    winner, alone = run_off["winner"], finalists[run_off["fastest_alone"]]
    if winner == alone["id"] and not wrong:
        return None
    line = f"{label}: the run-off of the {len(finalists)} fastest"
    if wrong:
        line += f" found {', '.join(wrong)} wrong after timing"
    if winner is None:
        return line + "; no correct kernel is left"
    if winner not in finalists:
        return line + f"; winner {winner}, the fastest of the others as timed alone"
    line += f"{' and' if wrong else ''} picked {winner} ({_fmt(finalists[winner]['run_off_ms'])} ms there)"
    if winner != alone["id"] and not alone["wrong"]:
        line += f" over {alone['id']} ({_fmt(alone['run_off_ms'])} ms there, {_fmt(alone['alone_ms'])} ms timed alone)"
    return line


@contextmanager
def search_progress(label: str, budget: int, enabled: bool = True) -> Iterator[Any]:
    """A progress bar over the candidate budget; yields the callback BeamSearch calls."""
    if not enabled:
        yield None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[best]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
    )
    task = progress.add_task(label, total=budget, best="")

    def update(done: int, total: int, best: Any, baseline_ms: float | None) -> None:
        text = ""
        if best is not None and best.result is not None and best.result.latency_ms is not None:
            text = f"best {best.latency_ms:.3f} ms"
            if baseline_ms:
                text += f" ({baseline_ms / best.latency_ms:.2f}x eager)"
        progress.update(task, completed=done, best=text)

    with progress:
        yield update
