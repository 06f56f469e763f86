"""eopd_ray.startup_heap: a worker is built with automatic collection off, what it built is then
frozen, and collection comes back on whatever the build did."""

from __future__ import annotations

import gc
import weakref

import pytest

from eopd_ray.roles.learner import LearnerWorker
from eopd_ray.roles.rollout import RolloutWorker
from eopd_ray.roles.teacher import TeacherWorker
from eopd_ray.startup_heap import built_with_collector_paused


@pytest.fixture(autouse=True)
def collector_restored():
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    if enabled:
        gc.enable()
    else:
        gc.disable()


class Built:
    def __init__(self, fail: bool = False) -> None:
        self.collecting_while_built = gc.isenabled()
        self.cycle = [self]  # a reference cycle made while building
        self.cycle.append(self.cycle)
        if fail:
            raise ValueError("the build failed")


Built.__init__ = built_with_collector_paused(Built.__init__)


def test_built_with_collection_off_then_frozen_and_collection_back_on():
    gc.enable()
    frozen = gc.get_freeze_count()
    built = Built()
    assert built.collecting_while_built is False
    assert gc.isenabled()
    assert gc.get_freeze_count() > frozen
    # The cycle built is in the permanent generation: dropped, no collection frees it.
    alive = weakref.ref(built)
    del built
    gc.collect()
    assert alive() is not None


def test_what_the_build_returns_is_passed_through():
    """LearnerWorker.setup answers whether the student has dropout; the driver's streamed step
    relies on it (roles.pi_old.old_from_update)."""

    class Learner:
        @built_with_collector_paused
        def setup(self, dropout: bool) -> bool:
            return dropout

    assert Learner().setup(True) is True
    assert Learner().setup(False) is False


def test_a_failed_build_raises_and_leaves_collection_on():
    gc.enable()
    with pytest.raises(ValueError, match="the build failed"):
        Built(fail=True)
    assert gc.isenabled()


def test_collection_left_off_if_it_was_off_before():
    gc.disable()
    Built()
    assert not gc.isenabled()


@pytest.mark.parametrize(
    "method", [RolloutWorker.__init__, TeacherWorker.__init__, LearnerWorker.setup]
)
def test_every_worker_builds_with_the_collector_paused(method):
    """The methods that import the engines and load the models (measured: jobs/bench/startup.py)."""
    assert hasattr(method, "__wrapped__"), method.__qualname__
