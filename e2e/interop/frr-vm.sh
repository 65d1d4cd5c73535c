#!/bin/bash
# Live NHRP interop between dmvpn-agent and FRR nhrpd (8.4), in network namespaces.
# FRR needs kernel mGRE (ip_gre), which the sandbox host lacks, so run it in the VM:
#
#   cargo build --release -p dmvpn-agent
#   SHARE=/some/host/dir /work/shared/tools/vm/in-vm.sh e2e/interop/frr-vm.sh \
#       "$CARGO_TARGET_DIR/release/dmvpn-agent" /mnt/host-share [SCENARIOS]
#
# Arguments (no spaces or commas: they travel on the kernel command line):
#   1 AGENT      path of the dmvpn-agent binary (the VM sees the host's / read-only)
#   2 OUT        directory for the underlay captures (<scenario>.pcap) and the logs
#                (<scenario>-logs/); /mnt/host-share is the host's $SHARE inside the VM
#   3 SCENARIOS  '+'-separated subset of: frrhub ourhub ourhub-static frrhub-nat ourhub-nat
#                frrhub-auth ourhub-auth (default: all)
#
# Topology of every scenario: an underlay bridge (198.51.100.0/24) in its own netns, a hub
# 10.42.0.1 (NBMA .1), spoke S1 = dmvpn-agent 10.42.0.11 (.11) and spoke S2 = FRR nhrpd 10.42.0.12
# (.12); GRE key 42, network-id 42, holdtime 60, registration no-unique. "frrhub" runs FRR on the
# hub (ip nhrp redirect + the NFLOG rule of FRR's docs), "ourhub" runs dmvpn-agent on the hub.
# Both check registration both ways, pings over the overlay and phase 3 (Traffic Indication,
# Resolution, shortcut) in both directions. "-auth" variants add `ip nhrp authentication` /
# nhrp_auth with the same password everywhere, plus a spoke S3 (.13) of the other implementation
# with a wrong password that must not get registered. The FRR spoke uses `nhs dynamic nbma` (FRR's documented DMVPN spoke) in frrhub
# and ourhub, a static `nhs` + `map` in ourhub-static, ourhub-nat and the -auth variants.
# "-nat" variants put one spoke (ours at the FRR hub, FRR's at our hub) behind a NAT router
# (own underlay 203.0.113.2, public 198.51.100.21/.22): Cisco NAT extension both ways, and the
# other spoke's shortcut must use the public address. "-auth" variants are skipped on FRR < 10.
#
# Prints "PASS <scenario>: <check>" / "FAIL ..." lines and "N passed, M failed"; exit code = M
# (capped at 100; 2 = cannot run at all).
# The shared test tools are found at ../../../shared/tools relative to this script, or $DMVPN_SHARED
# (the environment does not travel into the VM, so only the relative path works there).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
SHARED=${DMVPN_SHARED:-$here/../../../shared}
[ -f "$SHARED/tools/lib.sh" ] || { echo "ERROR: shared tools not found at $SHARED/tools (set DMVPN_SHARED)" >&2; exit 2; }
. "$SHARED/tools/lib.sh"

AGENT=${1:-}; OUT=${2:-}; SCEN=${3:-frrhub+ourhub+ourhub-static+frrhub-nat+ourhub-nat+frrhub-auth+ourhub-auth}
[ -n "$AGENT" ] && [ -x "$AGENT" ] || dt_die "usage: $0 AGENT_BINARY [OUTDIR [SCENARIOS]]: no executable dmvpn-agent at '${AGENT}'"
dt_need_root
[ -x /usr/lib/frr/nhrpd ] || dt_die "FRR missing (/usr/lib/frr/nhrpd): run $DT_TOOLS/setup-host.sh"
dt_init
dt_scratch; D=$DT_SCRATCH; chmod 755 "$D"        # FRR daemons run as user frr
[ -n "$OUT" ] && { mkdir -p "$OUT" || dt_die "cannot create $OUT"; }

