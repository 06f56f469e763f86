"""Typed, picklable errors that say what failed, where, and how to fix it.

Every user-facing error in eopd-ray derives from `EopdError`. They cross Ray actor boundaries,
so each one pickles with its structured fields intact (see `__reduce__`).
"""

from __future__ import annotations

from dataclasses import dataclass


class EopdError(Exception):
    """Base class of every error eopd-ray raises on purpose."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a configuration: the dotted key path and what is wrong there."""

    path: str  # dotted key path, e.g. "loss.entropy_threshold" ("" = the whole document)
    message: str  # what is wrong and, where possible, how to fix it

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.message}"


class ConfigError(EopdError):
    """A configuration was rejected; lists every problem found, not only the first."""

    def __init__(self, issues: list[ConfigIssue], source: str = "") -> None:
        self.issues = list(issues)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"invalid configuration{where} ({len(self.issues)} problem(s)):"]
        lines += [f"  - {issue}" for issue in self.issues]
        super().__init__("\n".join(lines))

    def __reduce__(self):
        return (type(self), (self.issues, self.source))


class BatchError(EopdError):
    """A wire-type batch (RolloutBatch, TeacherScores) has inconsistent shapes or dtypes."""


class WorkerReplaced(EopdError):
    """A worker call found a fresh process: Ray restarted the worker (it crashed between calls)
    since the driver last set it up, e.g. joined it to the weight-sync group. Recovered like a
    lost worker."""


class VersionMismatch(EopdError):
    """A rollout batch was sampled with other weights than the driver expects."""
