"""A test double of the Kubeflow training-operator's PyTorchJob controller (kubeflow.org/v1).

The real operator (Go, controller-runtime) cannot be built on the test machines, so the
`kubernetes` tier runs this double. It implements the v1 PyTorchJob contract as the operator's
source defines it, and nothing else. Followed: kubeflow/training-operator, branch release-1.9
(v1.9.x), files

  pkg/apis/kubeflow.org/v1/pytorch_types.go, pytorch_defaults.go, common_types.go   defaults, names, labels
  pkg/controller.v1/pytorch/pytorchjob_controller.go   Reconcile, UpdateJobStatus (conditions per replica type)
  pkg/controller.v1/pytorch/envvar.go, master.go, elastic.go   the pod environment
  pkg/controller.v1/pytorch/initcontainer.go           workers wait for the master's name (template is configurable)
  pkg/controller.v1/common/job.go, pod.go, service.go  ReconcileJobs, ReconcilePods, ReconcileServices, cleanup
  pkg/core/job.go, pod.go, status.go, pkg/util/status.go, pkg/util/train/train_util.go
                                                       backoff limit, restart policy, replica statuses, conditions

What it does, as the operator does: one pod and one headless Service per replica
(`<job>-<type>-<index>`, owned by the job with controller=true so that deleting the job garbage
collects both); the env MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK + PET_MASTER_*/PET_NODE_RANK (when a
Master exists), PET_NPROC_PER_NODE, PET_NNODES, and for elasticPolicy PET_RDZV_ENDPOINT (default
`<job>-worker-0:<worker port>`), PET_RDZV_BACKEND, PET_RDZV_ID, PET_RDZV_CONF, PET_MAX_RESTARTS,
PET_STANDALONE; restart policies (OnFailure/Always/ExitCode delete a Failed pod so it is recreated,
ExitCode fails the job on exit codes < 128, Never fails it); runPolicy cleanPodPolicy,
backoffLimit, activeDeadlineSeconds, ttlSecondsAfterFinished, suspend; status conditions
Created/Running/Restarting/Succeeded/Failed/Suspended, replicaStatuses, start/completion times.

Differences that do not change the contract: it polls the API every `--interval` seconds instead
of watching through an informer cache (so it needs no expectations bookkeeping), it records no
Events or metrics, and it has no gang scheduling, HPA or PodGroups (not used by orch's jobs).

    python -m tests.clusters.pytorchjob_operator --kubeconfig KUBECONFIG --init-container-image IMAGE
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import time
from typing import Any

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTROLLER_NAME = "pytorchjob-controller"
DEFAULT_CONTAINER, DEFAULT_PORT_NAME, DEFAULT_PORT = "pytorch", "pytorchjob-port", 23456
LABEL_OPERATOR = "training.kubeflow.org/operator-name"
LABEL_JOB = "training.kubeflow.org/job-name"
LABEL_TYPE = "training.kubeflow.org/replica-type"
LABEL_INDEX = "training.kubeflow.org/replica-index"
LABEL_ROLE = "training.kubeflow.org/job-role"
MANAGED_BY_OPERATOR = "kubeflow.org/training-operator"

# initcontainer.go's default template runs `nslookup` in alpine:3.10; the operator takes another
# template from --pytorch-init-container-template-file. The test images have python, not nslookup.
INIT_CONTAINER_COMMAND = ("err=1;for i in $(seq {max_tries}); do if python -c 'import socket,sys; "
                          "socket.gethostbyname(sys.argv[1])' {master}; then err=0 && break; fi;"
                          "echo waiting for master; sleep 2; done; exit $err")

log = logging.getLogger("pytorchjob-operator")


def now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> float:
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc).timestamp()


# --------------------------------------------------------------------------------------------
# defaults (pytorch_defaults.go) and names (common/util.go GenGeneralName, envvar.go replicaName)
# --------------------------------------------------------------------------------------------

def camel_replica_types(specs: dict[str, Any]) -> dict[str, Any]:
    """setPyTorchTypeNamesToCamelCase: "master"/"WORKER" keys become "Master"/"Worker"."""
    out = {}
    for key, value in specs.items():
        out[key.capitalize() if key.lower() in ("master", "worker") else key] = value
    return out


def container_port(template: dict[str, Any]) -> int | None:
    for container in template.get("spec", {}).get("containers", []):
        if container.get("name") == DEFAULT_CONTAINER:
            for port in container.get("ports") or []:
                if port.get("name") == DEFAULT_PORT_NAME:
                    return int(port["containerPort"])
    return None


def set_defaults(job: dict[str, Any]) -> dict[str, Any]:
    """SetDefaults_PyTorchJob on a copy: cleanPodPolicy, replicas, restartPolicy, port, elastic, nproc."""
    job = copy.deepcopy(job)
    spec = job["spec"]
    spec.setdefault("runPolicy", {}).setdefault("cleanPodPolicy", "None")
    spec["pytorchReplicaSpecs"] = camel_replica_types(spec.get("pytorchReplicaSpecs") or {})
    for replica in spec["pytorchReplicaSpecs"].values():
        replica.setdefault("replicas", 1)
        replica.setdefault("restartPolicy", "OnFailure")
        if container_port(replica.get("template", {})) is None:
            for container in replica.get("template", {}).get("spec", {}).get("containers", []):
                if container.get("name") == DEFAULT_CONTAINER:
                    container.setdefault("ports", []).append(
                        {"name": DEFAULT_PORT_NAME, "containerPort": DEFAULT_PORT})
    elastic = spec.get("elasticPolicy")
    if elastic is not None:
        if elastic.get("maxReplicas") is None and elastic.get("minReplicas") is None:
            workers = spec["pytorchReplicaSpecs"].get("Worker", {}).get("replicas")
            elastic["minReplicas"] = elastic["maxReplicas"] = workers
        elif elastic.get("minReplicas") is None:
            elastic["minReplicas"] = elastic["maxReplicas"]
        elif elastic.get("maxReplicas") is None:
            elastic["maxReplicas"] = elastic["minReplicas"]
    if elastic is None or elastic.get("nProcPerNode") is None:
        spec.setdefault("nprocPerNode", "auto")
    return job


def general_name(job_name: str, rtype: str, index: int | str) -> str:
    return f"{job_name}-{rtype.lower()}-{index}".replace("/", "-")


def job_labels(job_name: str) -> dict[str, str]:
    return {LABEL_OPERATOR: CONTROLLER_NAME, LABEL_JOB: job_name.replace("/", "-")}


# --------------------------------------------------------------------------------------------
# the pod environment (envvar.go setPodEnv, master.go, elastic.go)
# --------------------------------------------------------------------------------------------

def nproc_int(spec: dict[str, Any]) -> int:
    try:
        return int(spec.get("nprocPerNode"))
    except (TypeError, ValueError):
        return 1


def master_env(job: dict[str, Any]) -> list[dict[str, str]]:
    specs = job["spec"]["pytorchReplicaSpecs"]
    port = container_port(specs["Master"]["template"])
    if port is None:
        raise ValueError("port not found")
    addr = general_name(job["metadata"]["name"], "Master", 0)
    return [{"name": "MASTER_PORT", "value": str(port)}, {"name": "PET_MASTER_PORT", "value": str(port)},
            {"name": "MASTER_ADDR", "value": addr}, {"name": "PET_MASTER_ADDR", "value": addr}]


def elastic_env(job: dict[str, Any]) -> list[dict[str, str]]:
    spec, policy = job["spec"], job["spec"]["elasticPolicy"]
    host = policy.get("rdzvHost") or f"{job['metadata']['name']}-worker-0"
    port = policy.get("rdzvPort")
    if port is None:
        port = container_port(spec["pytorchReplicaSpecs"]["Worker"]["template"])
        if port is None:
            raise ValueError("port not found")
    env = [{"name": "PET_RDZV_ENDPOINT", "value": f"{host}:{port}"},
           {"name": "PET_RDZV_BACKEND", "value": policy.get("rdzvBackend") or "c10d"}]
    if policy.get("minReplicas") is None and policy.get("maxReplicas") is None:
        env.append({"name": "PET_NNODES", "value": str(spec["pytorchReplicaSpecs"]["Worker"]["replicas"])})
    else:
        env.append({"name": "PET_NNODES", "value": f"{policy['minReplicas']}:{policy['maxReplicas']}"})
    if policy.get("maxRestarts") is not None:
        env.append({"name": "PET_MAX_RESTARTS", "value": str(policy["maxRestarts"])})
    if policy.get("nProcPerNode") is not None:
        env.append({"name": "PET_NPROC_PER_NODE", "value": str(policy["nProcPerNode"])})
    if policy.get("rdzvId") is not None:
        env.append({"name": "PET_RDZV_ID", "value": policy["rdzvId"]})
    if policy.get("rdzvConf"):
        env.append({"name": "PET_RDZV_CONF", "value": ",".join(f"{c['key']}={c['value']}" for c in policy["rdzvConf"])})
    if policy.get("standalone"):
        env.append({"name": "PET_STANDALONE", "value": ""})
    return env


def pod_env(job: dict[str, Any], rtype: str, index: int) -> list[dict[str, str]]:
    """What setPodEnv appends to every container of a replica's pod, in the operator's order."""
    spec = job["spec"]
    specs = spec["pytorchReplicaSpecs"]
    total = sum(int(r["replicas"]) for r in specs.values())
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if "Master" in specs:
        env += master_env(job)
        rank = index + 1 if rtype == "worker" else index
        env += [{"name": "WORLD_SIZE", "value": str(total * nproc_int(spec))},
                {"name": "RANK", "value": str(rank)}, {"name": "PET_NODE_RANK", "value": str(rank)}]
    if spec.get("nprocPerNode") is not None:
        env.append({"name": "PET_NPROC_PER_NODE", "value": str(spec["nprocPerNode"])})
    if spec.get("elasticPolicy") is not None:
        env += elastic_env(job)
    else:
        env.append({"name": "PET_NNODES", "value": str(total)})
    return env


def init_containers(job: dict[str, Any], image: str, max_tries: int) -> list[dict[str, Any]]:
    """initcontainer.go: workers of a job with a Master wait until the master's name resolves."""
    master = general_name(job["metadata"]["name"], "Master", 0)
    return [{"name": "init-pytorch", "image": image, "imagePullPolicy": "IfNotPresent",
             "resources": {"limits": {"cpu": "100m", "memory": "64Mi"}, "requests": {"cpu": "50m", "memory": "10Mi"}},
             "command": ["sh", "-c", INIT_CONTAINER_COMMAND.format(max_tries=max_tries, master=master)]}]