# Netfilter modules for the hub's NFLOG rule and the NAT routers. They are not in the VM's initramfs; the extracted
# guest kernel in the tools cache has them (the VM sees the host's / including that cache).
load_nflog_modules() {
  local kr
  for kr in "${DMVPN_TOOLS_CACHE:-}" "$HOME/.cache/dmvpn-tools" /root/.cache/dmvpn-tools; do
    [ -n "$kr" ] && [ -d "$kr/kernel/lib/modules/$(uname -r)" ] && break
    kr=
  done
  local m
  for m in nfnetlink_log xt_NFLOG xt_hashlimit nft_compat x_tables nf_conntrack nf_nat nft_chain_nat nft_nat; do
    modprobe "$m" 2>/dev/null || { [ -n "$kr" ] && modprobe -d "$kr/kernel" "$m" 2>/dev/null; } || true
  done
}
load_nflog_modules

PASSED=0; FAILED=0; SKIPPED=0
check() {  # desc cmd...
  local d=$1; shift
  if "$@"; then echo "PASS $SC: $d"; PASSED=$((PASSED + 1))
  else echo "FAIL $SC: $d"; FAILED=$((FAILED + 1)); fi
}
# wait_for SECONDS cmd...: poll until cmd succeeds
wait_for() {
  local end=$(( $(date +%s) + $1 )); shift
  until "$@"; do [ "$(date +%s)" -ge "$end" ] && return 1; sleep 0.3; done
}

HUB_NBMA=198.51.100.1; HUB_TUN=10.42.0.1
S1_NBMA=198.51.100.11; S1_TUN=10.42.0.11       # dmvpn-agent spoke
S2_NBMA=198.51.100.12; S2_TUN=10.42.0.12       # FRR spoke
S3_NBMA=198.51.100.13; S3_TUN=10.42.0.13       # wrong-password spoke (auth variants)
HOLD=60; PASSWORD=dmvpn42; WRONG=wrong42

# ---- per-scenario state
SC=; SCD=; SC_NS=(); SC_PIDS=(); SC_CAP=
declare -A NSOF PIDOF

node_ns() { dt_ns "$SC-$1"; }

scenario_begin() {  # name
  SC=$1; SCD=$D/$SC; mkdir -p "$SCD"; chmod 777 "$SCD"; SC_NS=(); SC_PIDS=(); NSOF=()
  echo "===== scenario $SC"
  local n; n=$(node_ns net); dt_netns_add "$n"; SC_NS+=("$n"); NSOF[net]=$n
  ip -n "$n" link add br0 type bridge && ip -n "$n" link set br0 up
  if [ -n "$OUT" ]; then
    SC_CAP=$OUT/$SC.pcap; rm -f "$SC_CAP"
    dt_capture "$n" br0 "$SC_CAP"; SC_CAPPID=${DT_CAPTURE_PIDS[-1]}
  fi
}

add_node() {  # name nbma
  local n; n=$(node_ns "$1"); dt_netns_add "$n"; SC_NS+=("$n"); NSOF[$1]=$n
  ip -n "${NSOF[net]}" link add "p-$1" type veth peer name ul0 netns "$n"
  ip -n "${NSOF[net]}" link set "p-$1" master br0 up
  ip -n "$n" addr add "$2/24" dev ul0; ip -n "$n" link set ul0 up
  ip netns exec "$n" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 \
    net.ipv4.conf.default.rp_filter=0 net.ipv4.conf.all.send_redirects=0
}

