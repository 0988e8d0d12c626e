"""How a supervised job ends, decided once for the local and ssh backends (orchestrator/backends/supervised.py)."""
from __future__ import annotations

from orchestrator.backends.local.supervisor import NodeRecord
from orchestrator.backends.local.supervisor import final_state as local_final_state
from orchestrator.backends.ssh.supervisor import HostRecord
from orchestrator.backends.ssh.supervisor import final_state as ssh_final_state


def nodes(*states: str) -> list[NodeRecord]:
    records = [NodeRecord(rank=i, pid=0) for i in range(len(states))]
    for record, state in zip(records, states):
        record.state = state
        record.exit_code = {"FAILED": 3, "NODE_FAIL": -9}.get(state)
    return records


def hosts(*states: str) -> list[HostRecord]:
    records = [HostRecord(host=f"h{i}", ssh_pid=0) for i in range(len(states))]
    for record, state in zip(records, states):
        record.state = state
        record.detail = "exited with code 3" if state == "FAILED" else ""
    return records


def test_every_unit_succeeding_is_success_on_both_backends():
    assert local_final_state(nodes("SUCCEEDED", "SUCCEEDED"), elastic=False, cancelled=False) == ("SUCCEEDED", "")
    assert ssh_final_state(hosts("SUCCEEDED", "SUCCEEDED"), elastic=False, cancelled=False) == ("SUCCEEDED", "")


def test_an_elastic_job_that_finished_on_survivors_succeeded_and_says_what_it_lost():
    assert local_final_state(nodes("SUCCEEDED", "NODE_FAIL"), elastic=True, cancelled=False) == (
        "SUCCEEDED", "finished on 1 of 2 nodes after losing node 1 (signal 9)")
    assert ssh_final_state(hosts("NODE_FAIL", "SUCCEEDED"), elastic=True, cancelled=False) == (
        "SUCCEEDED", "finished on 1 of 2 hosts after losing h0")


def test_a_static_job_that_lost_a_unit_is_a_node_failure():
    assert local_final_state(nodes("SUCCEEDED", "NODE_FAIL"), elastic=False, cancelled=False) == (
        "NODE_FAIL", "lost node 1 (signal 9)")


def test_the_first_failed_unit_is_named_with_its_log():
    assert local_final_state(nodes("FAILED", "FAILED"), elastic=True, cancelled=False) == (
        "FAILED", "node 0 exited with code 3; see logs/node-0.log")
    assert ssh_final_state(hosts("SUCCEEDED", "FAILED"), elastic=True, cancelled=False) == (
        "FAILED", "h1 exited with code 3; see logs/h1.log")


def test_cancel_wins_over_everything():
    assert ssh_final_state(hosts("FAILED"), elastic=False, cancelled=True) == ("CANCELLED", "cancelled by user")
