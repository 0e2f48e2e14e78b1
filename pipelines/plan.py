"""A pipeline's plan: what it will read, write and compute, separate from running it.

A plan is data: its `stages` say, before anything runs, what each step of the run will submit to
the scheduler (tasks), read (chunks and bytes) and write (bytes). `--dry-run` prints them; the
plan's `execute` runs them on the `Compute` it is given, inside the locks and commits that make
the run crash-safe.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .executor import Compute, threaded_compute


@dataclass(frozen=True)
class Stage:
    """One step of a run: `tasks` it submits, `chunks` and `bytes_read` of pixel data it reads,
    `bytes_written` it writes (uncompressed; what lands on disk is usually less). `note` says
    what the counts assume where the plan cannot know them exactly (e.g. passes chosen at run
    time from a sample)."""

    name: str
    tasks: int
    chunks: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    note: str = ""

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "tasks": self.tasks,
            "chunks": self.chunks,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            **({"note": self.note} if self.note else {}),
        }


def task_count(*collections) -> int:
    """The number of tasks computing `collections` runs: the computations of their graph, optimised
    as dask does before submitting (keys that hold data, such as an array the tasks share, are not
    counted)."""
    import dask
    from dask.core import istask

    graph = {}
    for collection in dask.optimize(*collections):
        graph.update(collection.__dask_graph__())
    return sum(1 for value in graph.values() if istask(value))


def _size(n_bytes: int) -> str:
    if not n_bytes:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:,.1f} {unit}"
    return f"{n_bytes} B"


def stage_table(stages: Sequence[Stage]) -> list[str]:
    """The lines `--dry-run` prints for `stages`: one per stage, with its counts."""
    header = ("stage", "tasks", "chunks", "read", "write")
    rows = [(s.name, f"{s.tasks:,}", f"{s.chunks:,}", _size(s.bytes_read), _size(s.bytes_written)) for s in stages]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in (header, *rows)
    ]
    lines += [f"  {s.name}: {s.note}" for s in stages if s.note]
    return lines


@dataclass
class Plan:
    """A described, not yet executed, pipeline run. `status`: what running it will report when the
    plan already knows (None: the command's own, e.g. 'written'), such as 'unchanged' for an output
    that these inputs already made. `stages`: what each step will run, read and write."""

    title: str
    details: dict[str, Any]
    execute: Callable[[Compute], Any] = field(repr=False)
    status: str | None = None
    stages: list[Stage] = field(default_factory=list)

    def describe(self) -> str:
        """Human-readable summary for `--dry-run`."""
        width = max(len(key) for key in self.details)
        lines = [self.title] + [f"  {key.ljust(width)}  {value}" for key, value in self.details.items()]
        if self.stages:
            lines += ["stages", *stage_table(self.stages)]
        return "\n".join(lines)

    def run(self, compute: Compute = threaded_compute) -> Any:
        return self.execute(compute)
