#!/usr/bin/env bash
# Build (or locate) the local control-plane binaries from the Go module proxy:
#   kube-apiserver, kube-scheduler, kube-controller-manager, kubectl  (k8s/ wrapper module)
#   etcd                                                              (etcd/ wrapper module)
#   kwok                                                              (kwok/ tool module)
#   helm                                                              (helm/ tool module)
#
# Prints the directory holding the binaries as the LAST line of stdout; all progress goes to
# stderr. Binaries live in a versioned cache outside the checkout:
#   ${QJOB_CACHE:-$HOME/.cache/qjob-operator}/bin/<k8s-version>-<hash>
# where <hash> covers the wrapper go.mod/go.sum/main.go files and this script, so editing any of
# them triggers a rebuild into a new folder; an existing folder is reused as is.
#
# Environment:
#   QJOB_K8S_BIN_DIR  use existing binaries from this folder instead of building (must contain
#                     etcd kube-apiserver kube-scheduler kube-controller-manager kubectl kwok helm)
#   QJOB_CACHE        cache root (default $HOME/.cache/qjob-operator)
#   QJOB_BUILD_JOBS   go build -p value (default: number of CPUs)
set -euo pipefail

K8S_VERSION=v1.36.3
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0
BINARIES=(etcd kube-apiserver kube-scheduler kube-controller-manager kubectl kwok helm)

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { echo "build.sh: $*" >&2; }

check_dir() {
  local d="$1" b missing=()
  for b in "${BINARIES[@]}"; do [[ -x "$d/$b" ]] || missing+=("$b"); done
  if ((${#missing[@]})); then
    echo "${missing[*]}"
    return 1
  fi
}

if [[ -n "${QJOB_K8S_BIN_DIR:-}" ]]; then
  if ! missing="$(check_dir "$QJOB_K8S_BIN_DIR")"; then
    log "QJOB_K8S_BIN_DIR=$QJOB_K8S_BIN_DIR lacks: $missing"
    exit 1
  fi
  cd "$QJOB_K8S_BIN_DIR" && pwd
  exit 0
fi

if [[ "${1:-}" == "--print-versions" ]]; then
  echo "kubernetes=$K8S_VERSION etcd=$ETCD_VERSION kwok=$KWOK_VERSION helm=$HELM_VERSION"
  exit 0
fi

hash="$(cd "$here" && cat build.sh k8s/go.mod k8s/go.sum k8s/cmd/*/main.go etcd/go.mod etcd/go.sum \
  etcd/main.go kwok/go.mod kwok/go.sum helm/go.mod helm/go.sum | sha256sum | cut -c1-12)"
cache="${QJOB_CACHE:-$HOME/.cache/qjob-operator}"
out="$cache/bin/$K8S_VERSION-$hash"

if check_dir "$out" >/dev/null; then
  echo "$out"
  exit 0
fi

mkdir -p "$cache/bin"
# One build at a time per cache (pytest and `make cluster-up` may race on a fresh machine).
exec 9>"$cache/bin/.build.lock"
if ! flock -n 9; then
  log "another build is running; waiting for it ($cache/bin/.build.lock)"
  flock 9
fi
if check_dir "$out" >/dev/null; then
  echo "$out"
  exit 0
fi

command -v go >/dev/null || { log "go is not installed (need Go >= 1.26 for Kubernetes $K8S_VERSION)"; exit 1; }
log "building Kubernetes $K8S_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION, helm $HELM_VERSION into $out"
log "first build takes about 25 minutes on 2 CPU cores (downloads ~1 GiB of modules into the Go module cache, compiles ~2 GiB of Go build cache); later runs reuse the binaries"

tmp="$out.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT

export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false"
jobs="${QJOB_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"
build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
minor="$(echo "$K8S_VERSION" | cut -d. -f2)"
start=$SECONDS

k8s_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done

step() { log "[$((SECONDS - start))s] $*"; }

step "kube-apiserver, kube-scheduler, kube-controller-manager, kubectl"
(cd "$here/k8s" && go build -p "$jobs" -trimpath -ldflags "$k8s_ldflags" -o "$tmp/" ./cmd/...)

step "etcd"
(cd "$here/etcd" && go build -p "$jobs" -trimpath -ldflags "-s -w" -o "$tmp/etcd" .)

step "kwok"
(cd "$here/kwok" && go build -p "$jobs" -trimpath \
  -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" \
  -o "$tmp/kwok" sigs.k8s.io/kwok/cmd/kwok)

step "helm"
(cd "$here/helm" && go build -p "$jobs" -trimpath \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
  -o "$tmp/helm" helm.sh/helm/v3/cmd/helm)

cat >"$tmp/VERSIONS" <<EOF
kubernetes=$K8S_VERSION
etcd=$ETCD_VERSION
kwok=$KWOK_VERSION
helm=$HELM_VERSION
go=$(go env GOVERSION)
built=$build_date
build_seconds=$((SECONDS - start))
EOF
missing="$(check_dir "$tmp")" || { log "build finished but binaries are missing: $missing"; exit 1; }
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
step "done: $(du -sh "$out" | cut -f1) in $out"
echo "$out"
