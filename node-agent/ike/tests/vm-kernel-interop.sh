#!/bin/bash
# The strongSwan interop tests that need kernel ESP (esp4), run in the tools' VM:
#   B=$(cargo test -p dmvpn-ike --test strongswan --no-run --message-format=json \
#       | jq -r 'select(.profile.test) | .executable' | grep strongswan)
#   /work/shared/tools/vm/in-vm.sh node-agent/ike/tests/vm-kernel-interop.sh "$B"
# The argument is the compiled test binary (a path without spaces or commas).
set -u
modprobe esp4 2>/dev/null; modprobe xfrm_user 2>/dev/null
"$1" --test-threads=1 --nocapture kernel_
