"""The registry's replica states, behind `/models`: the newest report of each replica wins,
whichever order reports arrive in, a removed replica stays removed, and silent replicas age
out."""

from __future__ import annotations

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
