"""`tests.support.restartable_port`: the web port a test's worker is restarted on must
not be one an outgoing connection can take while the worker is down (a CI run failed
with "address already in use" when a worker restarted on a port bind(0) had picked)."""

from __future__ import annotations

import socket

import pytest

import tests.support as support


def test_ports_come_from_outside_the_ephemeral_range_in_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if support._ephemeral_start() <= support.RESTARTABLE_PORTS.stop:
        pytest.fail("this machine's ephemeral range reaches RESTARTABLE_PORTS")
    monkeypatch.setattr(support, "_port_cycle", None)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    ports = [support.restartable_port() for _ in range(5)]
    assert len(set(ports)) == 5
    assert all(p in support.RESTARTABLE_PORTS for p in ports)
    # another xdist worker hands out another slice
    monkeypatch.setattr(support, "_port_cycle", None)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw4")
    assert not {support.restartable_port() for _ in range(5)} & set(ports)


def test_a_port_in_use_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(support, "_port_cycle", None)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw9")
    first = support.restartable_port()
    monkeypatch.setattr(support, "_port_cycle", None)
    with socket.socket() as held:
        held.bind(("127.0.0.1", first))
        held.listen()
        assert support.restartable_port() == first + 1
