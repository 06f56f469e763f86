"""Directories being built during start-up (toy models, rehearsal assets), so that a stop can
remove them: no half-built one is left for the next start to trip over.

    with removed_if_stopped(staging):   # SIGTERM during start-up deletes `staging` first
        build(staging)

The SIGTERM handler that does the removing is the driver's (`eopd_ray.driver.stopping`); this
module only keeps the list, so the toy task can use it without importing the driver.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_BUILDING: set[Path] = set()


@contextmanager
def removed_if_stopped(path: Path) -> Iterator[Path]:
    """While inside, a SIGTERM during start-up deletes `path` before the driver exits."""
    _BUILDING.add(Path(path))
    try:
        yield Path(path)
    finally:
        _BUILDING.discard(Path(path))


def directories_being_built() -> list[Path]:
    return list(_BUILDING)
