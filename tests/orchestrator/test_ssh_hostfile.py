"""DeepSpeed hostfiles, include/exclude filters and .deepspeed_env, as a DeepSpeed user writes them.

The examples are DeepSpeed's own (its launcher's --include/--exclude help and docs: ``worker-0
slots=4``, ``-i "worker-0@worker-1:0,2"``, ``-e "worker-1:0"``); where DeepSpeed is installed,
the same inputs are also given to its own parser and the results compared.
"""
from __future__ import annotations

import pytest

from orchestrator.backends.ssh.dsenv import deepspeed_env, parse_env_file
from orchestrator.backends.ssh.hostfile import Host, parse_hostfile, select_hosts
from orchestrator.errors import UserError

HOSTFILE = """\
# DeepSpeed hostfile: hostname slots=N
worker-0 slots=4

worker-1 slots=4   # the second machine
"""

FILTERS = [  # (include, exclude, expected hosts)
    ("", "", [Host("worker-0", (0, 1, 2, 3)), Host("worker-1", (0, 1, 2, 3))]),
    ("worker-0@worker-1:0,2", "", [Host("worker-0", (0, 1, 2, 3)), Host("worker-1", (0, 2))]),
    ("worker-1:0", "", [Host("worker-1", (0,))]),
    ("worker-1@worker-0:1", "", [Host("worker-0", (1,)), Host("worker-1", (0, 1, 2, 3))]),  # hostfile order
    ("", "worker-1:0", [Host("worker-0", (0, 1, 2, 3)), Host("worker-1", (1, 2, 3))]),
    ("", "worker-1", [Host("worker-0", (0, 1, 2, 3))]),
    ("", "worker-0:0,1@worker-1:3", [Host("worker-0", (2, 3)), Host("worker-1", (0, 1, 2))]),
]


def test_hostfile_hosts_and_slots_in_file_order() -> None:
    assert list(parse_hostfile(HOSTFILE).items()) == [("worker-0", 4), ("worker-1", 4)]


@pytest.mark.parametrize("include, exclude, expected", FILTERS)
def test_include_exclude_select_deepspeeds_hosts_and_slots(include: str, exclude: str, expected: list[Host]) -> None:
    assert select_hosts(parse_hostfile(HOSTFILE), include, exclude) == expected


def test_the_same_answers_as_deepspeeds_own_parser() -> None:
    runner = pytest.importorskip("deepspeed.launcher.runner", reason="DeepSpeed not installed (the peer extra)")
    pool = runner._parse_hostfile(HOSTFILE.splitlines())
    assert dict(pool) == dict(parse_hostfile(HOSTFILE))
    for include, exclude, _ in FILTERS:
        theirs = runner.parse_inclusion_exclusion(pool, include, exclude)
        ours = select_hosts(parse_hostfile(HOSTFILE), include, exclude)
        assert [(h.name, list(h.slots)) for h in ours] == [(k, list(v)) for k, v in theirs.items()], (include, exclude)


@pytest.mark.parametrize("text, message", [
    ("worker-0 slots=4\nworker-1 slot=4\n", "hostfile:2: 'worker-1 slot=4' is not a hostfile entry"),
    ("worker-0 slots=4\n\n# c\nworker-0 slots=2\n", "hostfile:4: host worker-0 is listed twice (first on line 1)"),
    ("worker-0\n", "hostfile:1: 'worker-0' is not a hostfile entry"),
    ("worker-0 slots=0\n", "hostfile:1: host worker-0 has slots=0"),
    ("# only a comment\n\n", "hostfile: no hosts in the hostfile"),
    ("w;touch${IFS}x slots=1\n", "hostfile:1: 'w;touch${IFS}x' is not a host name orch passes to ssh"),
    ("-oProxyCommand=sh slots=1\n", "hostfile:1: '-oProxyCommand=sh' is not a host name"),
])
def test_bad_hostfile_lines_are_named_with_their_line_number(text: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        parse_hostfile(text)
    assert message in str(err.value)


def test_user_names_addresses_and_aliases_are_host_names() -> None:
    pool = parse_hostfile("alice@gpu-a.example.org slots=8\n10.0.0.7 slots=8\nnode_3 slots=2\n")
    assert list(pool) == ["alice@gpu-a.example.org", "10.0.0.7", "node_3"]
    with pytest.raises(UserError, match="not a host name"):  # ':' separates slots in include/exclude
        parse_hostfile("fe80::1 slots=1\n")


@pytest.mark.parametrize("include, exclude, message", [
    ("worker-0", "worker-1", "include and exclude are mutually exclusive"),
    ("worker-2", "", "include: host 'worker-2' is not in the hostfile (did you mean 'worker-1'?)"),
    ("worker-1:7", "", "include: host worker-1 has no slot 7 (it has slots 0-3)"),
    ("worker-1:a", "", "'a' is not a list of slot numbers"),
    ("", "worker-0@worker-1", "include/exclude leave no host to run on"),
    ("worker-0@", "", "empty host name"),
])
def test_bad_filters_say_what_is_wrong(include: str, exclude: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        select_hosts(parse_hostfile(HOSTFILE), include, exclude)
    assert message in str(err.value)


def test_deepspeed_env_files_home_then_workdir(tmp_path, monkeypatch) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DS_ENV_FILE", raising=False)
    (home / ".deepspeed_env").write_text("NCCL_IB_DISABLE=1\nA=home\n")
    (work / ".deepspeed_env").write_text("# project settings\nA=work\nexport B = x=y \nC=\"a b\"\n")
    assert deepspeed_env(work) == {"NCCL_IB_DISABLE": "1", "A": "work", "B": "x=y", "C": "a b"}
    monkeypatch.setenv("DS_ENV_FILE", "other.env")
    (work / "other.env").write_text("D=1\n")
    assert deepspeed_env(work) == {"D": "1"}


def test_a_bad_deepspeed_env_line_is_named() -> None:
    with pytest.raises(UserError, match=r"\.deepspeed_env:2: 'NOT A LINE' is not KEY=VALUE"):
        parse_env_file("A=1\nNOT A LINE\n", ".deepspeed_env")
