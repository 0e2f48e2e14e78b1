"""A pipeline's plan: what it will read, write and compute, separate from running it."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dask

#: compute(*collections, label=...) -> tuple of results; supplied by the caller (scheduler, progress).
Compute = Callable[..., tuple]


def threaded_compute(*collections, label: str = "") -> tuple:
    """The simplest `Compute`: dask's local threaded scheduler, no progress display."""
    return dask.compute(*collections, scheduler="threads")


@dataclass
class Plan:
    """A described, not yet executed, pipeline run."""

    title: str
    details: dict[str, Any]
    execute: Callable[[Compute], Any] = field(repr=False)

    def describe(self) -> str:
        """Human-readable summary for `--dry-run`."""
        width = max(len(key) for key in self.details)
        lines = [self.title] + [f"  {key.ljust(width)}  {value}" for key, value in self.details.items()]
        return "\n".join(lines)

    def run(self, compute: Compute = threaded_compute) -> Any:
        return self.execute(compute)
