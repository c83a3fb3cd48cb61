#!/bin/bash
# What this kernel offers the agent, for comparing kernels: the record layouts of the tracepoints
# the agent attaches to, BTF, and TC clsact. Run in each VM with
#   cargo xtask vm-test -- bash xtask/vm/probe.sh
# Writes $DRAINGATE_VM_OUT/probe.txt (on the host: target/vm-test/<uname -r>/probe.txt) and
# prints it. Exits non-zero if a tracepoint format or BTF is missing.
set -u
report=$DRAINGATE_VM_OUT/probe.txt
rc=0
{
    echo "uname -r: $(uname -r)"
    echo "/proc/version: $(cat /proc/version)"
    if ls -l /sys/kernel/btf/vmlinux; then :; else rc=1; fi
    if tc qdisc add dev lo clsact; then
        echo "tc qdisc add dev lo clsact: ok"
        tc qdisc show dev lo
        tc qdisc del dev lo clsact
    else
        echo "tc qdisc add dev lo clsact: FAILED"
        rc=1
    fi
    for event in sock/inet_sock_set_state tcp/tcp_send_reset tcp/tcp_receive_reset \
        signal/signal_generate sched/sched_process_exit; do
        echo
        echo "== /sys/kernel/tracing/events/$event/format"
        cat "/sys/kernel/tracing/events/$event/format" || rc=1
    done
} >"$report" 2>&1
cat "$report"
exit "$rc"
