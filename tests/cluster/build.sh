#!/usr/bin/env bash
# Builds the test control plane from upstream's Go modules at the versions the go.mod files here pin:
#   controlplane/  kube-apiserver, kube-controller-manager, kube-scheduler (k8s.io/kubernetes), etcd's server,
#                  kwok (simulated nodes), prometheus-operator, and Prometheus at the version the operator
#                  defaults to (Debian's is built without Kubernetes service discovery)
#   argo/          Argo Rollouts' controller (its own module: it pins Kubernetes 1.34's libraries)
# and copies beside them what they need from the same modules: kwok's stage definitions and both projects'
# CRDs. Everything lands in a folder keyed by what the go.mod/go.sum files pin (and this script), so a change
# of version builds anew and an unchanged checkout reuses the build. Prints that folder.
#
# Cold, on 2 cores: about 25 minutes (docs/stack.md has the measured times); cached: instant.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${DISTILOPS_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/distilops/cluster}"
key=$(cat "$here/build.sh" "$here"/controlplane/go.mod "$here"/controlplane/go.sum "$here"/argo/go.mod \
      "$here"/argo/go.sum | sha256sum | cut -c1-16)
out="$cache/$key"
if [ -f "$out/.complete" ]; then
  echo "$out"
  exit 0
fi
[ -z "${DISTILOPS_CLUSTER_ONLY_IF_BUILT:-}" ] || exit 3  # asked whether it is built: it is not
export PATH="$PATH:/usr/local/go/bin"  # Go's own install location, where a login shell has not added it
command -v go >/dev/null || { echo "build.sh: Go >= 1.26 is needed to build the test control plane (https://go.dev/dl/)" >&2; exit 1; }
rm -rf "$out.partial" && mkdir -p "$out.partial/bin"
# -s -w: no symbol tables or DWARF (links in a fraction of the time, binaries a third smaller);
# -trimpath: the same binaries wherever the module cache lies. GOFLAGS from the caller (e.g. -mod) are kept.
flags=(-trimpath -buildvcs=false -ldflags=-s\ -w)
export GOTOOLCHAIN=local
started=$(date +%s)
for module in controlplane argo; do
  echo "building $module (go build tool) ..." >&2
  (cd "$here/$module" && go build "${flags[@]}" -o "$out.partial/bin/" tool)
done
# etcd's main package is go.etcd.io/etcd/server/v3 itself: go build names a /vN path's binary after the element
# before it, `server`
mv "$out.partial/bin/server" "$out.partial/bin/etcd"
mv "$out.partial/bin/operator" "$out.partial/bin/prometheus-operator"
moddir() { (cd "$here/$1" && go list -m -f '{{.Dir}}' "$2"); }
kwok=$(moddir controlplane sigs.k8s.io/kwok)
mkdir -p "$out.partial/kwok" "$out.partial/crds/argo" "$out.partial/crds/prometheus-operator"
# the stages kwokctl runs by default: nodes initialised and heartbeating (status and lease), pods ready at once
cp "$kwok"/kustomize/stage/node/fast/node-initialize.yaml \
   "$kwok"/kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
   "$kwok"/kustomize/stage/pod/fast/pod-*.yaml \
   "$out.partial/kwok/"
cp "$(moddir argo github.com/argoproj/argo-rollouts)"/manifests/crds/*-crd.yaml "$out.partial/crds/argo/"
cp "$(moddir controlplane github.com/prometheus-operator/prometheus-operator)"/example/prometheus-operator-crd/*.yaml \
   "$out.partial/crds/prometheus-operator/"
chmod -R u+w "$out.partial"
echo "built in $(( $(date +%s) - started )) s" > "$out.partial/build-time.txt"
touch "$out.partial/.complete"
rm -rf "$out" && mv "$out.partial" "$out"
find "$cache" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -exec rm -rf {} +  # earlier pins' builds
echo "control plane built in $(( $(date +%s) - started )) s: $out" >&2
echo "$out"
