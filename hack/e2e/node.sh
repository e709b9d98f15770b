#!/usr/bin/env bash
# One real Kubernetes node for `make e2e`: containerd + kubelet, started by
# src/testenv/kubelet.rs as
#
#   nsenter --net=/run/netns/NODE unshare --mount --propagation private -- bash node.sh DIR
#
# so everything here runs in the node's network namespace and in a private
# mount namespace that dies with its last process. DIR/node.env (written by
# the harness) gives NODE, NODE_IP, POD_CIDR, PROVIDER_ID, LABELS,
# CGROUP_ROOT, KUBECONFIG_FILE, KUBELET and IMAGES (image archives to import).
#
# The kubelet would change the machine; inside this mount namespace it can't:
# - /var/lib, /var/log, /run and /usr/lib (hard-coded kubelet and containerd
#   paths, and the chart's hostPaths: /run/xtables.lock, /lib/modules) are
#   overlays whose writes land in DIR;
# - the host-wide sysctls the kubelet insists on (vm.overcommit_memory,
#   kernel.panic, …) are covered by read-only files holding the values it
#   wants, and protectKernelDefaults makes a mismatch fatal instead of a write;
# - its cgroups live under CGROUP_ROOT, which the harness removes after.
set -euo pipefail
D=$1
# shellcheck source=/dev/null
. "$D/node.env"
log() { printf '[node %s %s] %s\n' "$NODE" "$(date +%T.%N | cut -c1-12)" "$*"; }

for p in /var/lib /var/log /run /usr/lib; do
  o="$D/overlay/${p//\//_}"
  mkdir -p "$o/upper" "$o/work"
  mount -t overlay overlay -o "lowerdir=$p,upperdir=$o/upper,workdir=$o/work" "$p"
done

declare -A want=(
  [vm/overcommit_memory]=1 [vm/panic_on_oom]=0 [kernel/panic]=10 [kernel/panic_on_oops]=1
  [kernel/keys/root_maxkeys]=1000000 [kernel/keys/root_maxbytes]=25000000
)
mkdir -p "$D/sysctl"
for k in "${!want[@]}"; do
  f="/proc/sys/$k"
  [[ $(cat "$f") == "${want[$k]}" ]] && continue
  v="$D/sysctl/${k//\//.}"
  echo "${want[$k]}" >"$v"
  mount --bind "$v" "$f"
  mount -o remount,bind,ro "$f"
done

for h in /sys/fs/cgroup/*/; do
  mkdir -p "$h${CGROUP_ROOT#/}"
  if [[ -f ${h}cpuset.cpus ]]; then
    cat "${h}cpuset.cpus" >"$h${CGROUP_ROOT#/}/cpuset.cpus"
    cat "${h}cpuset.mems" >"$h${CGROUP_ROOT#/}/cpuset.mems"
  fi
done

SOCK="$D/containerd.sock"
mkdir -p "$D/cni/net.d" "$D/kubelet" "$D/volume-plugins"
# Pods that are not host-network get an address from POD_CIDR on a bridge
# in the node's namespace, which is their gateway: to the node's addresses,
# including the apiserver's and moto's forwarders at the `kubernetes`
# Service address. No masquerading (no iptables rules from the CNI).
CNI_BIN=/usr/lib/cni
cat >"$D/cni/net.d/10-bridge.conflist" <<JSON
{"cniVersion": "0.4.0", "name": "palisade-e2e", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$D/cni/ipam"}}]}
JSON
cat >"$D/containerd.toml" <<TOML
version = 2
root = "$D/containerd/root"
state = "$D/containerd/state"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/palisade/pause:e2e"
  # Lowering oom_score_adj needs CAP_SYS_RESOURCE, which root may lack.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$D/cni/net.d"
TOML
cat >"$D/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
# Reachable only on the test network; the apiserver never calls it.
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://$SOCK
cgroupDriver: cgroupfs
cgroupRoot: $CGROUP_ROOT
failCgroupV1: false
failSwapOn: false
# Else the kubelet adds KUBE-* chains the agent would see.
makeIPTablesUtilChains: false
maxOpenFiles: 20000
protectKernelDefaults: true
volumePluginDir: $D/volume-plugins
# The machine's disk is shared: no evictions, no image garbage collection.
evictionHard: {memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
YAML

log "containerd"
containerd --config "$D/containerd.toml" >"$D/containerd.log" 2>&1 &
for _ in $(seq 100); do [[ -S $SOCK ]] && break; sleep 0.1; done
[[ -S $SOCK ]] || { log "containerd did not start"; tail -20 "$D/containerd.log"; exit 1; }
imports=()
for image in $IMAGES; do
  ctr --address "$SOCK" -n k8s.io images import "$image" >>"$D/import.log" 2>&1 &
  imports+=($!)
done
for j in "${imports[@]}"; do
  wait "$j" || { log "image import failed"; cat "$D/import.log"; exit 1; }
done
log "images imported"

"$KUBELET" --config="$D/kubelet.yaml" --kubeconfig="$KUBECONFIG_FILE" \
  --hostname-override="$NODE" --node-ip="$NODE_IP" --provider-id="$PROVIDER_ID" \
  --node-labels="$LABELS" --root-dir="$D/kubelet" --cert-dir="$D/kubelet/pki" \
  >"$D/kubelet.log" 2>&1 &
log "kubelet started"
# Whichever stops first takes the node down.
wait -n
log "containerd or kubelet exited"
kill $(jobs -p) 2>/dev/null || true
exit 1
