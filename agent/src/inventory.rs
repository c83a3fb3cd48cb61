//! What pods exist on this node. A source produces snapshots; the agent diffs them. `local` (this
//! module) treats every network namespace on the host as a pod; a `kubernetes` source will be a
//! second implementation of [`InventorySource`], not a rewrite.

pub mod kubernetes;

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::Path,
};

/// The identity of a pod as people and scripts name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodId {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// One pod as a source sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedPod {
    pub id: PodId,
    /// Addresses other pods reach it by: no loopback, no link-local.
    pub addresses: Vec<IpAddr>,
    /// Processes (tgids) inside the pod; empty when none are left.
    pub pids: Vec<u32>,
    /// When the pod's deletion was asked for (Kubernetes' deletionTimestamp less its grace period), if it was: its termination
    /// window opens then, or at the first SIGTERM if that comes first.
    pub deleting_since: Option<std::time::SystemTime>,
    /// What the pod belongs to; empty for a bare local namespace.
    pub meta: PodMeta,
    /// When all its containers had exited, for a source that sees that without the processes
    /// (Kubernetes without hostPID); `None` when unknown or still running.
    pub exited_at: Option<std::time::SystemTime>,
    /// When it stopped taking new connections from its Services (its endpoints no longer ready),
    /// for a source that knows.
    pub left_endpoints: Option<std::time::SystemTime>,
    /// A ready endpoint of some Service now, for a source that knows.
    pub in_service: bool,
    /// When it became ready, for a source that knows the time (a rehearsal).
    pub ready_since: Option<std::time::SystemTime>,
    /// Its termination grace period, for a source that knows.
    pub grace_period: Option<std::time::Duration>,
    /// Its network namespace, for a source that can enter it (local mode): where the reset
    /// program is attached on kernels that need it.
    pub netns: Option<std::path::PathBuf>,
}

/// What a pod belongs to, as the rollout gate groups pods: its top owner (a Deployment through
/// its ReplicaSet, or an Argo Rollout) and its `pod-template-hash` label.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PodMeta {
    pub owner_kind: String,
    pub owner_name: String,
    pub pod_template_hash: String,
}

/// What a caller that creates and deletes local pods itself (a rehearsal, simulating the API
/// server) knows about one of them.
#[derive(Debug, Clone, Default)]
pub struct LocalPodInfo {
    /// The namespace to report instead of [`LOCAL_NAMESPACE`].
    pub namespace: Option<String>,
    pub meta: PodMeta,
    /// The simulated deletionTimestamp.
    pub deleting_since: Option<std::time::SystemTime>,
    /// When it passed its readiness probe (or started, without one) and joined the Service.
    pub ready_since: Option<std::time::SystemTime>,
}

/// [`LocalPodInfo`] by network namespace name, shared between such a caller and its
/// [`LocalSource`].
pub type LocalPods = std::sync::Arc<std::sync::Mutex<HashMap<String, LocalPodInfo>>>;

/// A source of pods.
pub trait InventorySource: Send {
    /// The pods that exist now.
    fn snapshot(&mut self) -> Result<Vec<ObservedPod>, InventoryError>;

