#!/usr/bin/env bash
# Builds (once) the real components Palisade's tests and demo run against, into
# ${XDG_CACHE_HOME:-$HOME/.cache}/palisade. Idempotent: each piece is skipped when
# its stamp matches the pinned version, so a second run is instant.
#
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet
#                  from a wrapper Go module over k8s.io/kubernetes
#   containerd, runc, curl, CNI plugins   from Debian (apt), for the real nodes of `make e2e`
#   etcd           from a wrapper Go module over go.etcd.io/etcd/server/v3
#   moto[server]   pinned, in a Python venv
#   iptables, ipset, nftables, iproute2, conntrack   from Debian (apt)
#   helm, kwok     by `go install`, pinned
#   promtool       by `go install`, pinned, without the service-discovery
#                  plugins (`-tags remove_all_sd`: minutes less to build)
#   gitops-check   our kstatus / Argo CD health runner (hack/gitops-check)
#   actionlint     by `go install`, pinned: lints .github/workflows
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-v1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
MOTO_VERSION="${MOTO_VERSION:-5.2.5}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
# Prometheus 3.x publishes its Go module as v0.3MM.P (v0.316.0 is 3.16.0).
PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-v0.316.0}"
ACTIONLINT_VERSION="${ACTIONLINT_VERSION:-v1.7.12}"

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/palisade"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$CACHE/bin"
mkdir -p "$BIN" "$CACHE/src"
log() { printf '[testbin] %s\n' "$*" >&2; }
stamp_ok() { [[ -f "$BIN/.$1.stamp" && "$(cat "$BIN/.$1.stamp")" == "$2" ]]; }
stamp() { printf '%s' "$2" >"$BIN/.$1.stamp"; }

apt_tools() {
  local want=(iptables ipset nftables iproute2 conntrack containerd runc curl containernetworking-plugins)
  local missing=()
  for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  log "apt-get install ${missing[*]}"
  if [[ $(id -u) -ne 0 ]]; then log "need root to install ${missing[*]}"; return 1; fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The wrapper module over k8s.io/kubernetes: the staging modules (k8s.io/api,
# apimachinery, ...) are replaced by relative paths inside k8s.io/kubernetes'
# own go.mod; a consumer must map each to its published v0.Y.Z. Read the list
# from that go.mod. Every command we build is imported by tools.go.
KUBE_CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet)
kube_module() {
  local dir=$1 modjson gomod minor
  modjson=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION")
  gomod=$(printf '%s' "$modjson" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  minor="v0.${KUBE_VERSION#v1.}"
  {
    echo "module palisade.dev/testbin/kube"
    echo
    echo "go $(go env GOVERSION | sed 's/^go//; s/^\([0-9]*\.[0-9]*\).*/\1/')"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" | awk -v v="$minor" '{print "replace " $1 " => " $1 " " v}'
  } >"$dir/go.mod"
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    for c in "${KUBE_CMDS[@]}"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$c"; done
    printf ')\n'
  } >"$dir/tools.go"
  (cd "$dir" && GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1) || true
}

kube_build() { # dir cmd...
  local dir=$1
  shift
  local major="${KUBE_VERSION#v}"; major="${major%%.*}"
  local kminor="${KUBE_VERSION#v*.}"; kminor="${kminor%%.*}"
  local ld="-s -w" pkgs=()
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$kminor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  for c in "$@"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
  (cd "$dir" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -tags tools -ldflags "$ld" -o "$BIN/" "${pkgs[@]}")
}

kube() {
  stamp_ok kube "$KUBE_VERSION" && [[ -x "$BIN/kube-apiserver" ]] && return 0
  local dir="$CACHE/src/kube-$KUBE_VERSION"
  mkdir -p "$dir"
  log "building Kubernetes $KUBE_VERSION (first time: several minutes)"
  kube_module "$dir"
  kube_build "$dir" kube-apiserver kube-controller-manager kube-scheduler kubectl
  stamp kube "$KUBE_VERSION"
}

# The kubelet of the real nodes `make e2e` runs (about a minute on a warm Go
# cache; its own stamp, so machines that built the rest earlier add only it).
kubelet() {
  stamp_ok kubelet "$KUBE_VERSION" && [[ -x "$BIN/kubelet" ]] && return 0
  local dir="$CACHE/src/kube-$KUBE_VERSION"
  mkdir -p "$dir"
  log "building kubelet $KUBE_VERSION"
  grep -q cmd/kubelet "$dir/tools.go" 2>/dev/null || kube_module "$dir"
  kube_build "$dir" kubelet
  stamp kubelet "$KUBE_VERSION"
}

etcd() {
  stamp_ok etcd "$ETCD_VERSION" && [[ -x "$BIN/etcd" ]] && return 0
  local dir="$CACHE/src/etcd-$ETCD_VERSION"
  mkdir -p "$dir"
  log "building etcd $ETCD_VERSION"
  (
    cd "$dir"
    cat >go.mod <<GOMOD
module palisade.dev/testbin/etcd

go $(go env GOVERSION | sed 's/^go//; s/^\([0-9]*\.[0-9]*\).*/\1/')

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
    cat >main.go <<'GO'
// Command etcd is the upstream etcd server, built from its published module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
    GOFLAGS=-mod=mod go mod tidy >/dev/null
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" .
  )
  stamp etcd "$ETCD_VERSION"
}

moto() {
  stamp_ok moto "$MOTO_VERSION" && [[ -x "$CACHE/venv/bin/moto_server" ]] && return 0
  log "installing moto[server]==$MOTO_VERSION into $CACHE/venv"
  python3 -m venv "$CACHE/venv"
  "$CACHE/venv/bin/pip" install -q --disable-pip-version-check "moto[server,ec2]==$MOTO_VERSION"
  stamp moto "$MOTO_VERSION"
}

# `go install` of a published command into $BIN, pinned; any further
# arguments are extra `go install` flags.
go_tool() { # name package version [flags...]
  local name=$1 pkg=$2 version=$3
  shift 3
  stamp_ok "$name" "$version" && [[ -x "$BIN/$name" ]] && return 0
  log "building $name $version"
  GOBIN="$BIN" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "$@" "$pkg@$version"
  stamp "$name" "$version"
}
helm() { go_tool helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"; }
kwok() { go_tool kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"; }
# Checks and unit-tests the chart's PrometheusRule (tests/observability.rs).
promtool() { go_tool promtool github.com/prometheus/prometheus/cmd/promtool "$PROMETHEUS_VERSION" -tags remove_all_sd; }
# Lints the release workflow (`make lint-workflows`).
actionlint() { go_tool actionlint github.com/rhysd/actionlint/cmd/actionlint "$ACTIONLINT_VERSION"; }

# Our own test tool: reads objects as Flux's kstatus and Argo CD's Lua health
# checks do (see hack/gitops-check/main.go). Rebuilt when its source changes.
gitops_check() {
  local src="$ROOT/hack/gitops-check" sum
  sum=$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -c1-16)
  stamp_ok gitops-check "$sum" && [[ -x "$BIN/gitops-check" ]] && return 0
  log "building gitops-check (kstatus + gopher-lua)"
  (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$BIN/gitops-check" .)
  stamp gitops-check "$sum"
}

want=("$@")
((${#want[@]})) || want=(apt_tools etcd moto kube kubelet gitops_check helm kwok promtool actionlint)
for w in "${want[@]}"; do "$w"; done
log "ready in $CACHE"
