"""Connecting to a Kubernetes cluster the way kubectl does, and turning its refusals into advice.

The kubeconfig is found as kubectl finds it (``$KUBECONFIG``, which may list several files, else
``~/.kube/config``; inside a pod, the pod's service account), its current context is used unless
``ORCH_KUBE_CONTEXT`` names another, and the context's namespace is the default namespace.
Every API error becomes a ``UserError`` that names the object, what the server said, and the fix.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import UserError

REQUEST_TIMEOUT_S = 30  # no API call may hang a command forever
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass
class Connection:
    """An API client plus where it points (for messages and the default namespace)."""

    api_client: Any
    namespace: str
    context: str      # context name, or "in-cluster"
    server: str

    def custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api_client)

    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client)


def kubeconfig_path() -> str:
    """``$KUBECONFIG`` (possibly several files joined by ':') or ``~/.kube/config``."""
    return os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())


def connect(kubeconfig: str | None = None, context: str | None = None) -> Connection:
    """A client for the kubeconfig's context (or the in-cluster service account)."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    path = kubeconfig or kubeconfig_path()
    context = context or os.environ.get("ORCH_KUBE_CONTEXT") or None
    configuration = client.Configuration()
    files = [p for p in path.split(os.pathsep) if p]
    if not any(Path(p).expanduser().exists() for p in files):
        if os.environ.get("KUBERNETES_SERVICE_HOST") and kubeconfig is None:
            try:
                config.load_incluster_config(client_configuration=configuration)
            except ConfigException as exc:
                raise UserError(f"cannot use the pod's service account: {exc}") from None
            namespace = SA_NAMESPACE_FILE.read_text().strip() if SA_NAMESPACE_FILE.exists() else "default"
            return Connection(client.ApiClient(configuration), namespace, "in-cluster", configuration.host)
        raise UserError(f"no kubeconfig found at {path}",
                        hint="set KUBECONFIG=/path/to/kubeconfig (or create ~/.kube/config, e.g. with your "
                             "cloud's `get-credentials` command)")
    try:
        contexts, active = config.list_kube_config_contexts(config_file=path)
        if context is not None:
            chosen = next((c for c in contexts if c["name"] == context), None)
            if chosen is None:
                names = ", ".join(c["name"] for c in contexts) or "none"
                raise UserError(f"kubeconfig {path} has no context {context!r} (contexts: {names})",
                                hint="fix ORCH_KUBE_CONTEXT, or unset it to use the current context")
            active = chosen
        config.load_kube_config(config_file=path, context=context, client_configuration=configuration,
                                persist_config=False)
    except ConfigException as exc:
        raise UserError(f"kubeconfig {path}: {exc}",
                        hint="check it with `kubectl config view`; choose a context with "
                             "`kubectl config use-context NAME` or ORCH_KUBE_CONTEXT") from None
    namespace = (active.get("context") or {}).get("namespace") or "default"
    return Connection(client.ApiClient(configuration), namespace, active["name"], configuration.host)


def _server_message(exc: Any) -> tuple[str, dict[str, Any]]:
    """The API server's own message and the Status body (empty if the body is not a Status)."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    if not isinstance(body, dict):
        body = {}
    return str(body.get("message") or exc.reason or "").strip(), body


def api_error(exc: Exception, *, action: str, kind: str, name: str, namespace: str,
              conn: Connection | None = None) -> UserError:
    """A clear UserError for an API exception raised while ``action``-ing ``kind`` ``name``.

    ``action`` is the verb as a user would say it: "create", "read", "delete", "list".
    """
    from kubernetes.client.exceptions import ApiException

    where = f"{kind} {namespace}/{name}" if name else f"{kind}s in namespace {namespace}"
    ctx = f" (context {conn.context}, server {conn.server})" if conn else ""
    if not isinstance(exc, ApiException):  # connection refused, DNS, TLS, timeouts
        reason = getattr(exc, "reason", None) or exc
        return UserError(f"cannot reach the Kubernetes API server{ctx} to {action} {where}: {reason}",
                         hint="is the cluster up and is this the right context? "
                              "`kubectl config current-context`, `kubectl cluster-info`")
    message, body = _server_message(exc)
    status = exc.status
    if status == 401:
        return UserError(f"the API server did not accept your credentials{ctx}: {message}",
                         hint="your token or certificate may have expired: refresh the kubeconfig")
    if status == 403:
        return UserError(f"not allowed to {action} {where}{ctx}: {message}",
                         hint=f"ask a cluster admin for a Role in namespace {namespace} that allows "
                              "create/get/list/delete on pytorchjobs.kubeflow.org and configmaps and get/list "
                              "on pods and pods/log, or set kubernetes.namespace to a namespace you may use")
    if status == 404:
        details = body.get("details") or {}
        if details.get("kind") == "namespaces":
            return UserError(f"namespace {namespace!r} does not exist{ctx}, so cannot {action} {where}",
                             hint=f"create it (`kubectl create namespace {namespace}`) or set "
                                  "kubernetes.namespace in the job spec to an existing one")
        if action in ("create", "list") and not details.get("name"):
            return UserError(f"the cluster{ctx} does not serve {kind} (kubeflow.org/v1): {message}",
                             hint="install the Kubeflow training operator v1.9 (its manifests bring the "
                                  "PyTorchJob CRD), or check that this context is the training cluster")
        return UserError(f"{where} not found{ctx}",
                         hint="it was deleted (by `kubectl delete`, or by runPolicy.ttlSecondsAfterFinished), "
                              "or the kubeconfig now points at another cluster or namespace")
    if status == 409:
        return UserError(f"{where} already exists{ctx}",
                         hint=f"a job with this name is still there: cancel it (`orch cancel JOB_ID` or "
                              f"`kubectl delete {kind.lower()} {name} -n {namespace}`), or submit under "
                              "another name with --set name=NEW-NAME")
    if status == 422:
        causes = [f"{c.get('field', '?')}: {c.get('message', '')}"
                  for c in (body.get("details") or {}).get("causes") or []]
        listed = "\n  ".join(causes) if causes else message
        return UserError(f"the API server rejected {where} as invalid{ctx}:\n  {listed}",
                         hint="fix the field(s) named above in the job spec's kubernetes: section; "
                              "`orch render --cluster kubernetes` shows the manifest")
    return UserError(f"the API server refused to {action} {where}{ctx}: HTTP {status} {message}")
