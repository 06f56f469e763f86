"""Free ports come from outside the kernel's ephemeral range and are bindable when returned."""

from __future__ import annotations

import socket

import pytest

from eopd_ray import ports


def test_ports_are_distinct_bindable_and_outside_the_ephemeral_range():
    low, high = ports.ephemeral_range()
    chosen = ports.free_ports(25)
    assert len(set(chosen)) == 25
    for port in chosen:
        assert not low <= port <= high
        assert port > ports.RAY_WORKER_PORTS_END
        assert ports.bindable(port, "127.0.0.1")


def test_a_held_port_is_never_returned(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setattr(ports, "candidate_range", lambda: range(port, port + 1))
        with pytest.raises(RuntimeError, match="found only 0 of 1 free ports"):
            ports.free_ports(1)


def test_an_unreadable_range_falls_back_to_linux_default(monkeypatch, tmp_path):
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", tmp_path / "missing")
    assert ports.ephemeral_range() == (32768, 60999)
    (tmp_path / "range").write_text("40000\t50000\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", tmp_path / "range")
    assert ports.candidate_range() == range(20000, 40000)