# --------------------------------------------------------------------------------------------
# status (pkg/util/status.go setCondition/filterOutCondition, core/status.go replica statuses)
# --------------------------------------------------------------------------------------------

def has_condition(status: dict[str, Any], ctype: str) -> bool:
    return any(c["type"] == ctype and c["status"] == "True" for c in status.get("conditions") or [])


def is_finished(status: dict[str, Any]) -> bool:
    return has_condition(status, "Succeeded") or has_condition(status, "Failed")


def update_condition(status: dict[str, Any], ctype: str, value: str, reason: str, message: str) -> None:
    """setCondition: nothing changes once Failed; Running and Restarting replace each other;
    Succeeded/Failed turn Running to False; an unchanged status+reason is left as it is."""
    if has_condition(status, "Failed"):
        return
    conditions = status.get("conditions") or []
    current = next((c for c in conditions if c["type"] == ctype), None)
    if current and current["status"] == value and current.get("reason") == reason:
        return
    stamp = now_rfc3339()
    new = {"type": ctype, "status": value, "reason": reason, "message": message,
           "lastUpdateTime": stamp, "lastTransitionTime": stamp}
    if current and current["status"] == value:
        new["lastTransitionTime"] = current.get("lastTransitionTime", stamp)
    kept = []
    for c in conditions:
        if c["type"] == ctype or {ctype, c["type"]} == {"Running", "Restarting"}:
            continue
        if ctype in ("Failed", "Succeeded") and c["type"] == "Running":
            c = {**c, "status": "False"}
        kept.append(c)
    status["conditions"] = kept + [new]


