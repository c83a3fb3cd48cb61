#!/bin/bash
# Run by `cargo xtask vm-test` inside kernels below the agent's minimum (5.19): the agent must
# refuse to start with one line that names the kernel and the minimum, never a verifier dump.
set -u
bin=${1:?usage: too-old.sh DRAINGATE_BINARY}
err=$(mktemp)
"$bin" agent --pin-dir /sys/fs/bpf/draingate-too-old --socket /tmp/too-old.sock \
    --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 2>"$err" >/dev/null
code=$?
echo "too-old: draingate agent exited $code on $(uname -r); its stderr:"
sed 's/^/too-old: | /' "$err"
lines=$(grep -c . "$err")
if [ "$code" -eq 0 ] || [ "$lines" -ne 1 ] || ! grep -q "Linux $(uname -r) is too old for draingate: it needs 5.19" "$err"; then
    echo "too-old: FAILED: expected a non-zero exit and one line naming $(uname -r) and 5.19"
    exit 1
fi
echo "too-old: refused in one line, as expected"
