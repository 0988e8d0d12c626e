"""DeepSpeed hostfiles (``worker-0 slots=4``) and the ``--include``/``--exclude`` filters
(``worker-0@worker-1:0,2``), with DeepSpeed's meaning and errors that name the line.

Facts from DeepSpeed's launcher (deepspeed/launcher/runner.py, 0.19): a line is a host name, white
space, ``slots=N``; blank lines and lines starting with ``#`` are ignored; a host may appear once;
include and exclude are mutually exclusive; a filter names hosts (all their slots) or
``host:slot,slot``; the hosts keep the hostfile's order. Unlike DeepSpeed, a host name must be a
plain DNS name, address or ssh alias (``[user@]name``): it is passed to ssh and to the remote side,
so a name holding shell or ssh syntax is refused here rather than trusted.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError, closest

LINE = re.compile(r"^(\S+)\s+slots=(\d+)(?:\s+#.*)?$")
# [user@]name: DNS names, IPv4 addresses, ssh aliases. No ':' (it separates slots in include/exclude,
# so DeepSpeed's syntax cannot name an IPv6 address either: use an ~/.ssh/config alias for one).
HOST_NAME = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.+-]*@)?[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Host:
    """One machine of the job and the device slots (GPU ids) the job may use on it."""

    name: str
    slots: tuple[int, ...]


def check_host_name(name: str, where: str) -> str:
    if not HOST_NAME.match(name):
        raise UserError(f"{where}: {name!r} is not a host name orch passes to ssh",
                        hint="use a DNS name, an address or an ~/.ssh/config alias of letters, digits, "
                             "'.', '-', '_' (optionally user@name)")
    return name


def parse_hostfile(text: str, source: str = "hostfile") -> OrderedDict[str, int]:
    """Host name -> slot count, in file order."""
    pool: OrderedDict[str, int] = OrderedDict()
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        m = LINE.match(line)
        if not m:
            raise UserError(f"{where}: {line!r} is not a hostfile entry",
                            hint="write `HOSTNAME slots=N` (e.g. `worker-0 slots=8`), one host per line")
        host, slots = check_host_name(m.group(1), where), int(m.group(2))
        if host in pool:
            raise UserError(f"{where}: host {host} is listed twice (first on line {first_line[host]})",
                            hint="list every host once with its total slots")
        if slots == 0:
            raise UserError(f"{where}: host {host} has slots=0", hint="give it slots=1 or more, or remove the line")
        pool[host], first_line[host] = slots, number
    if not pool:
        raise UserError(f"{source}: no hosts in the hostfile", hint="write `HOSTNAME slots=N`, one host per line")
    return pool


def read_hostfile(path: str | Path) -> OrderedDict[str, int]:
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"hostfile {p} not found", hint="ssh.hostfile is relative to the job spec's directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"hostfile {p} cannot be read: {exc}") from None
    return parse_hostfile(text, str(p))


def parse_filter(text: str, option: str) -> OrderedDict[str, list[int]]:
    """``a@b:0,2`` -> {a: [], b: [0, 2]} (an empty list means every slot of the host)."""
    spec: OrderedDict[str, list[int]] = OrderedDict()
    for part in text.split("@"):
        name, sep, slot_text = part.strip().partition(":")
        if not name:
            raise UserError(f"{option} {text!r}: empty host name",
                            hint="write HOST[:SLOT[,SLOT...]] joined by '@', e.g. worker-0@worker-1:0,2")
        check_host_name(name, option)
        slots: list[int] = []
        if sep:
            try:
                slots = [int(s) for s in slot_text.split(",")]
            except ValueError:
                raise UserError(f"{option} {text!r}: {slot_text!r} is not a list of slot numbers",
                                hint="write HOST:0,2") from None
        # a host named twice, once whole: the whole host wins; slot lists add up
        if name in spec and (not spec[name] or not slots):
            spec[name] = []
        else:
            spec[name] = sorted(set(spec.get(name, []) + slots))
    return spec


def _check_known(pool: OrderedDict[str, int], name: str, slots: list[int], option: str) -> None:
    if name not in pool:
        near = closest(name, pool)
        raise UserError(f"{option}: host {name!r} is not in the hostfile"
                        + (f" (did you mean {near!r}?)" if near else ""),
                        hint="hosts: " + ", ".join(pool))
    for slot in slots:
        if not 0 <= slot < pool[name]:
            raise UserError(f"{option}: host {name} has no slot {slot} (it has slots 0-{pool[name] - 1})")


def select_hosts(pool: OrderedDict[str, int], include: str = "", exclude: str = "") -> list[Host]:
    """The hosts and slots a job uses, after DeepSpeed's include/exclude rules, in hostfile order."""
    if include and exclude:
        raise UserError("include and exclude are mutually exclusive (as in DeepSpeed)",
                        hint="keep one: include names what to use, exclude what to leave out")
    chosen: dict[str, list[int]] = {name: list(range(n)) for name, n in pool.items()}
    if include:
        wanted = parse_filter(include, "include")
        for name, slots in wanted.items():
            _check_known(pool, name, slots, "include")
        chosen = {name: (wanted[name] or list(range(pool[name]))) for name in pool if name in wanted}
    elif exclude:
        for name, slots in parse_filter(exclude, "exclude").items():
            _check_known(pool, name, slots, "exclude")
            chosen[name] = [s for s in chosen[name] if slots and s not in slots]
    hosts = [Host(name, tuple(slots)) for name, slots in chosen.items() if slots]
    if not hosts:
        raise UserError("include/exclude leave no host to run on", hint="hosts: " + ", ".join(pool))
    return hosts
