#!/usr/bin/env python3
"""A small authoritative DNS responder for the test node's cluster domain, fed from the API.

The test node has neither CoreDNS (not in Debian) nor kube-proxy, but the Kubeflow operator's
contract relies on cluster DNS: MASTER_ADDR and PET_RDZV_ENDPOINT name the per-replica headless
Services (`<job>-master-0`, `<job>-worker-0`), which pods resolve through the kubelet's
`clusterDNS` and the search path `<ns>.svc.<domain>`. This responder answers what CoreDNS's
kubernetes plugin answers for those names (A records only; the node is IPv4):

  <service>.<ns>.svc.<domain>             headless: the ready endpoint addresses; else its clusterIP
  <hostname>.<service>.<ns>.svc.<domain>  the endpoint address whose hostname matches
  anything else under <domain>            NXDOMAIN;   a name outside <domain>: REFUSED (no upstream here)

It is stdlib only (it runs before any virtualenv exists) and reads Endpoints and Services with
one GET each per query (cached for a second), with the admin token of the node's API server.

    k8s_dns.py --server https://127.0.0.1:16543 --ca CA.crt --token-file TOKEN --listen 10.244.0.1:53
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import ssl
import struct
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

TYPE_A, TYPE_AAAA, CLASS_IN = 1, 28, 1
NOERROR, SERVFAIL, NXDOMAIN, REFUSED = 0, 2, 3, 5


@dataclass
class ApiReader:
    """GETs from the API server with a bearer token; None when the object does not exist."""

    server: str
    token: str
    context: ssl.SSLContext
    cache: dict[str, tuple[float, dict | None]] = field(default_factory=dict)

    def get(self, path: str) -> dict | None:
        now = time.monotonic()
        hit = self.cache.get(path)
        if hit and now - hit[0] < 1.0:
            return hit[1]
        request = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=3) as response:
                value: dict | None = json.load(response)
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
            value = None
        self.cache[path] = (now, value)
        return value


def endpoint_addresses(endpoints: dict | None, hostname: str | None = None) -> list[str]:
    """Ready addresses of an Endpoints object (optionally only the one with this hostname)."""
    found = []
    for subset in (endpoints or {}).get("subsets") or []:
        for address in subset.get("addresses") or []:
            if hostname is None or address.get("hostname") == hostname:
                found.append(address["ip"])
    return found


def resolve(api: ApiReader, labels: list[str]) -> tuple[int, list[str]]:
    """(rcode, IPv4 addresses) for a name under the cluster domain, split into labels before `svc`."""
    if len(labels) not in (2, 3):
        return NXDOMAIN, []
    hostname = labels[0] if len(labels) == 3 else None
    service_name, namespace = labels[-2], labels[-1]
    service = api.get(f"/api/v1/namespaces/{namespace}/services/{service_name}")
    if service is None:
        return NXDOMAIN, []
    cluster_ip = service.get("spec", {}).get("clusterIP")
    if cluster_ip and cluster_ip != "None" and hostname is None:
        return NOERROR, [cluster_ip]
    addresses = endpoint_addresses(api.get(f"/api/v1/namespaces/{namespace}/endpoints/{service_name}"), hostname)
    if hostname is not None and not addresses:
        return NXDOMAIN, []
    return NOERROR, addresses


def parse_question(packet: bytes) -> tuple[str, int, int, int]:
    """(name, qtype, qclass, end offset of the question) of a query's first question."""
    offset, labels = 12, []
    while True:
        length = packet[offset]
        if length == 0:
            offset += 1
            break
        if length & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(packet[offset + 1: offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    qtype, qclass = struct.unpack("!HH", packet[offset: offset + 4])
    return ".".join(labels).lower(), qtype, qclass, offset + 4


def answer(api: ApiReader, domain: str, packet: bytes) -> bytes:
    """The whole response to one query packet."""
    query_id, flags = struct.unpack("!HH", packet[:4])
    try:
        name, qtype, qclass, end = parse_question(packet)
    except (ValueError, IndexError, struct.error):
        return struct.pack("!HHHHHH", query_id, 0x8000 | (flags & 0x0100) | 1, 0, 0, 0, 0)  # FORMERR
    rcode, addresses = REFUSED, []
    suffix = f".svc.{domain}"
    if name.endswith(suffix) and qclass == CLASS_IN:
        try:
            rcode, addresses = resolve(api, name[: -len(suffix)].split("."))
        except Exception:  # the API did not answer: the client retries
            rcode, addresses = SERVFAIL, []
    elif name == domain or name.endswith("." + domain):
        rcode = NXDOMAIN
    records = [ip for ip in addresses if qtype == TYPE_A]
    reply_flags = 0x8000 | 0x0400 | (flags & 0x0100) | rcode  # QR, AA, RD echoed
    header = struct.pack("!HHHHHH", query_id, reply_flags, 1, len(records), 0, 0)
    body = b"".join(struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, 5, 4) + ipaddress.IPv4Address(ip).packed
                    for ip in records)
    return header + packet[12:end] + body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--listen", default="10.244.0.1:53")
    parser.add_argument("--domain", default="cluster.local")
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    token = open(args.token_file).read().strip()
    api = ApiReader(args.server.rstrip("/"), token, ssl.create_default_context(cafile=args.ca))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: the bridge may get its address after us
    sock.bind((host, int(port)))
    print(f"k8s_dns: answering *.svc.{args.domain} on {args.listen}", flush=True)
    while True:
        packet, peer = sock.recvfrom(4096)
        if len(packet) >= 12:
            sock.sendto(answer(api, args.domain.lower(), packet), peer)


if __name__ == "__main__":
    main()
