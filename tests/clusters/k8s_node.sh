#!/usr/bin/env bash
# The `kubernetes` tier's own cluster: one real Kubernetes 1.20 node on this machine.
#
#   tests/clusters/k8s_node.sh install   # Debian packages (Go, etcd, containerd, runc, CNI plugins, debootstrap)
#   tests/clusters/k8s_node.sh build     # kube-apiserver/kubelet/kube-scheduler/kube-controller-manager (cached)
#   tests/clusters/k8s_node.sh images    # pause + orch images, built offline (only orch's thin layer per tree change)
#   tests/clusters/k8s_node.sh start     # etcd, API server, containerd, kubelet, scheduler, controller-manager, DNS
#   tests/clusters/k8s_node.sh up        # all of the above, each step skipped when already done
#   tests/clusters/k8s_node.sh stop      # stops what start started (by pid) and the pods' containers
#   tests/clusters/k8s_node.sh clean     # stop + remove the node's state (and with --all the caches too)
#   tests/clusters/k8s_node.sh status    # prints whether the node is Ready
#
# Why each piece is built this way (no registry, no Docker engine, no kube binaries in Debian):
# - the binaries come from Debian 12's `kubernetes` source package (1.20.2): one `make WHAT=...` for
#   all four, with Debian's reflect2 1.0.2 swapped into vendor/ (the vendored 1.0.1 breaks on Go >= 1.18);
#   ~8 CPU-minutes once (284 s on an idle 2-core machine, far longer under load), then cached in $ORCH_K8S_CACHE/bin (360 MB);
# - images are layer tars packed as OCI archives (tests/clusters/k8s_image.py) and imported with
#   `ctr`: a minimal debootstrap'ed bookworm + a venv with torch (CPU), cached; orch's other
#   dependencies, cached by their requirements; and a thin layer holding orch's wheel of the current
#   tree. The first two are imported once per node (k8s.local/orch-base, orch-deps); orch.tar holds
#   only the thin layer and names the others by digest, so a tree change re-imports a few MB;
# - containerd needs `restrict_oom_score_adj = true` here (no CAP_SYS_RESOURCE: every sandbox fails
#   without it); the kubelet keeps the machine's own node name and address (a loopback --node-ip is
#   refused) and makes no host-wide iptables chains; it evicts pods for memory only (the disk is
#   shared with the rest of the machine, whose use must not evict the tests' pods);
# - pods get bridge-CNI addresses; there is no kube-proxy and no CoreDNS, so tests/clusters/k8s_dns.py
#   answers *.svc.cluster.local (headless Services -> pod IPs) from the API and is the kubelet's clusterDNS.
# The PyTorchJob operator double (tests/clusters/pytorchjob_operator.py) runs inside the test session.
#
# Needs root. Environment:
#   ORCH_K8S_CACHE  binaries + base images (default /var/cache/orch-k8s; reused by ../shared apiserver.sh)
#   ORCH_K8S_WORK   source tree, Go cache and rootfs while building (default /var/tmp/orch-k8s-work)
#   ORCH_K8S_NODE   the running node's state, logs and kubeconfig (default /tmp/orch-k8s-node)
#   ORCH_K8S_NODE_PORT  API server port (default 16543; etcd uses 23890/23900)
#   ORCH_K8S_IMAGE      the orch image's name (default k8s.local/orch:dev)
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

make_binaries() {  # make_binaries SRC cmd/NAME...: one `make WHAT=...` of Debian's source tree
  # providerless: no in-tree cloud providers (AWS/Azure/GCE/vSphere SDKs), about a third less to
  # compile; dockerless: no dockershim in the kubelet (the node runs containerd through CRI);
  # -dwarf=false: no debug info to generate (the binaries are stripped anyway). A static kubelet
  # (CGO off, like the other three) shares every compiled package with them instead of compiling
  # all of them a second time with cgo. The Go cache stays in the source tree's _output, so the
  # second make reuses the first one's packages and an interrupted build resumes where it stopped.
  local src=$1; shift
  (cd "$src" && GOPROXY=off KUBE_STATIC_OVERRIDES=kubelet GOGCFLAGS=-dwarf=false \
     make GOFLAGS=-tags=providerless,dockerless WHAT="$*" \
     KUBE_GIT_VERSION=v$KUBE_VERSION KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20 KUBE_GIT_TREE_STATE=clean \
     KUBE_GIT_COMMIT=0000000000000000000000000000000000000000 GOLDFLAGS="-s -w") >>"$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log" >&2; exit 1; }
  mkdir -p "$BIN"
  local target b
  for target in "$@"; do
    b=$(basename "$target"); cp "$src/_output/bin/$b" "$BIN/$b.tmp" && mv "$BIN/$b.tmp" "$BIN/$b"
  done
}