def reason(name: str) -> str:
    return f"{KIND}{name}"  # commonutil.NewReason(kind, reason)


def count_replica_pod(replica_status: dict[str, int], pod: dict[str, Any]) -> None:
    phase = pod.get("status", {}).get("phase")
    if phase == "Running":
        key = "failed" if pod["metadata"].get("deletionTimestamp") else "active"
    elif phase in ("Succeeded", "Failed"):
        key = phase.lower()
    else:
        return
    replica_status[key] = replica_status.get(key, 0) + 1


def container_exit_code(pod: dict[str, Any]) -> int:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if status.get("name") == DEFAULT_CONTAINER and terminated:
            return int(terminated.get("exitCode", 0))
    return 0xBEEF


# --------------------------------------------------------------------------------------------
# the controller
# --------------------------------------------------------------------------------------------

class PyTorchJobOperator:
    """Reconciles every PyTorchJob in the cluster, one pass per poll."""

    def __init__(self, api_client: Any, init_image: str, init_max_tries: int = 100) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.init_image, self.init_max_tries = init_image, init_max_tries
        self.requeues: dict[str, int] = {}

    # -- API helpers: plain dicts in and out ------------------------------------------------
    def _list(self, call: Any, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        response = call(*args, _preload_content=False, **kwargs)
        return json.loads(response.data)["items"]

    def owned(self, kind: str, job: dict[str, Any]) -> list[dict[str, Any]]:
        ns, uid = job["metadata"]["namespace"], job["metadata"]["uid"]
        selector = ",".join(f"{k}={v}" for k, v in job_labels(job["metadata"]["name"]).items())
        call = self.core.list_namespaced_pod if kind == "pod" else self.core.list_namespaced_service
        items = self._list(call, ns, label_selector=selector)
        return [o for o in items if any(r.get("controller") and r.get("uid") == uid
                                        for r in o["metadata"].get("ownerReferences") or [])]

    def owner_reference(self, job: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": job["metadata"]["name"],
                "uid": job["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}

    def delete(self, kind: str, ns: str, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        call = self.core.delete_namespaced_pod if kind == "pod" else self.core.delete_namespaced_service
        try:
            call(name, ns)
        except ApiException as exc:
            if exc.status != 404:
                raise

    # -- one pass ---------------------------------------------------------------------------
    def run_once(self) -> None:
        for job in self._list(self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL):
            key = f"{job['metadata']['namespace']}/{job['metadata']['name']}"
            try:
                self.reconcile(job)
                self.requeues.pop(key, None)
            except Exception as exc:  # the workqueue retries with backoff; NumRequeues counts them
                self.requeues[key] = self.requeues.get(key, 0) + 1
                log.warning("reconcile %s: %s", key, exc)

    def reconcile(self, raw: dict[str, Any]) -> None:
        if raw["metadata"].get("deletionTimestamp"):
            return
        managed_by = raw["spec"].get("runPolicy", {}).get("managedBy")
        if managed_by and managed_by != MANAGED_BY_OPERATOR:
            return
        job = set_defaults(raw)
        status = copy.deepcopy(raw.get("status") or {})
        if not status.get("conditions"):
            update_condition(status, "Created", "True", reason("Created"),
                             f"PyTorchJob {job['metadata']['name']} is created.")
        self.reconcile_job(job, status)
        if status != (raw.get("status") or {}):  # UpdateJobStatusInApiServer: the whole status, not a merge
            self.custom.replace_namespaced_custom_object_status(
                GROUP, VERSION, job["metadata"]["namespace"], PLURAL, job["metadata"]["name"], {**raw, "status": status})

    def reconcile_job(self, job: dict[str, Any], status: dict[str, Any]) -> None:
        """common/job.go ReconcileJobs."""
        spec, run_policy = job["spec"], job["spec"]["runPolicy"]
        pods, services = self.owned("pod", job), self.owned("service", job)
        if is_finished(status):
            self.clean_up(job, status, pods)
            if has_condition(status, "Succeeded"):
                for replica in (status.get("replicaStatuses") or {}).values():
                    replica["succeeded"] = replica.get("succeeded", 0) + replica.get("active", 0)
                    replica["active"] = 0
            return
        if run_policy.get("suspend"):
            self.delete_pods_and_services(job, status, pods)
            for replica in (status.get("replicaStatuses") or {}).values():
                replica["active"] = 0
            message = f"PyTorchJob {job['metadata']['name']} is suspended."
            if has_condition(status, "Running"):
                update_condition(status, "Running", "False", reason("Suspended"), message)
            update_condition(status, "Suspended", "True", reason("Suspended"), message)
            return
        if has_condition(status, "Suspended"):
            update_condition(status, "Suspended", "False", reason("Resumed"),
                             f"PyTorchJob {job['metadata']['name']} is resumed.")
            status["startTime"] = now_rfc3339()
        failure = self.exceeded_limits(job, status, pods)
        if failure:
            status.setdefault("completionTime", now_rfc3339())
            self.delete_pods_and_services(job, status, pods)
            update_condition(status, "Failed", "True", reason("Failed"), failure)
            return
        for rtype, replica in spec["pytorchReplicaSpecs"].items():
            self.reconcile_pods(job, status, pods, rtype, replica)
            self.reconcile_services(job, services, rtype, replica)
        self.update_job_status(job, status)

    def exceeded_limits(self, job: dict[str, Any], status: dict[str, Any], pods: list[dict[str, Any]]) -> str | None:
        """backoffLimit (new failures, container restarts of running pods) and activeDeadlineSeconds."""
        name, run_policy = job["metadata"]["name"], job["spec"]["runPolicy"]
        replicas = job["spec"]["pytorchReplicaSpecs"]
        limit = run_policy.get("backoffLimit")
        if limit is not None:
            active = sum(1 for p in pods if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")
                         and not p["metadata"].get("deletionTimestamp"))
            failed = sum(1 for p in pods if p.get("status", {}).get("phase") == "Failed")
            total = sum(int(r["replicas"]) for r in replicas.values())
            previous_failed = sum(r.get("failed", 0) for r in (status.get("replicaStatuses") or {}).values())
            retries = self.requeues.get(f"{job['metadata']['namespace']}/{name}", 0)
            exceeds = failed > previous_failed and active != total and retries + 1 > limit
            if exceeds or self.past_backoff_limit(replicas, pods, limit):
                return f"Job {name} has failed because it has reached the specified backoff limit"
        deadline = run_policy.get("activeDeadlineSeconds")
        if deadline is not None and status.get("startTime") and time.time() - parse_time(status["startTime"]) >= deadline:
            return f"Job {name} has failed because it was active longer than specified deadline"
        return None

    @staticmethod
    def past_backoff_limit(replicas: dict[str, Any], pods: list[dict[str, Any]], limit: int) -> bool:
        """core/job.go PastBackoffLimit: container restarts of running pods of restarting replica types."""
        restarts = 0
        for rtype, replica in replicas.items():
            if replica["restartPolicy"] not in ("OnFailure", "Always", "ExitCode"):
                continue
            for pod in pods:
                if pod["metadata"]["labels"].get(LABEL_TYPE) != rtype.lower() or pod["status"].get("phase") != "Running":
                    continue
                for cs in (pod["status"].get("initContainerStatuses") or []) + (pod["status"].get("containerStatuses") or []):
                    restarts += int(cs.get("restartCount", 0))
        return restarts > 0 if limit == 0 else restarts >= limit

    # -- cleanup (common/job.go CleanUpResources, DeletePodsAndServices, CleanupJob) ----------
    def clean_up(self, job: dict[str, Any], status: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        self.delete_pods_and_services(job, status, pods)
        ttl = job["spec"]["runPolicy"].get("ttlSecondsAfterFinished")
        if ttl is not None and status.get("completionTime") and time.time() >= parse_time(status["completionTime"]) + ttl:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, job["metadata"]["namespace"], PLURAL,
                                                        job["metadata"]["name"])

    def delete_pods_and_services(self, job: dict[str, Any], status: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        policy = job["spec"]["runPolicy"]["cleanPodPolicy"]
        if not pods or (is_finished(status) and policy == "None"):
            return
        for pod in pods:
            phase = pod.get("status", {}).get("phase")
            if is_finished(status) and policy == "Running" and phase not in ("Running", "Pending"):
                continue
            self.delete("pod", pod["metadata"]["namespace"], pod["metadata"]["name"])
            self.delete("service", pod["metadata"]["namespace"], pod["metadata"]["name"])

    # -- pods (common/pod.go ReconcilePods, createNewPod) --------------------------------------
    def reconcile_pods(self, job: dict[str, Any], status: dict[str, Any], pods: list[dict[str, Any]],
                       rtype: str, replica: dict[str, Any]) -> None:
        rt, count = rtype.lower(), int(replica["replicas"])
        mine = [p for p in pods if p["metadata"]["labels"].get(LABEL_TYPE) == rt]
        replica_status: dict[str, int] = {}
        status.setdefault("replicaStatuses", {})[rtype] = replica_status  # initializeReplicaStatuses
        slices: dict[int, list[dict[str, Any]]] = {i: [] for i in range(count)}
        for pod in mine:
            try:
                slices.setdefault(int(pod["metadata"]["labels"].get(LABEL_INDEX, "")), []).append(pod)
            except ValueError:
                log.warning("pod %s has no valid replica index", pod["metadata"]["name"])
        for index, found in sorted(slices.items()):
            if len(found) > 1:
                log.warning("too many pods for %s %d", rt, index)
            elif not found:
                if 0 <= index < count:
                    self.create_pod(job, rt, index, replica)
            else:
                self.reconcile_pod(job, status, replica_status, rtype, replica, index, found[0])

    def reconcile_pod(self, job: dict[str, Any], status: dict[str, Any], replica_status: dict[str, int],
                      rtype: str, replica: dict[str, Any], index: int, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        if index < 0 or index >= int(replica["replicas"]):
            self.delete("pod", meta["namespace"], meta["name"])
        exit_code = container_exit_code(pod)
        policy = replica["restartPolicy"]
        if pod.get("status", {}).get("phase") == "Failed":
            retryable = exit_code >= 128  # train_util.IsRetryableExitCode
            if (policy == "ExitCode" and retryable) or policy in ("OnFailure", "Always"):
                log.info("restarting pod %s (exit code %d)", meta["name"], exit_code)
                self.delete("pod", meta["namespace"], meta["name"])
                update_condition(status, "Restarting", "True", reason("Restarting"),
                                 f"job {job['metadata']['name']} is restarting because {rtype} replica(s) failed.")
            elif policy == "ExitCode":
                update_condition(status, "Failed", "True", reason("Failed"),
                                 f'job "{job["metadata"]["name"]}" is failing because "{rtype}" replica(s) failed.')
        count_replica_pod(replica_status, pod)

    def create_pod(self, job: dict[str, Any], rt: str, index: int, replica: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        specs = job["spec"]["pytorchReplicaSpecs"]
        master_role = rt == "master" if "Master" in specs else (rt == "worker" and index == 0)
        labels = {**job_labels(name), LABEL_TYPE: rt, LABEL_INDEX: str(index)}
        if master_role:
            labels[LABEL_ROLE] = "master"
        template = copy.deepcopy(replica["template"])
        meta = template.setdefault("metadata", {})
        meta["name"] = general_name(name, rt, index)
        meta["labels"] = {**(meta.get("labels") or {}), **labels}
        pod_spec = template["spec"]
        extra = pod_env(job, rt, index)
        for container in pod_spec.get("containers", []):
            container["env"] = (container.get("env") or []) + copy.deepcopy(extra)
        if "Master" in specs and rt == "worker":
            pod_spec["initContainers"] = (pod_spec.get("initContainers") or []) + init_containers(
                job, self.init_image, self.init_max_tries)
        if pod_spec.get("restartPolicy"):
            log.warning("Restart policy in pod template will be overwritten by restart policy in replica spec")
        pod_spec["restartPolicy"] = "Never" if replica["restartPolicy"] == "ExitCode" else replica["restartPolicy"]
        meta["ownerReferences"] = [self.owner_reference(job)]
        meta.pop("namespace", None)
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}
        self.core.create_namespaced_pod(job["metadata"]["namespace"], body)
        log.info("created pod %s", meta["name"])

    # -- services (common/service.go ReconcileServices, CreateNewService) ----------------------
    def reconcile_services(self, job: dict[str, Any], services: list[dict[str, Any]], rtype: str,
                           replica: dict[str, Any]) -> None:
        rt, count = rtype.lower(), int(replica["replicas"])
        mine = [s for s in services if s["metadata"]["labels"].get(LABEL_TYPE) == rt]
        slices: dict[int, list[dict[str, Any]]] = {i: [] for i in range(count)}
        for service in mine:
            try:
                slices.setdefault(int(service["metadata"]["labels"].get(LABEL_INDEX, "")), []).append(service)
            except ValueError:
                continue
        for index, found in sorted(slices.items()):
            if len(found) > 1:
                log.warning("too many services for %s %d", rtype, index)
            elif not found:
                self.create_service(job, rtype, replica, index)
            elif index < 0 or index >= count:
                self.delete("service", found[0]["metadata"]["namespace"], found[0]["metadata"]["name"])

    def create_service(self, job: dict[str, Any], rtype: str, replica: dict[str, Any], index: int) -> None:
        labels = {**job_labels(job["metadata"]["name"]), LABEL_TYPE: rtype.lower(), LABEL_INDEX: str(index)}
        ports = []
        for container in replica["template"]["spec"].get("containers", []):
            if container.get("name") == DEFAULT_CONTAINER:
                ports = [{"name": p["name"], "port": int(p["containerPort"])}
                         for p in container.get("ports") or [] if p.get("name")]
        body = {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": general_name(job["metadata"]["name"], rtype, index), "labels": labels,
                             "ownerReferences": [self.owner_reference(job)]},
                "spec": {"clusterIP": "None", "selector": labels, "ports": ports}}
        self.core.create_namespaced_service(job["metadata"]["namespace"], body)

    # -- status (pytorchjob_controller.go UpdateJobStatus) -------------------------------------
    def update_job_status(self, job: dict[str, Any], status: dict[str, Any]) -> None:
        name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
        replicas = job["spec"]["pytorchReplicaSpecs"]
        status.setdefault("startTime", now_rfc3339())
        has_master = "Master" in replicas
        for rtype, replica in replicas.items():
            rs = status.setdefault("replicaStatuses", {}).setdefault(rtype, {})
            labels = {**job_labels(name), LABEL_TYPE: rtype.lower()}
            rs["selector"] = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            count = int(replica["replicas"])
            succeeded, running, failed = rs.get("succeeded", 0), rs.get("active", 0), rs.get("failed", 0)
            expected = count - succeeded
            if has_master and rtype == "Master":
                if running > 0:
                    update_condition(status, "Running", "True", reason("Running"), f"PyTorchJob {name} is running.")
                if expected == 0:
                    status.setdefault("completionTime", now_rfc3339())
                    update_condition(status, "Succeeded", "True", reason("Succeeded"),
                                     f"PyTorchJob {name} is successfully completed.")
                    return
            elif not has_master and rtype == "Worker":
                if expected == 0 or (job["spec"].get("elasticPolicy") is not None and succeeded > 0):
                    status.setdefault("completionTime", now_rfc3339())
                    update_condition(status, "Succeeded", "True", reason("Succeeded"),
                                     f"PyTorchJob {ns}/{name} successfully completed.")
                elif running > 0:
                    update_condition(status, "Running", "True", reason("Running"), f"PyTorchJob {ns}/{name} is running.")
            if failed > 0 and count > succeeded + running:
                if replica["restartPolicy"] != "Never":
                    update_condition(status, "Restarting", "True", reason("Restarting"),
                                     f"PyTorchJob {name} is restarting because {failed} {rtype} replica(s) failed.")
                else:
                    status.setdefault("completionTime", now_rfc3339())
                    update_condition(status, "Failed", "True", reason("Failed"),
                                     f"PyTorchJob {name} is failed because {failed} {rtype} replica(s) failed.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--init-container-image", required=True,
                        help="as the operator's --pytorch-init-container-image (needs sh and python)")
    parser.add_argument("--init-container-max-tries", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from kubernetes import config

    operator = PyTorchJobOperator(config.new_client_from_config(args.kubeconfig), args.init_container_image,
                                  args.init_container_max_tries)
    log.info("reconciling kubeflow.org/v1 PyTorchJobs every %.1f s", args.interval)
    while True:
        operator.run_once()
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
