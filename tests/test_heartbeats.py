"""The driver's heartbeat judgment: a worker is silent once its counter has not moved for the
timeout, on the driver's clock; never before it first beat, never while it keeps beating."""

from __future__ import annotations

import pytest

from eopd_ray.driver import heartbeats
from eopd_ray.driver.heartbeats import Heartbeats


@pytest.fixture
def kv(monkeypatch):
    from ray.experimental import internal_kv

    store: dict[str, bytes] = {}
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key, namespace=None: store.get(key))
    return store


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(heartbeats.time, "monotonic", lambda: now[0])
    return now


def test_silent_only_when_the_counter_stops_for_the_timeout(kv, clock):
    hb = Heartbeats(timeout_s=10)
    assert hb.silent(["a"]) == []  # not started yet: never judged (start-up has its own bound)
    kv["a"] = b"1"
    assert hb.silent(["a"]) == []
    clock[0] += 9
    assert hb.silent(["a"]) == []
    kv["a"] = b"2"  # it beat: seen at the driver's next look, the clock starts again
    assert hb.silent(["a"]) == []
    clock[0] += 9
    assert hb.silent(["a"]) == []
    clock[0] += 2  # 11 s since the counter was last seen moving
    assert hb.silent(["a"]) == ["a"]
    kv["a"] = b"3"  # a restarted worker beats again
    assert hb.silent(["a"]) == []