build() {
  if have_binaries && [ -x "$BIN/pause" ]; then log "binaries cached in $BIN"; return 0; fi
  command -v go >/dev/null || install_packages
  local t0; t0=$(ts)
  fetch_source
  local src=$WORK/src/kubernetes-$KUBE_VERSION
  : > "$WORK/build.log"
  if [ ! -x "$BIN/kube-apiserver" ]; then
    # First on its own, so that the API-server tier (../shared/k8s/apiserver.sh caches the same
    # binary under kube-apiserver-$KUBE_VERSION) can start while the other three build.
    log "building kube-apiserver $KUBE_VERSION (~3-4 min on 2 idle cores, first time only; log: $WORK/build.log)"
    make_binaries "$src" cmd/kube-apiserver
    [ -e "$CACHE/kube-apiserver-$KUBE_VERSION" ] \
      || { cp "$BIN/kube-apiserver" "$CACHE/kube-apiserver-$KUBE_VERSION.tmp" \
           && mv "$CACHE/kube-apiserver-$KUBE_VERSION.tmp" "$CACHE/kube-apiserver-$KUBE_VERSION"; }
    log "kube-apiserver built in $(( $(ts) - t0 )) s"
  fi
  if ! have_binaries; then
    log "building kubelet kube-scheduler kube-controller-manager (~2 min more; log: $WORK/build.log)"
    make_binaries "$src" cmd/kubelet cmd/kube-scheduler cmd/kube-controller-manager
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

orch_requirements() {  # orch's other dependencies, from pyproject.toml: they go into the deps layer
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

export_tree() {  # the tree orch's image is built from: the working tree, or ORCH_K8S_IMAGE_FROM's commit
  local dest=$1; mkdir -p "$dest"
  if [ -n "${ORCH_K8S_IMAGE_FROM:-}" ]; then
    git -C "$REPO" archive "$ORCH_K8S_IMAGE_FROM" | tar -x -C "$dest"
  elif git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -co --exclude-standard -z | rsync -a --from0 --files-from=- ./ "$dest/")
  else
    rsync -a --exclude .venv --exclude .git --exclude build --exclude runs "$REPO/" "$dest/"
  fi
}

SITE=opt/venv/lib/python3.11/site-packages

pack_layer() {  # pack_layer DIR OUT: a deterministic tar of DIR (same files, same digest)
  find "$1" -exec touch -h -d @0 {} +
  tar -C "$1" --sort=name --numeric-owner --owner=0 --group=0 --mtime=@0 -cf "$2.tmp" . && mv "$2.tmp" "$2"
}

deps_layer() {  # deps_layer SRC BASE: orch's other dependencies as a layer, cached by requirements + base
  local reqs; reqs=$(orch_requirements "$1")
  local key; key=$(printf '%s\n%s\n' "$reqs" "$(basename "$2")" | sha256sum | cut -c1-12)
  local out=$IMAGES/deps-$key.layer.tar
  if [ ! -f "$out" ]; then
    local T; T=$(mktemp -d "$WORK/deps.XXXX")
    printf '%s\n' "$reqs" > "$T/requirements.txt"
    host_pip install -q --no-compile --target "$T/layer/$SITE" -r "$T/requirements.txt" 2>&1 | grep -v 'is ignored' >&2 || true
    rm -rf "$T/layer/$SITE/bin"
    pack_layer "$T/layer" "$out"; rm -rf "$T"
    log "dependency layer built ($(du -sh "$out" | cut -f1))"
  fi
  echo "$out"
}

orch_layer() {  # orch_layer SRC OUT: orch's wheel of SRC as a thin layer
  local T; T=$(mktemp -d "$WORK/orch.XXXX")
  host_pip wheel -q --no-deps -w "$T/wheel" "$1" 2>&1 | grep -v "is ignored" >&2 || true
  host_pip install -q --no-deps --no-compile --target "$T/layer/$SITE" "$T"/wheel/orch-*.whl >/dev/null
  # what would make two builds of the same tree differ: the wheel's temporary path, console scripts
  rm -rf "$T/layer/$SITE/bin" "$T/layer/$SITE"/*.dist-info/direct_url.json "$T/layer/$SITE"/*.dist-info/REQUESTED
  mkdir -p "$T/layer/opt/venv/bin"
  printf '#!/opt/venv/bin/python\nfrom orchestrator.cli import app\napp()\n' > "$T/layer/opt/venv/bin/orch"
  chmod 755 "$T/layer/opt/venv/bin/orch"
  pack_layer "$T/layer" "$2"; rm -rf "$T"
}

# The orch image is three layers: base (Debian + torch, 1.4 GB), deps (orch's other dependencies),
# orch (the wheel, a few MB). The first two travel once, as the images k8s.local/orch-base:<key>
# and orch-deps:<key> that import_images streams in; orch.tar holds only the thin layer and names
# the other two by digest, so a changed tree costs a wheel build and a few-MB import.
images() {
  mkdir -p "$IMAGES" "$WORK"
  pause_image
  local base; base=$(base_layer)
  local T; T=$(mktemp -d "$WORK/tree.XXXX")
  export_tree "$T/src"
  local deps; deps=$(deps_layer "$T/src" "$base")
  orch_layer "$T/src" "$T/orch.layer.tar"
  local base_name; base_name=k8s.local/orch-base:$(basename "$base" .layer.tar | cut -d- -f2)
  local deps_name; deps_name=k8s.local/orch-deps:$(basename "$deps" .layer.tar | cut -d- -f2)
  local image=${ORCH_K8S_IMAGE:-k8s.local/orch:dev}
  local key; key=$image-$(sha256sum "$T/orch.layer.tar" | cut -c1-12)-$deps_name
  if [ "$(cat "$IMAGES/orch.key" 2>/dev/null)" != "$key" ] || [ ! -f "$IMAGES/orch.tar" ]; then
    python3 "$HERE/k8s_image.py" "$image" "$IMAGES/orch.tar" "$base" "$deps" \
      "$T/orch.layer.tar" --present "$base" --present "$deps" --env PYTHONUNBUFFERED=1 >/dev/null
    printf '%s %s %s %s\n' "$base_name" "$base" "$deps_name" "$deps" > "$IMAGES/orch.base"
    echo "$key" > "$IMAGES/orch.key"
    log "orch image packed ($key)"
  else
    log "orch image unchanged ($key)"
  fi
  rm -rf "$T"
  [ -S "$SOCK" ] && import_images || true
}

ctr_() { ctr -a "$SOCK" -n k8s.io "$@"; }

import_once() {  # import_once NAME LAYER... [--present LAYER]: stream an image in unless containerd has it
  local name=$1; shift
  ctr_ image ls -q | grep -qxF "$name" && return 0
  local t0; t0=$(ts)
  python3 "$HERE/k8s_image.py" "$name" - "$@" | ctr_ image import - >/dev/null
  log "imported $name in $(( $(ts) - t0 )) s (once per node)"
}

import_base() {  # the base layer, then base + deps, as images of their own (orch.tar names both by digest)
  local base_name base deps_name deps
  read -r base_name base deps_name deps < "$IMAGES/orch.base" 2>/dev/null || return 0
  import_once "$base_name" "$base"
  import_once "$deps_name" "$base" "$deps" --present "$base"
}

import_images() {  # the base once, then every archive that changed since containerd last saw it
  import_base
  local tar mark
  for tar in "$IMAGES"/pause.tar "$IMAGES"/orch.tar; do
    [ -f "$tar" ] || continue
    mark=$NODE/ctrd/imported.$(basename "$tar").key
    [ "$(stat -c %Y-%s "$tar")" = "$(cat "$mark" 2>/dev/null)" ] && continue
    local t0; t0=$(ts)
    ctr_ image import "$tar" >/dev/null
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
# memory only: the disk is the machine's, shared with whatever else runs there, and a moment of
# someone else's disk use must not evict the tests' pods (nodefs/imagefs thresholds would)
evictionHard: {memory.available: "100Mi"}
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
  api /api/v1/nodes | python3 -c 'import json,sys; n=json.load(sys.stdin)["items"]; sys.exit(0 if n and all(c["status"]=="True" for x in n for c in x["status"]["conditions"] if c["type"]=="Ready") else 1)' 2>/dev/null
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
