#!/usr/bin/env bash
# The `kubernetes` tier's own cluster: one real Kubernetes 1.20 node on this machine.
#
#   tests/clusters/k8s_node.sh install   # Debian packages (Go, etcd, containerd, runc, CNI plugins, debootstrap)
#   tests/clusters/k8s_node.sh build     # kube-apiserver/kubelet/kube-scheduler/kube-controller-manager (cached)
#   tests/clusters/k8s_node.sh images    # pause + torch base + orch images, built offline (cached but orch's layer)
#   tests/clusters/k8s_node.sh start     # etcd, API server, containerd, kubelet, scheduler, controller-manager, DNS
#   tests/clusters/k8s_node.sh up        # all of the above, each step skipped when already done
#   tests/clusters/k8s_node.sh stop      # stops what start started (by pid) and the pods' containers
#   tests/clusters/k8s_node.sh clean     # stop + remove the node's state (and with --all the caches too)
#   tests/clusters/k8s_node.sh status    # prints whether the node is Ready
#
# Why each piece is built this way (no registry, no Docker engine, no kube binaries in Debian):
# - the binaries come from Debian 12's `kubernetes` source package (1.20.2): one `make WHAT=...` for
#   all four, with Debian's reflect2 1.0.2 swapped into vendor/ (the vendored 1.0.1 breaks on Go >= 1.18);
#   ~25 min of 2 CPUs once, then cached in $ORCH_K8S_CACHE/bin (360 MB);
# - images are rootfs directories packed as docker-archives and imported with `ctr`: a minimal
#   debootstrap'ed bookworm + a venv with torch (CPU) and orch's dependencies (cached), and a thin
#   layer on top holding orch's wheel of the current tree (rebuilt when the tree changes);
# - containerd needs `restrict_oom_score_adj = true` here (no CAP_SYS_RESOURCE: every sandbox fails
#   without it); the kubelet keeps the machine's own node name and address (a loopback --node-ip is
#   refused) and makes no host-wide iptables chains;
# - pods get bridge-CNI addresses; there is no kube-proxy and no CoreDNS, so tests/clusters/k8s_dns.py
#   answers *.svc.cluster.local (headless Services -> pod IPs) from the API and is the kubelet's clusterDNS.
# The test operator (tests/orchestrator/pytorchjob_operator.py) runs inside the test session.
#
# Needs root. Environment:
#   ORCH_K8S_CACHE  binaries + base images (default /var/cache/orch-k8s; reused by ../shared apiserver.sh)
#   ORCH_K8S_WORK   source tree, Go cache and rootfs while building (default /var/tmp/orch-k8s-work)
#   ORCH_K8S_NODE   the running node's state, logs and kubeconfig (default /tmp/orch-k8s-node)
#   ORCH_K8S_NODE_PORT  API server port (default 16543; etcd uses 23890/23900)
#   ORCH_K8S_IMAGE_FROM a git revision to build orch's image layer from (default: the working tree)
set -euo pipefail

HERE=${ORCH_K8S_SCRIPT_DIR:-$(cd "$(dirname "$0")" && pwd)}
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${ORCH_K8S_CACHE:-/var/cache/orch-k8s}
WORK=${ORCH_K8S_WORK:-/var/tmp/orch-k8s-work}
NODE=${ORCH_K8S_NODE:-/tmp/orch-k8s-node}
APORT=${ORCH_K8S_NODE_PORT:-16543}
EPORT=23890; PPORT=23900
KUBE_VERSION=1.20.2
BIN=$CACHE/bin
IMAGES=$CACHE/images
BINARIES="kube-apiserver kubelet kube-scheduler kube-controller-manager"
PACKAGES="golang-go etcd-server rsync golang-github-modern-go-reflect2-dev containerd runc containernetworking-plugins debootstrap"
SOCK=$NODE/ctrd/containerd.sock
DNS_IP=10.244.0.1  # the bridge's gateway address: pods reach the DNS responder there

log() { echo "k8s_node: $*" >&2; }
ts() { date +%s; }

