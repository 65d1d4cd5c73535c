#!/usr/bin/env bash
# The operator scenario against a real cluster: apply the CRDs and RBAC, run the operator
# binary locally with $KUBECONFIG, apply crds/examples, and wait until the hub and the spokes
# are Ready. Without KUBECONFIG it skips (exit 0) and says so.
#
# No node agents run here: once a spoke has its address and certificate, the script reports
# `Registered=True` in the spoke status as an agent would (set DMVPN_E2E_REAL_AGENTS=1 when
# agents are deployed). Nodes get the labels the examples select on; they are removed again.
#
# Env: KUBECONFIG (required), DMVPN_E2E_TIMEOUT (seconds, default 180),
#      DMVPN_E2E_CLEANUP=all to also delete the CRDs, RBAC and namespace afterwards.
set -euo pipefail

if [ -z "${KUBECONFIG:-}" ]; then
    echo "SKIPPED: KUBECONFIG not set (set it to a cluster where CRDs may be installed to run this test)"
    exit 0
fi

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
NS=kube-dmvpn-system
TIMEOUT=${DMVPN_E2E_TIMEOUT:-180}
LOG=$(mktemp /tmp/dmvpn-operator-e2e.XXXXXX.log)
OP_PID=""
LABELED=0

fail() { echo "FAILED: $*"; echo "--- operator log ($LOG) ---"; tail -n 50 "$LOG" || true; exit 1; }

command -v kubectl >/dev/null || fail "kubectl not found in PATH"
kubectl version >/dev/null 2>&1 || fail "cannot reach the cluster in KUBECONFIG=$KUBECONFIG"

cleanup() {
    set +e
    # Delete the examples while the operator still runs, so it can release addresses and
    # remove its finalizers.
    kubectl delete -f "$ROOT/crds/examples/spoke-a.yaml" -f "$ROOT/crds/examples/spoke-b.yaml" \
        -f "$ROOT/crds/examples/hub.yaml" --ignore-not-found --wait=true --timeout=60s >/dev/null 2>&1
    if [ -n "$OP_PID" ]; then
        kill -TERM "$OP_PID" 2>/dev/null
        wait "$OP_PID" 2>/dev/null
    fi
    if [ "$LABELED" = 1 ]; then
        kubectl label nodes --all dmvpn.kube-dmvpn.io/role- dmvpn.kube-dmvpn.io/gateway- >/dev/null 2>&1
    fi
    if [ "${DMVPN_E2E_CLEANUP:-}" = all ]; then
        kubectl delete -f "$ROOT/crds/rbac/" --ignore-not-found >/dev/null 2>&1
        kubectl delete -f "$ROOT/crds/yaml/" --ignore-not-found >/dev/null 2>&1
        kubectl delete namespace "$NS" --ignore-not-found >/dev/null 2>&1
    fi
}
trap cleanup EXIT

echo "== building dmvpn-operator"
(cd "$ROOT" && cargo build --release -p dmvpn-operator) || fail "build failed"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/dmvpn-operator"
[ -x "$BIN" ] || fail "no binary at $BIN"

echo "== CRDs, namespace, RBAC"
kubectl apply -f "$ROOT/crds/yaml/" >/dev/null
kubectl wait --for=condition=Established --timeout=60s \
    crd/dmvpnhubs.dmvpn.kube-dmvpn.io crd/dmvpnspokes.dmvpn.kube-dmvpn.io >/dev/null
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply -f "$ROOT/crds/rbac/" >/dev/null

echo "== node labels used by the examples"
kubectl label nodes --all dmvpn.kube-dmvpn.io/role=hub dmvpn.kube-dmvpn.io/gateway=true --overwrite >/dev/null
LABELED=1

echo "== starting the operator (log: $LOG)"
"$BIN" --namespace "$NS" --http-addr 127.0.0.1:0 --cert-lifetime 24h >"$LOG" 2>&1 &
OP_PID=$!
sleep 2
kill -0 "$OP_PID" 2>/dev/null || fail "the operator exited at start"

echo "== applying crds/examples"
kubectl apply -f "$ROOT/crds/examples/hub.yaml" -f "$ROOT/crds/examples/spoke-a.yaml" \
    -f "$ROOT/crds/examples/spoke-b.yaml" >/dev/null

echo "== waiting for addresses and certificates"
kubectl wait --for=condition=AddressAssigned --timeout="${TIMEOUT}s" dmvpnhub/hub-a dmvpnspoke/spoke-a dmvpnspoke/spoke-b \
    || fail "addresses not assigned"
kubectl wait --for=condition=CertificateReady --timeout="${TIMEOUT}s" dmvpnhub/hub-a dmvpnspoke/spoke-a dmvpnspoke/spoke-b \
    || fail "certificates not ready"

if [ "${DMVPN_E2E_REAL_AGENTS:-0}" != 1 ]; then
    echo "== reporting Registered=True for the spokes (no agents deployed)"
    now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    for s in spoke-a spoke-b; do
        types=$(kubectl get dmvpnspoke "$s" -o jsonpath='{.status.conditions[*].type}')
        gen=$(kubectl get dmvpnspoke "$s" -o jsonpath='{.metadata.generation}')
        idx=0; found=-1
        for t in $types; do
            [ "$t" = Registered ] && found=$idx
            idx=$((idx + 1))
        done
        cond="{\"type\":\"Registered\",\"status\":\"True\",\"reason\":\"Registered\",\"message\":\"reported by e2e/k8s/run.sh\",\"observedGeneration\":$gen,\"lastTransitionTime\":\"$now\"}"
        if [ "$found" -ge 0 ]; then
            op="[{\"op\":\"replace\",\"path\":\"/status/conditions/$found\",\"value\":$cond}]"
        else
            op="[{\"op\":\"add\",\"path\":\"/status/conditions/-\",\"value\":$cond}]"
        fi
        kubectl patch dmvpnspoke "$s" --subresource=status --type=json -p "$op" >/dev/null \
            || fail "could not patch the status of $s"
    done
fi

echo "== waiting for Ready"
kubectl wait --for=condition=Ready --timeout="${TIMEOUT}s" dmvpnhub/hub-a dmvpnspoke/spoke-a dmvpnspoke/spoke-b \
    || fail "not Ready: $(kubectl get dmvpnhubs,dmvpnspokes -o wide 2>&1)"

hub_addr=$(kubectl get dmvpnhub hub-a -o jsonpath='{.status.tunnelAddress}')
a_addr=$(kubectl get dmvpnspoke spoke-a -o jsonpath='{.status.tunnelAddress}')
b_addr=$(kubectl get dmvpnspoke spoke-b -o jsonpath='{.status.tunnelAddress}')
[ "$hub_addr" = 10.42.0.1 ] || fail "hub address $hub_addr, want 10.42.0.1"
[ "$b_addr" = 10.42.0.20 ] || fail "spoke-b address $b_addr, want its static 10.42.0.20"
[ -n "$a_addr" ] && [ "$a_addr" != "$hub_addr" ] && [ "$a_addr" != "$b_addr" ] \
    || fail "spoke-a address $a_addr is not unique"
for s in dmvpn-ca dmvpn-hub-hub-a-cert dmvpn-spoke-spoke-a-cert dmvpn-spoke-spoke-b-cert; do
    kubectl -n "$NS" get secret "$s" >/dev/null || fail "secret $s missing"
done
kubectl get dmvpnhubs,dmvpnspokes -o wide
echo "PASSED: hub-a $hub_addr, spoke-a $a_addr, spoke-b $b_addr are Ready"
