"""The registry's replica states, behind `/models`: the newest report of each replica wins,
whichever order reports arrive in, a removed replica stays removed, and silent replicas age
out. A replica's heartbeat, and its registry found again by name when it is gone for good."""

from __future__ import annotations

import asyncio

from serve.registry import ReplicaStates


def state(replica_id: str, loads: int) -> dict:
    return {"replica_id": replica_id, "deployment": "flux", "adapter_loads": loads}


def test_an_older_report_arriving_late_does_not_replace_a_newer_one():
    # A replica's health-check thread numbers its report 1, its event loop then reports 2 with
    # a load counted, and report 1 reaches the registry last.
    states = ReplicaStates()
    states.report(state("r1", loads=1), report_number=2)
    states.report(state("r1", loads=0), report_number=1)
    states.report(state("r2", loads=5), report_number=1)
    assert sorted(s["adapter_loads"] for s in states.snapshot()) == [1, 5]
    states.report(state("r1", loads=2), report_number=3)
    assert sorted(s["adapter_loads"] for s in states.snapshot()) == [2, 5]


def test_a_removed_or_silent_replica_leaves_the_snapshot():
    states = ReplicaStates()
    states.report(state("r1", loads=1), report_number=1)
    states.report(state("r2", loads=1), report_number=1)
    states.remove("r1")
    assert [s["replica_id"] for s in states.snapshot()] == ["r2"]
    silent = ReplicaStates(stale_after_s=0)
    silent.report(state("r1", loads=1), report_number=1)
    assert silent.snapshot() == []


def test_a_report_arriving_after_its_replica_was_removed_does_not_bring_it_back():
    # The health-check thread reports as the replica is torn down: its report reaches the
    # registry after the replica's remove().
    states = ReplicaStates()
    states.report(state("r1", loads=1), report_number=1)
    states.remove("r1")
    states.report(state("r1", loads=1), report_number=2)
    states.report(state("r2", loads=3), report_number=1)
    assert [s["replica_id"] for s in states.snapshot()] == ["r2"]


# A replica's side (deployments/replica_reports.py), against a stand-in for the registry actor.


class _Method:
    def __init__(self, calls: list, error: Exception | None):
        self._calls, self._error = calls, error

    def remote(self, *args):
        self._calls.append(args)
        reply = asyncio.get_running_loop().create_future()
        if self._error is None:
            reply.set_result(None)
        else:
            reply.set_exception(self._error)
        return reply


class _Registry:
    """Records each report; answers each with `error` if set (a registry gone for good)."""

    def __init__(self, error: Exception | None = None):
        self.reports: list = []
        self.removed: list = []
        self.report = _Method(self.reports, error)
        self.remove = _Method(self.removed, None)


def test_a_replica_beats_until_it_says_goodbye(monkeypatch):
    from deployments import replica_reports
    from deployments.replica_reports import RegistryReports

    monkeypatch.setattr(replica_reports, "HEARTBEAT_S", 0.02)
    registry = _Registry()

    async def run() -> tuple[int, int]:
        reports = RegistryReports("app", lambda: state("r1", loads=0), lambda app: registry)
        await asyncio.sleep(0.2)
        beats = len(registry.reports)
        reports.remove("r1")
        await asyncio.sleep(0.1)
        return beats, len(registry.reports) - beats

    beats, after_goodbye = asyncio.run(run())
    assert beats >= 4  # about 10 at 20 ms; fewer on a loaded machine
    assert after_goodbye <= 1  # at most the beat already under way
    assert registry.removed == [("r1",)]
    numbers = [number for _, number in registry.reports]
    assert numbers == sorted(set(numbers))  # numbered in order, so the newest wins


def test_a_registry_gone_for_good_is_found_again_by_name(monkeypatch):
    from ray.exceptions import ActorDiedError

    from deployments import replica_reports
    from deployments.replica_reports import RegistryReports

    monkeypatch.setattr(replica_reports, "HEARTBEAT_S", 0.02)
    dead, fresh = _Registry(error=ActorDiedError()), _Registry()
    found = []

    def find_or_create(app_name: str):
        found.append(app_name)
        return dead if len(found) == 1 else fresh

    async def run() -> None:
        reports = RegistryReports("app", lambda: state("r1", loads=0), find_or_create)
        await asyncio.sleep(0.3)
        reports.remove("r1")

    asyncio.run(run())
    assert found == ["app", "app"]  # looked up again once, after the dead one failed a beat
    assert dead.reports and fresh.reports