# --------------------------------------------------------------------------------------------
# install, build
# --------------------------------------------------------------------------------------------
install_packages() {
  local missing=""
  for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  [ -z "$missing" ] && { log "packages present"; return 0; }
  log "installing$missing"
  apt-get update -qq >/dev/null
  # policy-rc.d: the package scripts must not start a host-wide containerd or etcd service
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null \
    || { rm -f /usr/sbin/policy-rc.d; log "apt-get install failed"; exit 1; }
  rm -f /usr/sbin/policy-rc.d
}

have_binaries() { for b in $BINARIES; do [ -x "$BIN/$b" ] || return 1; done; }

fetch_source() {
  local src=$WORK/src/kubernetes-$KUBE_VERSION
  [ -d "$src/cmd/kubelet" ] && return 0
  if ! grep -rqs '^Types: deb-src' /etc/apt/sources.list.d/ 2>/dev/null; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > /etc/apt/sources.list.d/orch-deb-src.sources
    apt-get update -qq >/dev/null
  fi
  mkdir -p "$WORK/src"
  (cd "$WORK/src" && apt-get source --download-only kubernetes >/dev/null 2>&1 \
     && tar xzf kubernetes_*.orig.tar.gz)
  rm -rf "$src/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src/vendor/github.com/modern-go/"
  rm -f "$src/vendor/github.com/modern-go/reflect2/go.mod"
}

build() {
  if have_binaries && [ -x "$BIN/pause" ]; then log "binaries cached in $BIN"; return 0; fi
  command -v go >/dev/null || install_packages
  local t0; t0=$(ts)
  fetch_source
  local src=$WORK/src/kubernetes-$KUBE_VERSION
  if ! have_binaries; then
    log "building $BINARIES $KUBE_VERSION (~25 min on 2 cores, first time only; log: $WORK/build.log)"
    # providerless: no in-tree cloud providers (AWS/Azure/GCE/vSphere SDKs), about a third less to
    # compile; a static kubelet (CGO off, like the other three) shares every compiled package with
    # them instead of compiling all of them a second time with cgo. The Go cache stays in the
    # source tree's _output, so an interrupted build resumes where it stopped.
    (cd "$src" && GOPROXY=off KUBE_STATIC_OVERRIDES=kubelet make GOFLAGS=-tags=providerless \
       WHAT="cmd/kube-apiserver cmd/kubelet cmd/kube-scheduler cmd/kube-controller-manager" \
       KUBE_GIT_VERSION=v$KUBE_VERSION KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20 KUBE_GIT_TREE_STATE=clean \
       KUBE_GIT_COMMIT=0000000000000000000000000000000000000000 GOLDFLAGS="-s -w") >"$WORK/build.log" 2>&1 \
      || { tail -30 "$WORK/build.log" >&2; exit 1; }
    mkdir -p "$BIN"
    for b in $BINARIES; do cp "$src/_output/bin/$b" "$BIN/$b.tmp" && mv "$BIN/$b.tmp" "$BIN/$b"; done
    # ../shared/k8s/apiserver.sh (the API-only tier) caches the same binary under this name
    [ -e "$CACHE/kube-apiserver-$KUBE_VERSION" ] || cp "$BIN/kube-apiserver" "$CACHE/kube-apiserver-$KUBE_VERSION"
  fi
  gcc -Os -static -o "$BIN/pause" "$src/build/pause/linux/pause.c"
  log "binaries built in $(( $(ts) - t0 )) s"
  # the source tree and Go cache (3.3 GB) are only needed to build
  [ "${ORCH_K8S_KEEP_SOURCE:-0}" = 1 ] || rm -rf "$WORK/src"
}

# --------------------------------------------------------------------------------------------
# images (offline: rootfs -> layer tars -> docker-archive -> ctr import)
# --------------------------------------------------------------------------------------------
host_pip() { if [ -x "$REPO/.venv/bin/pip" ]; then "$REPO/.venv/bin/pip" "$@"; else python3 -m pip "$@"; fi; }

base_requirements() {  # the base layer: torch (CPU) + numpy, pinned as CI installs them; its cache key
  printf 'torch==2.13.0\nnumpy\n'
}