# add_natted_node name public: the node sits behind its own NAT router (netns "nat-<name>",
# public address on the underlay bridge, SNAT of everything leaving it); the node's own underlay
# address is $PRIV_NBMA (203.0.113.2) in 203.0.113.0/24 behind that router.
PRIV_NBMA=203.0.113.2; PRIV_GW=203.0.113.1
add_natted_node() {
  local r; r=$(node_ns "nat-$1"); dt_netns_add "$r"; SC_NS+=("$r"); NSOF[nat-$1]=$r
  ip -n "${NSOF[net]}" link add "p-nat-$1" type veth peer name ul0 netns "$r"
  ip -n "${NSOF[net]}" link set "p-nat-$1" master br0 up
  ip -n "$r" addr add "$2/24" dev ul0; ip -n "$r" link set ul0 up
  local n; n=$(node_ns "$1"); dt_netns_add "$n"; SC_NS+=("$n"); NSOF[$1]=$n
  ip -n "$r" link add in0 type veth peer name ul0 netns "$n"
  ip -n "$r" addr add "$PRIV_GW/24" dev in0; ip -n "$r" link set in0 up
  ip -n "$n" addr add "$PRIV_NBMA/24" dev ul0; ip -n "$n" link set ul0 up
  ip -n "$n" route add default via "$PRIV_GW"
  ip netns exec "$r" sysctl -qw net.ipv4.ip_forward=1
  ip netns exec "$n" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 \
    net.ipv4.conf.default.rp_filter=0 net.ipv4.conf.all.send_redirects=0
  ip netns exec "$r" nft -f - <<EON || echo "WARNING: NAT rules for $1 failed"
table ip nat {
  chain post { type nat hook postrouting priority 100; oifname "ul0" snat to $2; }
}
EON
}

frr_version() { echo "FRR nhrpd $(/usr/lib/frr/nhrpd --version 2>/dev/null | sed -n 's/.*version //p' | head -1)"; }
vty() { vtysh --vty_socket "$SCD/$1" -c "$2" 2>/dev/null; }

