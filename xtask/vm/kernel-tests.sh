#!/bin/bash
# The default command of `cargo xtask vm-test`, run by guest.sh inside each VM from the workspace
# root: the test binaries listed in $DRAINGATE_VM_TESTS, one per line (or separated by `;`),
# each with its arguments (test filters, --test-threads=1, ...), e.g.
#   DRAINGATE_VM_TESTS='target/debug/deps/kernel-0123abcd --test-threads=1 tracepoints'
# Every entry runs even when an earlier one fails; the exit code is non-zero if any failed or the
# list is empty (nothing run is a failure, not a pass).
set -u
total=0
failed=()
while IFS= read -r entry; do
    entry=${entry#"${entry%%[![:space:]]*}"}
    [ -z "$entry" ] || [ "${entry:0:1}" = "#" ] && continue
    total=$((total + 1))
    echo "kernel-tests: == $entry"
    # The entry is a command line (binary and arguments), so a shell reads it.
    if bash -c "$entry"; then
        echo "kernel-tests: ok: $entry"
    else
        echo "kernel-tests: FAILED ($?): $entry"
        failed+=("$entry")
    fi
done < <(printf '%s\n' "${DRAINGATE_VM_TESTS:-}" | tr ';' '\n')
if [ "$total" -eq 0 ]; then
    echo "kernel-tests: DRAINGATE_VM_TESTS lists no test binary: nothing was run"
    exit 2
fi
if [ "${#failed[@]}" -ne 0 ]; then
    echo "kernel-tests: ${#failed[@]} of $total failed:"
    printf '  %s\n' "${failed[@]}"
    exit 1
fi
echo "kernel-tests: all $total passed"
