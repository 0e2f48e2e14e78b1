"""A pipeline's plan: what it will read, write and compute, separate from running it."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .executor import Compute, threaded_compute


@dataclass
class Plan:
    """A described, not yet executed, pipeline run. `status`: what running it will report when the
    plan already knows (None: the command's own, e.g. 'written'), such as 'unchanged' for an output
    that these inputs already made."""

    title: str
    details: dict[str, Any]
    execute: Callable[[Compute], Any] = field(repr=False)
    status: str | None = None

    def describe(self) -> str:
        """Human-readable summary for `--dry-run`."""
        width = max(len(key) for key in self.details)
        lines = [self.title] + [f"  {key.ljust(width)}  {value}" for key, value in self.details.items()]
        return "\n".join(lines)

    def run(self, compute: Compute = threaded_compute) -> Any:
        return self.execute(compute)