orch_requirements() {  # orch's other dependencies, from pyproject.toml: they go into orch's own layer
  python3 -c 'import tomllib,sys; d=tomllib.load(open(sys.argv[1]+"/pyproject.toml","rb"))["project"]["dependencies"]; print("\n".join(x for x in d if not x.startswith(("torch","numpy"))))' "$1"
}

pause_image() {
  [ -f "$IMAGES/pause.tar" ] && return 0
  [ -x "$BIN/pause" ] || { log "no $BIN/pause: run '$0 build' first"; exit 1; }
  local T; T=$(mktemp -d "$WORK/pause.XXXX"); cp "$BIN/pause" "$T/pause"
  tar -C "$T" --numeric-owner --owner=0 --group=0 -cf "$T/layer.tar" pause
  python3 "$HERE/k8s_image.py" k8s.local/pause:1 "$IMAGES/pause.tar" "$T/layer.tar" --env PATH=/ --entrypoint /pause >/dev/null
  rm -rf "$T"
}

base_layer() {  # prints the cached layer's path; debootstrap + venv with torch only when the key changed
  local key; key=$(base_requirements | sha256sum | cut -c1-12)
  local out=$IMAGES/base-$key.layer.tar
  if [ ! -f "$out" ]; then
    local t0; t0=$(ts); local R=$WORK/rootfs
    log "base image: debootstrap bookworm + venv with torch (~5 min, cached)"
    rm -rf "$R"
    debootstrap --variant=minbase --include=python3,python3-venv,procps bookworm "$R" \
      "${ORCH_K8S_DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$R" python3 -m venv /opt/venv
    mkdir -p "$R/tmp/wheels"; base_requirements > "$R/tmp/wheels/requirements.txt"
    # wheels are fetched on the host: the chroot has no CA bundle for pip
    host_pip download -q -d "$R/tmp/wheels" -r "$R/tmp/wheels/requirements.txt" 2>&1 | grep -v 'is ignored' >&2 || true
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$R" /opt/venv/bin/pip install --no-cache-dir -q \
      --no-index --find-links /tmp/wheels -r /tmp/wheels/requirements.txt
    rm -rf "$R/tmp/wheels" "$R"/var/cache/apt/*.bin "$R"/var/lib/apt/lists/* "$R"/usr/share/doc "$R"/usr/share/man
    tar -C "$R" --numeric-owner -cf "$out.tmp" . && mv "$out.tmp" "$out"
    rm -rf "$R"
    log "base image layer built in $(( $(ts) - t0 )) s ($(du -sh "$out" | cut -f1))"
  fi
  echo "$out"
}

orch_layer() {  # orch's wheel of the working tree as a thin layer (deterministic: same tree, same digest)
  local T=$1
  mkdir -p "$T/src" "$T/layer/opt/venv/bin"
  if [ -n "${ORCH_K8S_IMAGE_FROM:-}" ]; then  # a commit instead of the working tree
    git -C "$REPO" archive "$ORCH_K8S_IMAGE_FROM" | tar -x -C "$T/src"
  elif git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -co --exclude-standard -z | rsync -a --from0 --files-from=- ./ "$T/src/")
  else
    rsync -a --exclude .venv --exclude .git --exclude build --exclude runs "$REPO/" "$T/src/"
  fi
  host_pip wheel -q --no-deps -w "$T/wheel" "$T/src" 2>&1 | grep -v "is ignored" >&2 || true
  local site=$T/layer/opt/venv/lib/python3.11/site-packages
  orch_requirements "$T/src" > "$T/requirements.txt"
  host_pip install -q --no-compile --target "$site" -r "$T/requirements.txt" 2>&1 | grep -v 'is ignored' >&2 || true
  host_pip install -q --no-deps --no-compile --target "$site" "$T"/wheel/orch-*.whl >/dev/null
  # what would make two builds of the same tree differ: the wheel's temporary path, console scripts
  rm -rf "$site/bin" "$site"/*.dist-info/direct_url.json "$site"/*.dist-info/REQUESTED
  printf '#!/opt/venv/bin/python\nfrom orchestrator.cli import app\napp()\n' > "$T/layer/opt/venv/bin/orch"
  chmod 755 "$T/layer/opt/venv/bin/orch"
  find "$T/layer" -exec touch -h -d @0 {} +
  tar -C "$T/layer" --sort=name --numeric-owner --owner=0 --group=0 --mtime=@0 -cf "$T/orch.layer.tar" .
}

images() {
  mkdir -p "$IMAGES" "$WORK"
  pause_image
  local base; base=$(base_layer)
  local T; T=$(mktemp -d "$WORK/orch.XXXX")
  orch_layer "$T"
  local key; key=$(sha256sum "$T/orch.layer.tar" | cut -c1-12)-$(basename "$base" .layer.tar)
  if [ "$(cat "$IMAGES/orch.key" 2>/dev/null)" != "$key" ] || [ ! -f "$IMAGES/orch.tar" ]; then
    python3 "$HERE/k8s_image.py" "${ORCH_K8S_IMAGE:-k8s.local/orch:dev}" "$IMAGES/orch.tar" "$base" "$T/orch.layer.tar" \
      --env PYTHONUNBUFFERED=1 >/dev/null
    echo "$key" > "$IMAGES/orch.key"
    log "orch image packed ($key)"
  else
    log "orch image unchanged ($key)"
  fi
  rm -rf "$T"
  [ -S "$SOCK" ] && import_images || true
}

import_images() {  # import every image whose archive changed since containerd last saw it
  local tar mark
  for tar in "$IMAGES"/pause.tar "$IMAGES"/orch.tar; do
    [ -f "$tar" ] || continue
    mark=$NODE/ctrd/imported.$(basename "$tar").key
    [ "$(stat -c %Y-%s "$tar")" = "$(cat "$mark" 2>/dev/null)" ] && continue
    local t0; t0=$(ts)
    ctr -a "$SOCK" -n k8s.io image import "$tar" >/dev/null
    stat -c %Y-%s "$tar" > "$mark"
    log "imported $(basename "$tar") in $(( $(ts) - t0 )) s"
  done
}

# --------------------------------------------------------------------------------------------
# start, stop, clean
# --------------------------------------------------------------------------------------------
token() { cut -d, -f1 "$NODE/pki/tokens.csv"; }
api() { curl -sf --max-time 5 --cacert "$NODE/pki/ca.crt" -H "Authorization: Bearer $(token)" "https://127.0.0.1:$APORT$1"; }
python_for_tools() { command -v python3; }

write_configs() {
  mkdir -p "$NODE/ctrd/cni/net.d" "$NODE/ctrd/opt" "$NODE/pki" "$NODE/logs"
  cat > "$NODE/ctrd/config.toml" <<EOF
version = 2
root = "$NODE/ctrd/root"
state = "$NODE/ctrd/state"
[grpc]
  address = "$SOCK"
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "k8s.local/pause:1"
    # no CAP_SYS_RESOURCE in this sandbox: without it every pod sandbox fails to start
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "$NODE/ctrd/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "$NODE/ctrd/opt"
EOF
  cat > "$NODE/ctrd/cni/net.d/10-bridge.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "k8snode", "plugins": [
  {"type": "bridge", "bridge": "k8snode0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24", "gateway": "$DNS_IP"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$NODE/ctrd/cni/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
  cat > "$NODE/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: 20250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 20248
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
failSwapOn: false
resolvConf: /etc/resolv.conf
clusterDomain: cluster.local
clusterDNS: ["$DNS_IP"]
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
serializeImagePulls: false
makeIPTablesUtilChains: false
EOF
}

make_pki() {
  [ -f "$NODE/pki/tokens.csv" ] && return 0
  local P=$NODE/pki
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=orch-k8s-node-ca -keyout $P/ca.key -out $P/ca.crt 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout $P/apiserver.key -out $P/apiserver.csr 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > $P/ext.cnf
  openssl x509 -req -in $P/apiserver.csr -CA $P/ca.crt -CAkey $P/ca.key -CAcreateserial -days 30 \
    -extfile $P/ext.cnf -out $P/apiserver.crt 2>/dev/null
  openssl genrsa -out $P/sa.key 2048 2>/dev/null; openssl rsa -in $P/sa.key -pubout -out $P/sa.pub 2>/dev/null
  echo "$(head -c16 /dev/urandom | od -An -tx1 | tr -d ' \n'),admin,admin,system:masters" > $P/tokens.csv
  token > $P/admin.token
}

spawn() {  # spawn NAME CMD...: background, pid file, log under $NODE/logs
  local name=$1; shift
  "$@" >"$NODE/logs/$name.log" 2>&1 &
  echo $! > "$NODE/$name.pid"
}

wait_for() {  # wait_for SECONDS WHAT CMD...
  local n=$(( $1 * 2 )) what=$2; shift 2
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  log "$what did not come up; logs in $NODE/logs"; return 1
}

start_control_plane() {
  rm -rf "$NODE/etcd-data"
  spawn etcd etcd --name orch-k8s-node --data-dir "$NODE/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$EPORT" --advertise-client-urls "http://127.0.0.1:$EPORT" \
    --listen-peer-urls "http://127.0.0.1:$PPORT" --initial-advertise-peer-urls "http://127.0.0.1:$PPORT" \
    --initial-cluster "orch-k8s-node=http://127.0.0.1:$PPORT" --unsafe-no-fsync
  local P=$NODE/pki
  spawn apiserver "$BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$EPORT" --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 --secure-port="$APORT" --insecure-port=0 --tls-cert-file=$P/apiserver.crt \
    --tls-private-key-file=$P/apiserver.key --client-ca-file=$P/ca.crt --token-auth-file=$P/tokens.csv \
    --authorization-mode=Node,RBAC --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file=$P/sa.pub --service-account-signing-key-file=$P/sa.key \
    --service-cluster-ip-range=10.0.0.0/24 --endpoint-reconciler-type=none --cert-dir="$NODE/certs" \
    --kubelet-preferred-address-types=Hostname,InternalIP
  cat > "$NODE/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: orch-k8s-node, cluster: {server: "https://127.0.0.1:$APORT", certificate-authority: $P/ca.crt}}]
users: [{name: admin, user: {token: "$(token)"}}]
contexts: [{name: orch-k8s-node, context: {cluster: orch-k8s-node, user: admin, namespace: default}}]
current-context: orch-k8s-node
KC
  wait_for 120 kube-apiserver api /readyz
}

start_node_agents() {
  local KC=$NODE/kubeconfig
  # the bridge exists before the first pod so that the DNS responder can listen on its gateway address
  ip link show k8snode0 >/dev/null 2>&1 || ip link add k8snode0 type bridge
  ip addr show dev k8snode0 | grep -q "$DNS_IP/24" || ip addr add "$DNS_IP/24" dev k8snode0
  ip link set k8snode0 up
  spawn dns "$(python_for_tools)" "$HERE/k8s_dns.py" --server "https://127.0.0.1:$APORT" --ca "$NODE/pki/ca.crt" \
    --token-file "$NODE/pki/admin.token" --listen "$DNS_IP:53"
  spawn containerd containerd --config "$NODE/ctrd/config.toml"
  wait_for 30 containerd test -S "$SOCK"
  import_images
  spawn kubelet "$BIN/kubelet" --config="$NODE/kubelet-config.yaml" --kubeconfig="$KC" --root-dir="$NODE/kubelet" \
    --cert-dir="$NODE/kubelet/pki" --container-runtime=remote --container-runtime-endpoint="unix://$SOCK" \
    --image-service-endpoint="unix://$SOCK" --pod-infra-container-image=k8s.local/pause:1 --v=1
  spawn kube-scheduler "$BIN/kube-scheduler" --kubeconfig="$KC" --authentication-kubeconfig="$KC" \
    --authorization-kubeconfig="$KC" --leader-elect=false --port=0 --bind-address=127.0.0.1 --secure-port=20259 \
    --cert-dir="$NODE/sched-certs"
  spawn kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig="$KC" --authentication-kubeconfig="$KC" \
    --authorization-kubeconfig="$KC" --leader-elect=false --port=0 --bind-address=127.0.0.1 --secure-port=20257 \
    --cert-dir="$NODE/kcm-certs" --use-service-account-credentials=false \
    --service-account-private-key-file="$NODE/pki/sa.key" --root-ca-file="$NODE/pki/ca.crt" \
    --controllers='*,-nodeipam,-cloud-node-lifecycle,-route,-service'
}

node_ready() {
  api /api/v1/nodes | python3 -c 'import json,sys; n=json.load(sys.stdin)["items"]; sys.exit(0 if n and all(c["status"]=="True" for x in n for c in x["status"]["conditions"] if c["type"]=="Ready") else 1)'
}

default_service_account() { api /api/v1/namespaces/default/serviceaccounts/default; }

start() {
  have_binaries && [ -f "$IMAGES/orch.tar" ] && [ -f "$IMAGES/pause.tar" ] \
    || { log "binaries or images missing: run '$0 build' and '$0 images' (or '$0 up')"; exit 1; }
  if [ -f "$NODE/kubeconfig" ] && node_ready; then log "node already running: KUBECONFIG=$NODE/kubeconfig"; return 0; fi
  stop_processes
  local t0; t0=$(ts)
  write_configs; make_pki
  start_control_plane || { stop_processes; exit 1; }
  start_node_agents
  wait_for 120 "node Ready" node_ready || { stop_processes; exit 1; }
  wait_for 60 "default service account" default_service_account || { stop_processes; exit 1; }
  log "node Ready in $(( $(ts) - t0 )) s: KUBECONFIG=$NODE/kubeconfig"
}

remove_pods() {  # every pod's containers: through containerd while it runs, else their shims
  if [ -S "$SOCK" ] && [ -f "$NODE/containerd.pid" ] && kill -0 "$(cat "$NODE/containerd.pid")" 2>/dev/null; then
    local task
    for task in $(ctr -a "$SOCK" -n k8s.io task ls -q 2>/dev/null); do
      ctr -a "$SOCK" -n k8s.io task kill -s SIGKILL "$task" >/dev/null 2>&1 || true
    done
  fi
  local pid
  for pid in $(pgrep -f "containerd-shim-runc-v2 -namespace k8s.io .*-address $SOCK" 2>/dev/null); do
    kill -9 "$pid" 2>/dev/null || true
  done
}

stop_processes() {
  local p pid
  for p in kube-controller-manager kube-scheduler kubelet; do stop_pid "$p"; done
  remove_pods
  for p in containerd dns apiserver etcd; do stop_pid "$p"; done
}

stop_pid() {
  [ -f "$NODE/$1.pid" ] || return 0
  local pid; pid=$(cat "$NODE/$1.pid"); kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true; rm -f "$NODE/$1.pid"
}

unmount_under() {  # deepest first
  local dir
  for dir in $(awk -v root="$1" 'index($2, root) == 1 {print $2}' /proc/mounts | sort -r); do
    umount "$dir" 2>/dev/null || umount -l "$dir" 2>/dev/null || true
  done
}

clean() {
  stop_processes
  unmount_under "$NODE/"; unmount_under /var/lib/kubelet/; unmount_under /run/containerd/
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '/^cni-/ {print $1}'); do ip netns delete "$ns" 2>/dev/null || true; done
  ip link delete k8snode0 2>/dev/null || true
  local cg
  for cg in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods /sys/fs/cgroup/*/k8s.io; do
    [ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  rm -rf "$NODE" /var/log/pods /var/log/containers /var/lib/kubelet
  if [ "${1:-}" = --all ]; then rm -rf "$CACHE" "$WORK"; log "removed $CACHE and $WORK"; fi
  log "cleaned"
}

case "${1:-}" in
  install) install_packages ;;
  build) install_packages; build ;;
  images) images ;;
  base-image) mkdir -p "$IMAGES" "$WORK"; base_layer ;;
  start) start ;;
  up) install_packages; build; images; start ;;
  stop) stop_processes; unmount_under "$NODE/kubelet/"; log "stopped" ;;
  clean) clean "${2:-}" ;;
  status) if [ -f "$NODE/kubeconfig" ] && node_ready; then echo "Ready: KUBECONFIG=$NODE/kubeconfig"; else echo "not running"; exit 1; fi ;;
  *) echo "usage: $0 install|build|images|start|up|stop|clean [--all]|status" >&2; exit 2 ;;
esac
