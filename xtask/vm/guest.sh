#!/bin/bash
# Runs as root inside a virtme-ng VM booted by `cargo xtask vm-test` (xtask/src/vm.rs), with the
# host's root shared read-only and OUT writable:
#   guest.sh OUT KERNEL_DIR
# KERNEL_DIR is the extracted kernel package (boot/, lib/modules/<release>/). It prepares what the
# kernel tests need (a writable /tmp, tracefs, bpffs, the package's modules, veth, TC clsact,
# iptables nat), then runs OUT/command.sh (written by the host) from the workspace root.
#
# What the host reads back (virtme-run's own exit code is unreliable):
#   OUT/booted     `uname -r` and the guest's uptime, written first: the kernel booted.
#   OUT/guest.log  everything below, preparation and command.
#   OUT/exit-code  the command's exit code, written last: the run finished. 125 means the
#                  guest could not be prepared (the log says why) and the command did not run.
set -u
out=${1:?usage: guest.sh OUT_DIR KERNEL_DIR}
kernel_dir=${2:?usage: guest.sh OUT_DIR KERNEL_DIR}
workspace=$(cd "$(dirname "$0")/../.." && pwd)

echo "$(uname -r) $(cut -d' ' -f1 /proc/uptime)" >"$out/booted"

fail() {
    echo "guest: cannot prepare the VM: $*"
    exit 125
}

# Whether a filesystem of type $2 is mounted at $1.
mounted() {
    awk -v dir="$1" -v type="$2" '$2 == dir && $3 == type { found = 1 } END { exit !found }' \
        /proc/mounts
}

# Quietly does what is needed, loudly says what it could not do.
prepare() {
    # The host root is read-only here; tests write to /tmp.
    if ! mounted /tmp tmpfs; then
        # The host's /tmp stays reachable: the workspace, the kernel cache or the results
        # directory may be under it (a clone in /tmp, say), and keep their paths.
        mkdir -p /run/draingate/host-tmp
        mount --rbind /tmp /run/draingate/host-tmp || fail "keeping the host's /tmp"
        mount -t tmpfs -o mode=1777 tmpfs /tmp || fail "mounting tmpfs on /tmp"
        local path top
        for path in "$workspace" "$kernel_dir" "$out"; do
            case $path in
                /tmp/*) top=${path#/tmp/}; top=/tmp/${top%%/*} ;;
                *) continue ;;
            esac
            if [ ! -e "$top" ]; then
                mkdir -p "$top"
                mount --rbind "/run/draingate/host-tmp/${top#/tmp/}" "$top" ||
                    fail "keeping $top of the host's /tmp"
            fi
        done
    fi
    if [ ! -e /sys/kernel/tracing/events ]; then
        mount -t tracefs tracefs /sys/kernel/tracing || fail "mounting tracefs"
    fi
    if ! mounted /sys/fs/bpf bpf; then
        mount -t bpf bpf /sys/fs/bpf || fail "mounting bpffs"
    fi
    # virtme-run links the kernel package's modules at /lib/modules/$(uname -r), but only when
    # the host has a /lib/modules to mount over (a host without kernel modules has none, and the
    # read-only root cannot get one here). Then modprobe, for the commands and for the kernel's
    # own module requests (iptables-nft's nf_tables modules), is a wrapper reading the package.
    if [ ! -e "/lib/modules/$(uname -r)/modules.dep" ]; then
        local modprobe
        modprobe=$(command -v modprobe) || fail "no modprobe on the host (Debian package kmod)"
        mkdir -p /run/draingate/bin
        printf '#!/bin/bash\nexec %q -d %q "$@"\n' "$modprobe" "$kernel_dir" \
            >/run/draingate/bin/modprobe
        chmod +x /run/draingate/bin/modprobe
        echo /run/draingate/bin/modprobe >/proc/sys/kernel/modprobe
        export PATH=/run/draingate/bin:$PATH
        echo "guest: modules from $kernel_dir (modprobe -d: the host has no /lib/modules)"
    fi
    # veth: pod namespaces; sch_ingress + cls_bpf: TC clsact with BPF filters; the rest: the
    # rehearsal's kube-proxy-style DNAT (iptables-restore, -m statistic, -j DNAT) through the
    # host's iptables, nf_tables or legacy. The kernel would load most on demand; loading them
    # here names the one that is missing.
    local modules=(veth sch_ingress cls_bpf nf_conntrack nf_nat xt_nat xt_statistic xt_comment
        xt_conntrack xt_mark xt_MASQUERADE)
    case $(iptables -V) in
        *nf_tables*) modules+=(nf_tables nft_compat nft_chain_nat) ;;
        *) modules+=(ip_tables iptable_nat) ;;
    esac
    # One modprobe for all (each start costs a second under TCG); one by one to name a failure.
    if ! modprobe -q -a "${modules[@]}"; then
        local module
        for module in "${modules[@]}"; do
            modprobe -q "$module" || fail "modprobe $module"
        done
    fi
    ip link add dg-vm0 type veth peer name dg-vm1 || fail "a veth pair cannot be created"
    ip link del dg-vm0
    tc qdisc add dev lo clsact || fail "tc qdisc add dev lo clsact"
    tc qdisc del dev lo clsact
    iptables -t nat -L -n >/dev/null || fail "iptables -t nat -L"
    # A rule like the rehearsal's Service, in a namespace of its own so nothing is left behind.
    ip netns add dg-vm-check || fail "ip netns add"
    ip netns exec dg-vm-check iptables -t nat -A OUTPUT -p tcp -d 198.18.0.1 --dport 80 \
        -m statistic --mode random --probability 0.5 -j DNAT --to-destination 198.18.0.2:80
    local rc=$?
    ip netns del dg-vm-check
    [ "$rc" -eq 0 ] || fail "an iptables DNAT rule with -m statistic cannot be added"
    ip link set lo up
}

main() {
    echo "guest: $(uname -r), booted in $(cut -d' ' -f1 /proc/uptime)s of guest time"
    prepare
    echo "guest: prepared: tmpfs /tmp, tracefs, bpffs, veth, clsact, iptables nat ($(iptables -V))"
    cd "$workspace" || fail "cd $workspace"
    bash "$out/command.sh"
    local rc=$?
    echo "guest: command exited with $rc at $(cut -d' ' -f1 /proc/uptime)s of guest time"
    return "$rc"
}

main 2>&1 | tee "$out/guest.log"
rc=${PIPESTATUS[0]}
echo "$rc" >"$out/exit-code.tmp" && mv "$out/exit-code.tmp" "$out/exit-code"
sync
exit "$rc"