# start_frr name nbma tun role(hub|spoke) auth(password or empty) nhs(dynamic|static)
start_frr() {
  local name=$1 nbma=$2 tun=$3 role=$4 auth=$5 nhsmode=${6:-dynamic} ns=${NSOF[$1]} X=$SCD/$1 extra=
  mkdir -p "$X"; chmod 777 "$X"
  ip -n "$ns" link add gre1 type gre key 42 ttl 64 local "$nbma" dev ul0 ||
    dt_die "this kernel has no ip_gre: run this script in the VM ($DT_TOOLS/vm/in-vm.sh)"
  ip -n "$ns" addr add "$tun/32" dev gre1; ip -n "$ns" link set gre1 up
  if [ "$role" = hub ]; then
    extra=" ip nhrp redirect"
    # FRR's documented rule: traffic routed gre1 -> gre1 goes to nhrpd (NFLOG group 1), which
    # answers with Traffic Indications to the sender. Masks /32 instead of the docs' /24: all
    # spokes share one /24 here, and each direction must get its own indication.
    ip netns exec "$ns" iptables -A FORWARD -i gre1 -o gre1 \
      -m hashlimit --hashlimit-upto 4/minute --hashlimit-burst 1 \
      --hashlimit-mode srcip,dstip --hashlimit-srcmask 32 --hashlimit-dstmask 32 \
      --hashlimit-name loglimit-0 -j NFLOG --nflog-group 1 --nflog-size 128 ||
      echo "WARNING: NFLOG rule failed: the FRR hub will send no Traffic Indications"
  else
    if [ "$nhsmode" = dynamic ]; then
      extra=" ip nhrp nhs dynamic nbma $HUB_NBMA"
    else
      extra=" ip nhrp nhs $HUB_TUN nbma $HUB_NBMA
 ip nhrp map $HUB_TUN $HUB_NBMA"
    fi
    extra="$extra
 ip nhrp shortcut"
    # the overlay network is reached via the hub until a shortcut exists (FRR resolves only
    # destinations routed via an NBMA next hop)
    ip -n "$ns" route add 10.42.0.0/24 via "$HUB_TUN" dev gre1 onlink
  fi
  [ -n "$auth" ] && extra="$extra
 ip nhrp authentication $auth"
  printf 'hostname %s\nlog file %s/zebra.log debugging\n' "$name" "$X" > "$X/zebra.conf"
  cat > "$X/nhrpd.conf" <<EOC
hostname $name
log file $X/nhrpd.log debugging
debug nhrp all
nhrp nflog-group 1
!
interface gre1
 ip nhrp network-id 42
 ip nhrp holdtime $HOLD
 ip nhrp registration no-unique
$extra
 tunnel source ul0
exit
EOC
  chmod 666 "$X"/*.conf
  local d
  for d in zebra nhrpd; do
    ip netns exec "$ns" /usr/lib/frr/$d -f "$X/$d.conf" -i "$X/$d.pid" -z "$X/zserv.api" \
      --vty_socket "$X" -P 0 -u frr -g frr --log file:"$X/$d.stdlog" > "$X/$d.out" 2>&1 &
    dt_track $!; SC_PIDS+=($!)
    # nhrpd must find zebra listening: a failed zclient connect is only retried after 10 s
    [ $d = zebra ] && for _ in $(seq 150); do [ -S "$X/zserv.api" ] && break; sleep 0.1; done
  done
  # ready once nhrpd serves gre1 (a spoke that asks a hub that is not ready backs off 1, 2, 4 s)
  wait_for 20 bash -c "vtysh --vty_socket '$X' -c 'show ip nhrp cache' 2>/dev/null | grep -q 'local *$tun '" ||
    echo "WARNING: FRR $name shows no local cache entry for $tun after 20 s"
}

# start_ours name nbma tun role auth
start_ours() {
  local name=$1 nbma=$2 tun=$3 role=$4 auth=$5 ns=${NSOF[$1]} X=$SCD/$1
  mkdir -p "$X"
  {
    echo "role = \"$role\""
    echo "tunnel_address = \"$tun/24\""
    echo "nbma_address = \"$nbma\""
    echo "gre_key = 42"
    echo "holdtime = $HOLD"
    echo "phase = 3"
    echo "registration_unique = false"
    echo "control_socket = \"$X/agent.sock\""
    echo "tun_name = \"dmvpn0\""
    echo "log_level = \"debug\""
    [ -n "$auth" ] && echo "nhrp_auth = \"$auth\""
    if [ "$role" = spoke ]; then
      printf '[[nhs]]\ntunnel_address = "%s"\nnbma_address = "%s"\npriority = 0\n' "$HUB_TUN" "$HUB_NBMA"
    fi
    # GRE in clear: FRR here runs without strongSwan
    printf '[ipsec]\nenabled = false\n'
  } > "$X/agent.toml"
  # older agents have no [ipsec] section: drop it if this binary rejects it
  if ! "$AGENT" check-config "$X/agent.toml" > "$X/check.out" 2>&1; then
    sed -i '/^\[ipsec\]/,$d' "$X/agent.toml"
    "$AGENT" check-config "$X/agent.toml" > "$X/check.out" 2>&1 || { cat "$X/check.out"; return 1; }
  fi
  ip netns exec "$ns" env RUST_LOG=debug "$AGENT" run --config "$X/agent.toml" > "$X/agent.log" 2>&1 &
  dt_track $!; SC_PIDS+=($!); PIDOF[$name]=$!
  wait_for 15 test -S "$X/agent.sock" || echo "WARNING: agent $name has no control socket after 15 s"
}

ours() {  # name show-args...: our CLI as JSON
  local name=$1; shift
  "$AGENT" show "$@" --json --socket "$SCD/$name/agent.sock" 2>/dev/null
}
our_nhs_up() {  # name
  ours "$1" nhrp nhs | jq -e --arg a "$HUB_TUN" '.nhs[] | select(.tunnel_address == $a and .state == "up" and .registered)' >/dev/null
}
our_cache_has() {  # name type tunnel nbma
  ours "$1" nhrp cache | jq -e --arg t "$2" --arg p "$3" --arg n "$4" \
    '.entries[] | select(.type == $t and .protocol == $p and .nbma == $n)' >/dev/null
}
our_shortcut_to() {  # name tunnel nbma: a shortcut entry covering tunnel with that NBMA
  ours "$1" nhrp cache | jq -e --arg p "$2" --arg n "$3" \
    '.entries[] | select(.type == "shortcut" and .nbma == $n and ((.prefix | startswith($p + "/")) or .protocol == $p))' >/dev/null
}
our_counter() {  # name jq-path
  ours "$1" counters | jq -r "$2 // 0"
}
frr_cache_has() {  # name type tunnel nbma
  vty "$1" "show ip nhrp cache" | grep -qE "^gre1 +$2 +$3 +$4 "
}
frr_nhs_up() {  # name: the NHS entry resolved to the hub's tunnel address
  vty "$1" "show ip nhrp nhs" | grep -qE " $HUB_NBMA +$HUB_TUN *$"
}
frr_shortcut_to() {  # name tunnel nbma: FRR resolved it (shortcut table) and caches that NBMA
  vty "$1" "show ip nhrp shortcut" | grep -qE " $2/32 " && frr_binding_to "$1" "$2" "$3"
}
frr_cache_claimed() {  # name type tunnel nbma claimed-nbma
  vty "$1" "show ip nhrp cache" | grep -qE "^gre1 +$2 +$3 +$4 +$5 "
}
our_nat_address() {  # name: the NAT-mapped address our NHC learned from the NHS
  ours "$1" nhrp nhs | jq -r --arg a "$HUB_TUN" '.nhs[] | select(.tunnel_address == $a) | .nat_address // "none"'
}
frr_binding_to() {  # name tunnel nbma: a direct binding (learned by resolution, either side)
  vty "$1" "show ip nhrp cache" | grep -qE "^gre1 +(dynamic|cached) +$2 +$3 "
}
not() { ! "$@"; }
ping_from() {  # name src dst
  ip netns exec "${NSOF[$1]}" ping -c3 -i0.3 -W2 -I "$2" "$3" > "$SCD/ping-$1-$3.log" 2>&1
}
# keeps pinging (so that the hub forwards, redirects, and the spoke resolves) until cond holds
ping_until() {  # seconds name src dst cond...
  local secs=$1 name=$2 src=$3 dst=$4; shift 4
  ip netns exec "${NSOF[$name]}" ping -i0.2 -W1 -I "$src" "$dst" > "$SCD/ping-until-$name-$dst.log" 2>&1 &
  local p=$!
  wait_for "$secs" "$@"; local rc=$?
  kill "$p" 2>/dev/null; wait "$p" 2>/dev/null
  return $rc
}

dump_state() {
  local n
  echo "----- state of $SC"
  for n in "${!NSOF[@]}"; do
    case "$n" in nat-*)
      echo "--- $n conntrack (GRE)"; ip netns exec "${NSOF[$n]}" cat /proc/net/nf_conntrack 2>&1 | grep -E 'gre|unknown|47 ' ;;
    esac
  done
  for n in "$@"; do
    if [ -S "$SCD/$n/agent.sock" ]; then
      echo "--- $n (dmvpn-agent): show dmvpn / nhrp cache / nhrp nhs / counters"
      "$AGENT" show dmvpn --socket "$SCD/$n/agent.sock" 2>&1
      "$AGENT" show nhrp cache --socket "$SCD/$n/agent.sock" 2>&1
      "$AGENT" show nhrp nhs --socket "$SCD/$n/agent.sock" 2>&1
      ours "$n" counters | jq -M -c '{nhrp: .nhrp}' 2>&1
    elif [ -d "$SCD/$n" ]; then
      echo "--- $n (FRR nhrpd): nhs / cache / shortcut"
      vtysh --vty_socket "$SCD/$n" -c "show ip nhrp nhs" -c "show ip nhrp cache" -c "show ip nhrp shortcut" 2>&1 | grep -vE '^\s*$'
      echo "--- $n kernel routes/neighbours on gre1"
      ip -n "${NSOF[$n]}" route show 2>&1; ip -n "${NSOF[$n]}" neigh show dev gre1 2>&1
    fi
  done
}

# FRR before 10 has no `ip nhrp authentication`: nhrpd logs "No such command" and runs without
# it (and echoes our Authentication extension unchecked), so an auth scenario proves nothing there.
frr_lacks_auth() {  # name
  grep -q "No such command.*ip nhrp authentication" "$SCD/$1/nhrpd.log" 2>/dev/null
}
skip_scenario() {  # reason
  echo "SKIP $SC: $1"; SKIPPED=$((SKIPPED + 1))
}

scenario_end() {  # failures-before
  local p n
  if [ "$FAILED" != "$1" ]; then
    dump_state hub s1 s2 s3
    for n in hub s1 s2 s3; do
      [ -f "$SCD/$n/nhrpd.log" ] && { echo "--- $n nhrpd.log (errors, last 25)"; grep -iE 'error|fail|drop|invalid|unknown|auth|reject|warn|mismatch' "$SCD/$n/nhrpd.log" | tail -25; }
      [ -f "$SCD/$n/agent.log" ] && { echo "--- $n agent.log (last 25)"; tail -25 "$SCD/$n/agent.log"; }
    done
  fi
  for p in "${SC_PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${SC_PIDS[@]}"; do dt_wait_gone "$p" 30 || kill -9 "$p" 2>/dev/null; done
  if [ -n "${SC_CAPPID:-}" ]; then sleep 1; kill -INT "$SC_CAPPID" 2>/dev/null; dt_wait_gone "$SC_CAPPID" 20; SC_CAPPID=; fi
  for n in "${SC_NS[@]}"; do
    for p in $(ip netns pids "$n" 2>/dev/null); do kill "$p" 2>/dev/null; dt_wait_gone "$p" 20 || kill -9 "$p" 2>/dev/null; done
    ip netns del "$n" 2>/dev/null
  done
  if [ -n "$OUT" ]; then
    rm -rf "$OUT/$SC-logs"; mkdir -p "$OUT/$SC-logs"
    for n in "$SCD"/*/; do
      n=$(basename "$n"); mkdir -p "$OUT/$SC-logs/$n"
      cp "$SCD/$n"/*.log "$SCD/$n"/*.conf "$SCD/$n"/*.toml "$OUT/$SC-logs/$n/" 2>/dev/null
    done
    cp "$SCD"/ping-*.log "$OUT/$SC-logs/" 2>/dev/null
  fi
}

# ---- scenario: FRR hub, our spoke S1, FRR spoke S2
run_frrhub() {  # name auth nat(0|1: our spoke behind NAT)
  local f0=$FAILED auth=$2 nat=${3:-0} nhsmode=dynamic s1c=$S1_NBMA s1p=$S1_NBMA
  [ -n "$auth" ] && nhsmode=static
  scenario_begin "$1"
  add_node hub $HUB_NBMA; add_node s2 $S2_NBMA
  if [ "$nat" = 1 ]; then s1c=$PRIV_NBMA; s1p=198.51.100.21; add_natted_node s1 $s1p; else add_node s1 $S1_NBMA; fi
  [ -n "$auth" ] && add_node s3 $S3_NBMA
  start_frr hub $HUB_NBMA $HUB_TUN hub "$auth"
  if [ -n "$auth" ] && frr_lacks_auth hub; then
    skip_scenario "$(frr_version) has no 'ip nhrp authentication' (FRR 10 or later needed)"
    scenario_end "$f0"; return
  fi
  start_ours s1 $s1c $S1_TUN spoke "$auth"
  start_frr s2 $S2_NBMA $S2_TUN spoke "$auth" $nhsmode
  [ -n "$auth" ] && start_ours s3 $S3_NBMA $S3_TUN spoke "$WRONG"
  check "FRR hub caches our spoke: dynamic $S1_TUN NBMA $s1p" wait_for 30 frr_cache_has hub dynamic $S1_TUN $s1p
  check "our spoke: NHS $HUB_TUN up and registered (show nhrp nhs)" wait_for 10 our_nhs_up s1
  if [ "$nat" = 1 ]; then
    check "NAT: FRR hub keeps our claimed NBMA $s1c next to the observed $s1p" frr_cache_claimed hub dynamic $S1_TUN $s1p $s1c
    check "NAT: our spoke learned its NAT address $s1p from FRR's NAT extension" test "$(our_nat_address s1)" = "$s1p"
  fi
  check "FRR spoke registered at FRR hub (reference)" wait_for 30 frr_cache_has hub dynamic $S2_TUN $S2_NBMA
  check "ping our spoke -> FRR hub over the overlay" ping_from s1 $S1_TUN $HUB_TUN
  check "ping FRR hub -> our spoke over the overlay" ping_from hub $HUB_TUN $S1_TUN
  check "phase 3: FRR hub redirects, our spoke resolves $S2_TUN: shortcut to NBMA $S2_NBMA" \
    ping_until 25 s1 $S1_TUN $S2_TUN our_shortcut_to s1 $S2_TUN $S2_NBMA
  check "phase 3: our spoke received a Traffic Indication" \
    test "$(our_counter s1 '.nhrp.messages.traffic_indication.rx')" -gt 0
  check "phase 3: ping our spoke -> FRR spoke (over the shortcut)" ping_from s1 $S1_TUN $S2_TUN
  # FRR, as the responder of our Resolution Request, caches our spoke; its own resolution
  # through our hub is covered by the ourhub scenarios
  check "phase 3: FRR spoke has a direct binding for our spoke $S1_TUN (NBMA $s1p)" \
    ping_until 25 s2 $S2_TUN $S1_TUN frr_binding_to s2 $S1_TUN $s1p
  check "phase 3: ping FRR spoke -> our spoke" ping_from s2 $S2_TUN $S1_TUN
  if [ -n "$auth" ]; then
    check "wrong password: FRR hub does not cache our spoke $S3_TUN" not frr_cache_has hub dynamic $S3_TUN $S3_NBMA
    check "wrong password: our spoke's NHS is not registered" not our_nhs_up s3
  fi
  # Informational: our spoke purges its registration when stopped; whether FRR acts on a
  # Purge Request is FRR's business (not a check of ours).
  kill -TERM "${PIDOF[s1]}" 2>/dev/null
  if wait_for 8 not frr_cache_has hub dynamic $S1_TUN $s1p; then
    echo "INFO $SC: FRR hub dropped our spoke after our Purge Request"
  else
    echo "INFO $SC: FRR hub still caches our spoke 8 s after our Purge Request ($(grep -c 'Purge' "$SCD/hub/nhrpd.log") Purge lines in its log)"
  fi
  scenario_end "$f0"
}

# ---- scenario: our hub, FRR spoke S2, our spoke S1
run_ourhub() {  # name auth nhsmode(dynamic|static) nat(0|1: the FRR spoke behind NAT)
  local f0=$FAILED auth=$2 nhsmode=$3 nat=${4:-0} s2c=$S2_NBMA s2p=$S2_NBMA
  scenario_begin "$1"
  add_node hub $HUB_NBMA; add_node s1 $S1_NBMA
  if [ "$nat" = 1 ]; then s2c=$PRIV_NBMA; s2p=198.51.100.22; add_natted_node s2 $s2p; else add_node s2 $S2_NBMA; fi
  [ -n "$auth" ] && add_node s3 $S3_NBMA
  start_ours hub $HUB_NBMA $HUB_TUN hub "$auth"
  start_frr s2 $s2c $S2_TUN spoke "$auth" $nhsmode
  if [ -n "$auth" ] && frr_lacks_auth s2; then
    skip_scenario "$(frr_version) has no 'ip nhrp authentication' (FRR 10 or later needed)"
    scenario_end "$f0"; return
  fi
  start_ours s1 $S1_NBMA $S1_TUN spoke "$auth"
  [ -n "$auth" ] && start_frr s3 $S3_NBMA $S3_TUN spoke "$WRONG" static
  check "our hub caches the FRR spoke: dynamic $S2_TUN NBMA $s2p" wait_for 30 our_cache_has hub dynamic $S2_TUN $s2p
  check "FRR spoke: NHS $HUB_NBMA resolved to $HUB_TUN (show ip nhrp nhs)" wait_for 10 frr_nhs_up s2
  check "FRR spoke caches our hub as nhs" wait_for 10 frr_cache_has s2 nhs $HUB_TUN $HUB_NBMA
  check "our spoke registered at our hub (reference)" wait_for 30 our_cache_has hub dynamic $S1_TUN $S1_NBMA
  if [ "$nat" = 1 ]; then
    # nhrpd logs this when the second CIE of our Registration Reply's NAT extension is present
    check "NAT: FRR spoke detected NAT from our Registration Reply" \
      grep -q "gre1: NAT detected" "$SCD/s2/nhrpd.log"
  fi
  check "ping FRR spoke -> our hub over the overlay" ping_from s2 $S2_TUN $HUB_TUN
  check "ping our hub -> FRR spoke over the overlay" ping_from hub $HUB_TUN $S2_TUN
  check "phase 3: our hub redirects, FRR spoke resolves $S1_TUN (shortcut / cache NBMA $S1_NBMA)" \
    ping_until 25 s2 $S2_TUN $S1_TUN frr_shortcut_to s2 $S1_TUN $S1_NBMA
  check "phase 3: our hub sent a Traffic Indication" \
    test "$(our_counter hub '.nhrp.messages.traffic_indication.tx')" -gt 0
  check "phase 3: our spoke answered FRR's Resolution Request" \
    test "$(our_counter s1 '.nhrp.messages.resolution_reply.tx')" -gt 0
  check "phase 3: ping FRR spoke -> our spoke (over the shortcut)" ping_from s2 $S2_TUN $S1_TUN
  check "phase 3: our spoke resolves the FRR spoke $S2_TUN: shortcut to NBMA $s2p" \
    ping_until 25 s1 $S1_TUN $S2_TUN our_shortcut_to s1 $S2_TUN $s2p
  if [ -n "$auth" ]; then
    check "wrong password: our hub does not cache the FRR spoke $S3_TUN" not our_cache_has hub dynamic $S3_TUN $S3_NBMA
    check "wrong password: our hub counted bad authentication" \
      test "$(our_counter hub '.nhrp.drops.bad_auth')" -gt 0
  fi
  scenario_end "$f0"
}

t0=$(date +%s)
for s in ${SCEN//+/ }; do
  case "$s" in
    frrhub) run_frrhub frrhub "" ;;
    ourhub) run_ourhub ourhub "" dynamic ;;
    ourhub-static) run_ourhub ourhub-static "" static ;;
    frrhub-auth) run_frrhub frrhub-auth "$PASSWORD" ;;
    ourhub-auth) run_ourhub ourhub-auth "$PASSWORD" static ;;
    frrhub-nat) run_frrhub frrhub-nat "" 1 ;;
    ourhub-nat) run_ourhub ourhub-nat "" static 1 ;;
    *) echo "FAIL $s: unknown scenario (frrhub ourhub ourhub-static frrhub-auth ourhub-auth frrhub-nat ourhub-nat)"; FAILED=$((FAILED + 1)) ;;
  esac
done
echo "frr interop: $(( $(date +%s) - t0 )) s"
[ "$SKIPPED" -gt 0 ] && echo "$SKIPPED scenario(s) skipped"
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -gt 100 ] && exit 100
exit "$FAILED"
