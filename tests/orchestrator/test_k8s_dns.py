"""The test node's DNS responder (tests/clusters/k8s_dns.py) answers the operator's headless
Services the way CoreDNS does: the ready endpoint addresses for <svc>.<ns>.svc.cluster.local,
NXDOMAIN for unknown names under the domain, REFUSED outside it. Checked on real DNS packets."""
from __future__ import annotations

import ipaddress
import struct

from tests.clusters.k8s_dns import NOERROR, NXDOMAIN, REFUSED, answer

SERVICES = {
    "/api/v1/namespaces/team/services/job-master-0": {"spec": {"clusterIP": "None"}},
    "/api/v1/namespaces/team/endpoints/job-master-0": {"subsets": [{"addresses": [{"ip": "10.244.0.7"}]}]},
    "/api/v1/namespaces/team/services/web": {"spec": {"clusterIP": "10.0.0.9"}},
}


class FakeApi:
    def get(self, path: str) -> dict | None:
        return SERVICES.get(path)


def query(name: str, qtype: int = 1) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, 1)


def parse(reply: bytes) -> tuple[int, list[str]]:
    query_id, flags, _, count = struct.unpack("!HHHH", reply[:8])
    assert query_id == 0x1234 and flags & 0x8000
    ips = [str(ipaddress.IPv4Address(reply[-16 * (count - i) + 12: -16 * (count - i) + 16 or None]))
           for i in range(count)]
    return flags & 0xF, ips


def test_a_headless_service_resolves_to_its_ready_pod() -> None:
    assert parse(answer(FakeApi(), "cluster.local", query("job-master-0.team.svc.cluster.local"))) == \
        (NOERROR, ["10.244.0.7"])


def test_a_clusterip_service_resolves_to_its_cluster_ip() -> None:
    assert parse(answer(FakeApi(), "cluster.local", query("web.team.svc.cluster.local"))) == (NOERROR, ["10.0.0.9"])


def test_unknown_names_and_other_domains() -> None:
    assert parse(answer(FakeApi(), "cluster.local", query("nope.team.svc.cluster.local")))[0] == NXDOMAIN
    assert parse(answer(FakeApi(), "cluster.local", query("job-master-0.svc.cluster.local")))[0] == NXDOMAIN
    assert parse(answer(FakeApi(), "cluster.local", query("pypi.org")))[0] == REFUSED
    assert parse(answer(FakeApi(), "cluster.local", query("job-master-0.team.svc.cluster.local", 28))) == \
        (NOERROR, [])  # AAAA: the name exists, no IPv6 address
