"""Before an ssh job starts anything: every host answers over ssh with the expected host key, has
the python the job names with orch and torch importable, sees the run directory, and (the first
host) can open the rendezvous port. Each problem is reported naming its host, all hosts at once.

The probe is one ssh round trip per host, all hosts in parallel; it also returns the host's first
address (``hostname -I``, as DeepSpeed's launcher picks the master address), the rendezvous
endpoint when the spec does not name one.
"""
from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import dataclass

from ...errors import UserError
from .remote import ssh_argv

PROBE_TIMEOUT_S = 60.0
MARK = "orch-probe:"

# Runs on the host with the job's python: argv = run dir, port to try ("" = none).
PROBE_PY = r"""
import importlib.util, json, os, socket, sys
run_dir, port = sys.argv[1], sys.argv[2]
found = {m: importlib.util.find_spec(m) is not None for m in ("orchestrator", "torch")}
free = None
if port:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the c10d store binds it: TIME_WAIT is fine
    try:
        s.bind(("", int(port))); free = True
    except OSError:
        free = False
    finally:
        s.close()
print("orch-probe:" + json.dumps({"hostname": socket.gethostname(), "modules": found,
      "run_dir": os.path.isdir(run_dir), "port_free": free, "python": sys.version.split()[0]}))
"""


@dataclass(frozen=True)
class HostFacts:
    host: str
    hostname: str
    address: str


def probe_command(workdir: str, python: str, run_dir: str, port: int | None) -> str:
    q = shlex.quote
    return (f"cd -- {q(workdir)} 2>/dev/null || {{ echo {MARK}no-workdir; exit 0; }}; "
            f"command -v -- {q(python)} >/dev/null 2>&1 || {{ echo {MARK}no-python; exit 0; }}; "
            f"echo {MARK}addr $(hostname -I 2>/dev/null); "
            f"exec {q(python)} -c {q(PROBE_PY)} {q(run_dir)} {q(str(port or ''))}")


def ssh_problem(host: str, code: int, stderr: str) -> str:
    """What an ssh failure (exit 255) means, in one line naming the host."""
    text = stderr.strip()
    last = text.splitlines()[-1] if text else f"ssh exited with {code}"
    if "IDENTIFICATION HAS CHANGED" in text or "has changed and you have requested strict" in text \
            or ("Host key for" in text and "has changed" in text):
        return (f"{host}: host key does not match known_hosts (possible man-in-the-middle, or the host "
                f"was reinstalled); check it, then update known_hosts (ssh-keygen -R {host})")
    if "host key is known" in text or "Host key verification failed" in text:
        return f"{host}: host key is not in known_hosts; add it after checking it (ssh {host} once)"
    if "Permission denied" in text:
        return f"{host}: ssh authentication failed ({last}); set up key-based login (ssh-copy-id {host})"
    return f"{host}: unreachable over ssh ({last})"


def _facts(host: str, workdir: str, python: str, run_dir: str, port: int | None,
           code: int, out: str, err: str) -> HostFacts | str:
    lines = [line[len(MARK):] for line in out.splitlines() if line.startswith(MARK)]
    if code == 255 or not lines:
        return ssh_problem(host, code, err) if code == 255 else f"{host}: probe failed ({err.strip()[-300:]})"
    if lines[0] == "no-workdir":
        return f"{host}: working directory {workdir} does not exist there; set ssh.workdir"
    if lines[0] == "no-python":
        return f"{host}: python {python!r} not found; set ssh.python to the interpreter with orch installed"
    address = lines[0].removeprefix("addr").split()[:1]
    try:
        facts = json.loads(lines[-1])
    except ValueError:
        return f"{host}: {python} could not run the probe: {err.strip()[-300:]}"
    missing = [m for m, ok in facts["modules"].items() if not ok]
    if missing:
        return (f"{host}: {python} cannot import {', '.join(missing)}; install orch there "
                f"(pip install orch) or set ssh.python")
    if not facts["run_dir"]:
        return (f"{host}: the run directory {run_dir} is not visible there; orch's ssh backend needs the run "
                f"directory (ORCH_HOME) on a filesystem every host shares, as checkpoints do")
    if facts["port_free"] is False:
        return f"{host}: rendezvous port {port} is in use there; set rdzv_port to a free port"
    return HostFacts(host, facts["hostname"], address[0] if address else "")


def preflight(hosts: list[str], ssh_options: list[str], workdir: str, python: str, run_dir: str,
              rdzv_port: int | None) -> list[HostFacts]:
    """Probe every host in parallel; a UserError naming each failing host, or each host's facts."""
    procs = {}
    for i, host in enumerate(hosts):
        command = probe_command(workdir, python, run_dir, rdzv_port if i == 0 else None)
        procs[host] = subprocess.Popen(ssh_argv(host, [*ssh_options, "-o", "ConnectTimeout=10"], command),
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    results: list[HostFacts | str] = []
    for i, (host, proc) in enumerate(procs.items()):
        try:
            out, err = proc.communicate(timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            results.append(f"{host}: no answer over ssh within {PROBE_TIMEOUT_S:.0f} s")
            continue
        results.append(_facts(host, workdir, python, run_dir, rdzv_port if i == 0 else None,
                              proc.returncode, out, err))
    problems = [r for r in results if isinstance(r, str)]
    if problems:
        raise UserError("ssh preflight failed; nothing was started:\n  " + "\n  ".join(problems))
    return [r for r in results if isinstance(r, HostFacts)]