    /// Why the source cannot be trusted to be complete now (e.g. the API server is
    /// unreachable), for /readyz; `None` when it is fine.
    fn problem(&self) -> Option<String> {
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The `namespace` every local pod is reported in.
pub const LOCAL_NAMESPACE: &str = "local";

/// Every network namespace on the host but the host's own: named ones (`ip netns`, under
/// `/run/netns`) by their name, others by the process that holds them (`<comm>-<pid>`).
#[derive(Debug)]
pub struct LocalSource {
    netns_dir: std::path::PathBuf,
    proc_dir: std::path::PathBuf,
    known: Option<LocalPods>,
    /// A namespace that is the node's, not a pod's (a rehearsal's simulated node).
    node_netns: Option<std::path::PathBuf>,
}

impl Default for LocalSource {
    fn default() -> Self {
        Self {
            netns_dir: "/run/netns".into(),
            proc_dir: "/proc".into(),
            known: None,
            node_netns: None,
        }
    }
}

impl LocalSource {
    /// A local source whose pods' namespaces, owners and deletion times the caller sets
    /// through `known`.
    #[must_use]
    pub fn with_known(known: LocalPods) -> Self {
        Self {
            known: Some(known),
            ..Self::default()
        }
    }

    /// The namespace at `path` is the node's (where its kubelet would run), not a pod.
    #[must_use]
    pub fn with_node(mut self, path: std::path::PathBuf) -> Self {
        self.node_netns = Some(path);
        self
    }
}

impl InventorySource for LocalSource {
    fn snapshot(&mut self) -> Result<Vec<ObservedPod>, InventoryError> {
        // The agent runs in the host network namespace (hostNetwork); that one is not a pod.
        let host = netns_inode(&self.proc_dir.join("self/ns/net"));
        let node = self.node_netns.as_deref().and_then(netns_inode);
        // Processes by network namespace inode.
        let mut pids_by_ns: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
        let proc_entries = fs::read_dir(&self.proc_dir).map_err(|source| InventoryError::Read {
            path: self.proc_dir.display().to_string(),
            source,
        })?;
        for entry in proc_entries.filter_map(Result::ok) {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            // Kernel threads and processes that exited meanwhile have no readable namespace.
            if let Some(inode) = netns_inode(&entry.path().join("ns/net"))
                && Some(inode) != host
            {
                pids_by_ns.entry(inode).or_default().push(pid);
            }
        }

        let mut named: HashMap<u64, String> = HashMap::new();
        if let Ok(entries) = fs::read_dir(&self.netns_dir) {
            for entry in entries.filter_map(Result::ok) {
                if let (Ok(meta), Some(name)) = (entry.metadata(), entry.file_name().to_str()) {
                    named.insert(meta.ino(), name.to_owned());
                }
            }
        }

        let mut pods = Vec::new();
        let mut inodes: Vec<u64> = named.keys().copied().collect();
        inodes.extend(
            pids_by_ns
                .keys()
                .copied()
                .filter(|i| !named.contains_key(i)),
        );
        inodes.sort_unstable();
        inodes.retain(|&inode| Some(inode) != node);
        for inode in inodes {
            let processes = pids_by_ns.remove(&inode).unwrap_or_default();
            let (name, path) = if let Some(name) = named.get(&inode) {
                (name.clone(), self.netns_dir.join(name))
            } else {
                let Some(&first) = processes.first() else {
                    continue;
                };
                let comm = fs::read_to_string(self.proc_dir.join(format!("{first}/comm")))
                    .map_or_else(|_| "process".into(), |c| c.trim().to_owned());
                (
                    format!("{comm}-{first}"),
                    self.proc_dir.join(format!("{first}/ns/net")),
                )
            };
            // A namespace that vanished between listing and reading simply is not reported.
            let Ok(addresses) = addresses_in(&path) else {
                continue;
            };
            let info = self
                .known
                .as_ref()
                .and_then(|k| {
                    k.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .get(&name)
                        .cloned()
                })
                .unwrap_or_default();
            pods.push(ObservedPod {
                deleting_since: info.deleting_since,
                ready_since: info.ready_since,
                meta: info.meta,
                exited_at: None,
                left_endpoints: None,
                in_service: false,
                grace_period: None,
                id: PodId {
                    namespace: info.namespace.unwrap_or_else(|| LOCAL_NAMESPACE.into()),
                    name,
                    uid: format!("netns-{inode}"),
                },
                addresses,
                pids: processes,
                netns: Some(path),
            });
        }
        Ok(pods)
    }
}

/// The inode that identifies the network namespace behind `path` (`/proc/<pid>/ns/net`).
fn netns_inode(path: &Path) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.ino())
}

/// The addresses of the namespace behind `path`, read on a thread that entered it; the agent's
/// own threads stay in the host namespace. Entering needs `CAP_SYS_ADMIN`: for the agent's own
/// namespace use [`own_addresses`].
pub fn addresses_in(path: &Path) -> std::io::Result<Vec<IpAddr>> {
    let file = fs::File::open(path)?;
    crate::netns::run_in(&file, own_addresses)?
}

/// The addresses of the calling thread's network namespace, through netlink (glibc's
/// `getifaddrs`): no capability needed, so this works under the DaemonSet's.
pub fn own_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut addresses: Vec<IpAddr> = nix::ifaddrs::getifaddrs()?
        .filter_map(|ifaddr| ifaddr.address)
        .filter_map(|addr| {
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(is_pod_address)
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
    Ok(addresses)
}

/// Loopback and link-local addresses are not how other pods reach a pod.
fn is_pod_address(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local() && !v6.is_unspecified(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::is_pod_address;

    #[test]
    fn loopback_and_link_local_are_not_pod_addresses() {
        for (addr, expected) in [
            ("198.18.0.1", true),
            ("2001:2::1", true),
            ("127.0.0.1", false),
            ("::1", false),
            ("fe80::1", false),
            ("169.254.1.1", false),
        ] {
            let ip: IpAddr = addr.parse().unwrap();
            assert_eq!(is_pod_address(&ip), expected, "{addr}");
        }
    }
}
