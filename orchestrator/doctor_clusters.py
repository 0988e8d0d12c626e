"""``orch doctor``'s cluster rows: Slurm, Kubernetes and Helm, each saying what is true.

"Installed" and "usable" are different facts: ``sbatch`` on PATH with no slurm.conf to read (a
laptop with the client package, a container without the cluster's config) cannot submit, and a
kubernetes client without a kubeconfig cannot reach a cluster. Each row names which of those
holds and what to set; the raw error texts of the tools (Slurm's DNS SRV lookup lines, a
client's stack of connection errors) are read here, never shown.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from .doctor_probe import NO_CONFIG, UNREACHABLE, Probe

SLURM_CONF_FILES = ("/etc/slurm/slurm.conf", "/etc/slurm-llnl/slurm.conf", "/usr/local/etc/slurm.conf")
SLURM_FIX = "set SLURM_CONF or run on a login node"
# What Slurm's commands print when they find no slurm.conf and no configless (DNS SRV) controller
_NO_SLURM_CONFIG = re.compile(r"Could not establish a configuration source|resolve_ctls_from_dns_srv|"
                              r"fetch_config|_establish_config_source|Unable to process configuration file|"
                              r"slurm\.conf.*No such file", re.I)
_NO_CONTROLLER = re.compile(r"Unable to contact slurm controller|Slurmctld\(\w+\) at \S+ is DOWN|"
                            r"Socket timed out|Connection refused|Zero Bytes were transmitted", re.I)


def _run(args: list[str]) -> tuple[int, str]:
    """Exit status and stdout+stderr of a short command (rc 124 when it did not answer in 10 s)."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return 124, f"`{' '.join(args)}` did not answer within 10 s"
    return done.returncode, (done.stdout + "\n" + done.stderr).strip()


def slurm_config_source() -> str | None:
    """The slurm.conf the commands would read ($SLURM_CONF, then the usual paths), if there is one."""
    conf = os.environ.get("SLURM_CONF")
    if conf:
        return conf if Path(conf).is_file() else None
    return next((p for p in SLURM_CONF_FILES if Path(p).is_file()), None)


def slurm() -> Probe:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        return Probe("slurm", False, "sbatch not found on PATH; --cluster slurm needs Slurm's client "
                     "commands (run orch on a login node)", optional=True)
    rc, text = _run([sbatch, "--version"])
    if rc != 0 or not text:
        return _slurm_unusable(sbatch, text)
    version = text.splitlines()[0]
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return Probe("slurm", False, f"sbatch ({version}) installed, but scontrol is not on PATH; "
                     "orch needs Slurm's client commands together", optional=True)
    rc, ping = _run([scontrol, "ping"])
    if rc == 0 and re.search(r"\bis UP\b", ping):
        controller = re.search(r"at (\S+) is UP", ping)
        where = f"controller {controller.group(1)} up" if controller else "controller up"
        return Probe("slurm", True, f"{version}, {where} (config: {slurm_config_source() or 'configless'})",
                     optional=True)
    return _slurm_unusable(sbatch, ping, version)


def _slurm_unusable(sbatch: str, text: str, version: str = "") -> Probe:
    """Why installed Slurm commands cannot submit, in orch's words (never Slurm's DNS error lines)."""
    where = f"(sbatch: {sbatch}{f', {version}' if version else ''})"
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():
        return Probe("slurm", False, f"installed, but SLURM_CONF={conf} does not exist; point it at the "
                     f"cluster's slurm.conf or unset it {where}", optional=True, problem=NO_CONFIG)
    if _NO_SLURM_CONFIG.search(text) or (not text and slurm_config_source() is None):
        return Probe("slurm", False, f"installed, no cluster configuration found; {SLURM_FIX} {where}",
                     optional=True, problem=NO_CONFIG)
    source = f"config: {slurm_config_source() or 'configless'}"
    if _NO_CONTROLLER.search(text):
        return Probe("slurm", False, f"installed and configured ({source}), but the Slurm controller does "
                     f"not answer; check `scontrol ping` (is slurmctld running and reachable?) {where}",
                     optional=True, problem=UNREACHABLE)
    return Probe("slurm", False, f"installed ({source}), but Slurm refuses to work: {_last_message(text)} "
                 f"{where}", optional=True, problem=UNREACHABLE)


def _last_message(text: str) -> str:
    """The last line a Slurm command printed, without its ``sbatch: error:`` prefix."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "no message"
    return re.sub(r"^\w+: (fatal|error): ", "", lines[-1])


def kubernetes() -> Probe:
    try:
        import kubernetes as k8s
    except ImportError:
        return Probe("kubernetes", False, "python client missing; pip install kubernetes (orch's dependency) "
                     "to use --cluster kubernetes", optional=True)
    from .backends.kubernetes.client import connect, kubeconfig_path
    from .errors import UserError

    client_version = f"client {k8s.__version__}"
    try:
        conn = connect()
    except UserError as exc:
        if "no kubeconfig found" in str(exc):
            return Probe("kubernetes", False, f"{client_version} installed, no kubeconfig found at "
                         f"{kubeconfig_path()}; set KUBECONFIG (or create ~/.kube/config, e.g. with your "
                         "cloud's `get-credentials` command)", optional=True, problem=NO_CONFIG)
        return Probe("kubernetes", False, f"{client_version}; {str(exc).splitlines()[0]}; check it with "
                     "`kubectl config view`", optional=True, problem=NO_CONFIG)
    from kubernetes import client

    try:
        version = client.VersionApi(conn.api_client).get_code(_request_timeout=5)
    except Exception as exc:
        return Probe("kubernetes", False, f"{client_version}, context {conn.context!r}: the API server at "
                     f"{conn.server} does not answer ({exc.__class__.__name__}); is the cluster up, is "
                     "the kubeconfig current?", optional=True, problem=UNREACHABLE)
    return Probe("kubernetes", True, f"context {conn.context!r} reachable, server {version.git_version} "
                 f"({client_version})", optional=True)


def helm() -> Probe:
    path = shutil.which("helm")
    if path is None:
        return Probe("helm", False, "helm not installed; needed only to install charts/orch-job with helm "
                     "(`orch submit --cluster kubernetes` does not use it)", optional=True)
    rc, text = _run([path, "version", "--short"])
    if rc != 0 or not text:
        return Probe("helm", False, f"installed ({path}), but `helm version` fails: {_last_message(text)}",
                     optional=True, problem=UNREACHABLE)
    return Probe("helm", True, f"{text.splitlines()[0]} (helm install uses the kubeconfig of the "
                 f"kubernetes row; {path})", optional=True)
