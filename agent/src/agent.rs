//! The node agent's core: reconciles the inventory with the kernel maps every second, reads
//! notable events from the ring buffer, and keeps every pod's drain state for the API.
//!
//! Over 800 lines for one reason: it is one type, [`Agent`], whose reconcile (`resync`,
//! `sync_pod`, slot allocation, restoring gone pods) and event handling change the same state
//! under the same invariants (a slot is a pod's until its counts are read out). What stands
//! alone is elsewhere: the drain model (`drain`), events (`events`), the inventory, Services
//! and peers, and this module's tests (`agent/tests.rs`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use draingate_common::{MAX_SLOTS, NO_SLOT, NotableEvent, connect_failure, event_kind, tcp_state};
use tokio::sync::{broadcast, watch};

use crate::{
    drain::{EventKind, PodDrain, PodEvent},
    events,
    inventory::{InventorySource, ObservedPod, PodId},
    loader::{KernelProbes, LoaderError, ProbeConfig},
    peers::PeerLog,
    services::{ServiceLookup, Translation},
};

/// How the agent behaves; the defaults are what `draingate agent` uses.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub probes: ProbeConfig,
    /// How often the inventory is compared with the kernel maps.
    pub resync: Duration,
    /// How long a vanished pod's window stays open for peers' late failures.
    pub linger: Duration,
    /// How long a finished pod is kept with its final totals.
    pub retention: Duration,
    /// The node's name as the agent reports it (see [`node_name`]).
    pub node: String,
    /// Where the node's own addresses are read: resets and refusals with them (kubelet probes)
    /// are not errors.
    pub node_addresses: NodeAddresses,
}

/// Where the agent reads the node's own addresses (the sources of kubelet probes), at each
/// resync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NodeAddresses {
    /// None: every peer is a client (`local` source on a plain host, where no kubelet runs).
    #[default]
    None,
    /// The agent's own network namespace: the host's, with the Kubernetes source
    /// (`hostNetwork`).
    Own,
    /// The network namespace at this path (a rehearsal's simulated node).
    Netns(std::path::PathBuf),
}

impl NodeAddresses {
    /// The addresses now; `None` for [`Self::None`].
    fn read(&self) -> Option<std::io::Result<Vec<IpAddr>>> {
        match self {
            Self::None => None,
            // Not through /proc/self/ns/net: entering a namespace needs CAP_SYS_ADMIN, which
            // the DaemonSet does not grant.
            Self::Own => Some(crate::inventory::own_addresses()),
            Self::Netns(path) => Some(crate::inventory::addresses_in(path)),
        }
    }

    /// Connection tracking of the node's namespace, where Service IPs are translated; `None`
    /// for [`Self::None`].
    fn services(&self) -> Option<std::io::Result<ServiceLookup>> {
        match self {
            Self::None => None,
            Self::Own => Some(ServiceLookup::open()),
            Self::Netns(path) => Some(ServiceLookup::open_in(path)),
        }
    }
}

/// This node's name: `NODE_NAME` (the downward API's `spec.nodeName` in the DaemonSet), else the
/// host name.
#[must_use]
pub fn node_name() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
        })
        .unwrap_or_else(|| "localhost".into())
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            probes: ProbeConfig::default(),
            resync: Duration::from_secs(1),
            linger: Duration::from_secs(30),
            retention: Duration::from_mins(15),
            node: node_name(),
            node_addresses: NodeAddresses::None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Inventory(#[from] crate::inventory::InventoryError),
    #[error("all {MAX_SLOTS} pod slots are in use")]
    SlotsExhausted,
}

/// Pods by uid, and what the kernel lost.
#[derive(Debug, Default)]
pub struct AgentState {
    pub pods: BTreeMap<String, PodDrain>,
    /// Kernel-side losses since the maps were created (overflows, failed reads).
    pub lost_events: u64,
    /// Resets under a second old the reset table forgot to remember newer ones
    /// (`LossCounters::reset_table_full`): each may have a late repeat counted as a new failure.
    pub resets_forgotten: u64,
    /// The node's name.
    pub node: String,
    /// Why the inventory may be incomplete now (API server unreachable), for /readyz.
    pub inventory_problem: Option<String>,
    /// This node's clients' connects that got no answer from an address that is not a pod here,
    /// for the gate to match with pods on other nodes (the peer view).
    pub peer_failures: PeerLog,
}

impl AgentState {
    /// Records a connect by a pod here that got no answer from `event.remote`: a failure of the
    /// pod at that address, if it is a pod here inside its window, else one for the gate.
    fn peer_failure(&mut self, event: &PodEvent) -> Option<PodEvent> {
        // The pod that had the address at the time: the newest one seen before it.
        let target = self
            .pods
            .values_mut()
            .filter(|p| {
                p.addresses.contains(&event.remote)
                    && p.timeline.first_seen.is_none_or(|seen| seen <= event.time)
            })
            .max_by_key(|p| p.timeline.first_seen);
        let Some(target) = target else {
            self.peer_failures.record(event.clone());
            return None;
        };
        let in_window = target.in_window(event.time);
        if in_window {
            target.peer_failures += 1;
        } else if target.timeline.terminating_since.is_some() {
            // After its window closed: no longer its failure.
            return None;
        }
        // Outside the window, before termination: one of its startup errors.
        let seen = PodEvent {
            pod: target.id.clone(),
            kind: EventKind::PeerConnectFailed,
            local: event.remote,
            local_port: event.remote_port,
            remote: event.local,
            remote_port: event.local_port,
            in_window,
            ..event.clone()
        };
        target.push_event(seen.clone());
        Some(seen)
    }
}

impl AgentState {
    /// A pod by uid, or by `namespace/name` (the newest with that name).
    #[must_use]
    pub fn find(&self, namespace: &str, name: &str, uid: &str) -> Option<&PodDrain> {
        if !uid.is_empty() {
            return self.pods.get(uid);
        }
        self.pods
            .values()
            .filter(|p| p.id.name == name && (namespace.is_empty() || p.id.namespace == namespace))
            .max_by_key(|p| p.timeline.first_seen)
    }
}

/// Shared handle to a running agent.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    pub state: Arc<Mutex<AgentState>>,
    /// Bumped after every change of pod state.
    pub changed: watch::Receiver<u64>,
    /// Every pod event as it is recorded.
    pub events: broadcast::Sender<PodEvent>,
    /// Whether the programs are attached (for /readyz).
    pub ready: watch::Receiver<bool>,
    /// Permits for the API's streams (`StreamEvents`, `WatchPods`), shared by the TCP and the
    /// unix socket faces: each stream holds one, so that clients cannot open streams (and the
    /// event backlog copied into each) without bound.
    pub streams: Arc<tokio::sync::Semaphore>,
}

/// How many `StreamEvents` and `WatchPods` streams the API serves at once.
pub const MAX_STREAMS: usize = 64;

/// The reconciler: owns the probes and the inventory source.
pub struct Agent {
    probes: KernelProbes,
    source: Box<dyn InventorySource>,
    config: AgentConfig,
    state: Arc<Mutex<AgentState>>,
    changed: watch::Sender<u64>,
    events: broadcast::Sender<PodEvent>,
    ready: watch::Sender<bool>,
    /// Offset from the kernel's boot clock to wall time.
    boot_to_wall: Duration,
    free_slots: BTreeSet<u32>,
    /// Addresses each pod is watched under, and the slot of each address from a previous agent.
    watched_by_previous: BTreeMap<IpAddr, u32>,
    /// Whether a problem with the node's addresses was logged (once).
    node_addresses_warned: bool,
    /// Connection tracking in the node's namespace, for connects to Service IPs that failed.
    services: Option<ServiceLookup>,
    /// Whether a failed lookup was logged (once).
    services_warned: bool,
    last_loss: u64,
    /// [`KernelProbes::skipped_runs`] at the last resync.
    last_skipped: u64,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").finish_non_exhaustive()
    }
}

fn boot_to_wall() -> Duration {
    let boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(Duration::from)
        .unwrap_or_default();
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(boot)
}

impl Agent {
    /// Loads the probes (taking over pinned ones) and prepares the state.
    pub fn new(
        config: AgentConfig,
        source: Box<dyn InventorySource>,
    ) -> Result<(Self, AgentHandle), AgentError> {
        let probes = KernelProbes::load(&config.probes)?;
        tracing::info!(
            programs = ?probes.programs,
            resets_from = ?probes.reset_source,
            resumed = probes.resumed,
            "kernel programs ready"
        );
        let watched_by_previous: BTreeMap<IpAddr, u32> = probes.watched()?.into_iter().collect();
        let services = match config.node_addresses.services() {
            Some(Ok(lookup)) => Some(lookup),
            Some(Err(err)) => {
                tracing::warn!(
                    error = %crate::telemetry::chain(&err),
                    "cannot read the node's connection tracking: failed connects to Service IPs \
                     stay with the Service address, not the pod behind it"
                );
                None
            }
            None => None,
        };
        // Processes tracked by a previous agent are re-tracked from the inventory.
        let state = Arc::new(Mutex::new(AgentState {
            node: config.node.clone(),
            ..AgentState::default()
        }));
        let (changed, changed_rx) = watch::channel(0);
        let (events, _) = broadcast::channel(4096);
        let (ready_tx, ready) = watch::channel(false);
        let handle = AgentHandle {
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
            state: Arc::clone(&state),
            changed: changed_rx,
            events: events.clone(),
            ready,
        };
        let agent = Self {
            probes,
            source,
            config,
            state,
            changed,
            events,
            ready: ready_tx,
            boot_to_wall: boot_to_wall(),
            // Slots a previous agent gave out stay reserved until the first resync has let their
            // pods claim them back; only then are the unclaimed ones freed.
            free_slots: (0..MAX_SLOTS)
                .filter(|slot| !watched_by_previous.values().any(|s| s == slot))
                .collect(),
            watched_by_previous,
            node_addresses_warned: false,
            services,
            services_warned: false,
            last_loss: 0,
            last_skipped: 0,
        };
        Ok((agent, handle))
    }

    fn wall(&self, boot_ns: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + self.boot_to_wall + Duration::from_nanos(boot_ns)
    }

    /// The kernel's boot clock at wall time `wall`: the inverse of [`Self::wall`].
    fn boot_ns(&self, wall: SystemTime) -> u64 {
        let since_boot = wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(self.boot_to_wall);
        u64::try_from(since_boot.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Runs until `shutdown` resolves: resyncs every `resync`, handles events as they come.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let ring = self
            .probes
            .take_events()
            .ok_or(AgentError::Loader(LoaderError::MissingMap("EVENTS")))?;
        // SAFETY: the ring buffer owns its map fd, which stays open and the same for the ring
        // buffer's whole life, and the AsyncFd owns the ring buffer.
        let registered = unsafe { tokio::io::unix::AsyncFd::register(ring) };
        let mut ring = registered.map_err(|source| {
            AgentError::Loader(LoaderError::PinDir {
                path: self.config.probes.pin_dir.clone(),
                source: source.into(),
            })
        })?;
        let mut poll = tokio::time::interval(EVENT_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticker = tokio::time::interval(self.config.resync);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = ticker.tick() => {
                    let started = std::time::Instant::now();
                    let result = self.resync(ring.get_mut());
                    tracing::debug!(elapsed_us = started.elapsed().as_micros(), "resync");
                    match result {
                        Ok(()) => { self.ready.send_if_modified(|r| !std::mem::replace(r, true)); }
                        Err(err) => tracing::warn!(error = %crate::telemetry::chain(&err), "resync failed; retrying"),
                    }
                }
                guard = ring.readable_mut() => {
                    let Ok(mut guard) = guard else { continue };
                    let batch = read_events(guard.get_inner_mut());
                    guard.clear_ready();
                    self.handle_events(&batch);
                }
                // Most events wake no one (see `EVENT_POLL`): they are read here.
                _ = poll.tick() => {
                    let batch = read_events(ring.get_mut());
                    self.handle_events(&batch);
                }
            }
        }
        tracing::info!("agent stopping; programs stay attached and maps pinned");
        Ok(())
    }

    fn handle_events(&mut self, batch: &[NotableEvent]) {
        if batch.is_empty() {
            return;
        }
        for event in batch {
            self.handle_event(event);
        }
        self.publish();
    }

    fn publish(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Compares the inventory with what the kernel watches, and refreshes every pod's counters.
    ///
    /// The events in `ring` are handled between the inventory's snapshot and its use: a
    /// process the snapshot no longer shows ran its exit program before, so its exit event,
    /// with the connections the kernel saw it hold, is read first. Otherwise the rescan would
    /// take the exit itself, with the connections open later (closing handshakes).
    pub fn resync(&mut self, ring: &mut RingBuf<MapData>) -> Result<(), AgentError> {
        let observed = self.source.snapshot()?;
        match self.config.node_addresses.read() {
            Some(Ok(addrs)) => {
                let left_out = self.probes.set_node_addresses(&addrs);
                if left_out > 0 && !self.node_addresses_warned {
                    self.node_addresses_warned = true;
                    tracing::warn!(
                        left_out,
                        "the node has more addresses than the agent keeps: probes from the rest count as clients"
                    );
                }
            }
            Some(Err(err)) if !self.node_addresses_warned => {
                self.node_addresses_warned = true;
                tracing::warn!(error = %crate::telemetry::chain(&err), "cannot read the node's addresses: kubelet probes may count as clients");
            }
            None | Some(Err(_)) => {}
        }
        // Before the ring is read: its events about those pods are theirs.
        self.restore_gone_pods(&observed)?;
        let batch = read_events(ring);
        self.handle_events(&batch);
        let now = SystemTime::now();
        let loss = self.probes.loss()?;
        // Program runs the kernel skipped are events lost as surely as a full ring's.
        let skipped = self.probes.skipped_runs();
        let lost_total = loss.read_errors + loss.socket_table_full + loss.ring_full + skipped;
        let shared = Arc::clone(&self.state);
        let mut state = shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.lost_events = lost_total;
        let forgotten_before =
            std::mem::replace(&mut state.resets_forgotten, loss.reset_table_full);
        state.inventory_problem = self.source.problem();
        let new_loss = lost_total > self.last_loss;
        if new_loss {
            tracing::warn!(
                ?loss,
                skipped_runs = skipped,
                "the kernel programs lost events"
            );
        }
        if loss.reset_table_full > forgotten_before {
            tracing::warn!(
                forgotten = loss.reset_table_full - forgotten_before,
                "resets under a second old were forgotten (reset table bucket full): a late \
                 repeat of one may be counted as a new failure"
            );
        }

        // Kubernetes mode: the packet program on the node's side of every pod interface (new
        // ones appear with new pods).
        let node_attach_error = if observed.iter().any(|pod| pod.netns.is_none()) {
            self.probes.watch_node_interfaces().err().map(|err| {
                let reason = crate::telemetry::chain(&err);
                tracing::warn!(error = %reason, "the packet program is not on every pod interface: HTTP responses (and before 6.10 resets) pods send may be missed");
                reason
            })
        } else {
            None
        };
        let mut seen = BTreeSet::new();
        for pod in observed {
            seen.insert(pod.id.uid.clone());
            // The kernel reuses a destroyed namespace's inode at once, so a local uid can come
            // back for a new pod: the old record keeps its final totals under its own uid.
            if let Some(previous) = state.pods.get(&pod.id.uid)
                && (previous.timeline.gone_at.is_some() || previous.id.name != pod.id.name)
                && let Some(mut previous) = state.pods.remove(&pod.id.uid)
            {
                let since = previous
                    .timeline
                    .first_seen
                    .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .unwrap_or_default()
                    .as_millis();
                previous.id.uid = format!("{}@{since}", previous.id.uid);
                tracing::info!(pod = %previous.id.name, uid = %previous.id.uid, "uid reused by a new pod: the old one is kept under this uid");
                state.pods.insert(previous.id.uid.clone(), previous);
            }
            if !state.pods.contains_key(&pod.id.uid) {
                // A previous agent's slot carries the pod's counts from before this agent.
                let inherited = pod
                    .addresses
                    .iter()
                    .any(|a| self.watched_by_previous.contains_key(a));
                let slot = self.allocate_slot(&pod)?;
                tracing::info!(pod = %pod.id.name, uid = %pod.id.uid, slot, addresses = ?pod.addresses, "new pod");
                self.probes
                    .set_slot_id(slot, &pod.id.namespace, &pod.id.name, &pod.id.uid)?;
                let mut drain = PodDrain::new(pod.id.clone(), slot, now);
                drain.untracked_at_start = loss.socket_table_full;
                // First seen already deleted (it lived less than a resync, or its deletion came
                // before its address did): its connections were never watched, so its drain
                // cannot be vouched for. Never a pass.
                if pod.deleting_since.is_some() && !inherited {
                    tracing::warn!(pod = %pod.id.name, uid = %pod.id.uid, "first seen already deleted: its verdict is unknown");
                    drain.lost = Some(
                        "the agent first saw it after its deletion was asked for: its \
                         connections before that were never watched"
                            .to_owned(),
                    );
                }
                state.pods.insert(pod.id.uid.clone(), drain);
            }
            let drain = state.pods.get_mut(&pod.id.uid).expect("inserted above");
            // Kubernetes mode: which interface is whose is not known, so every pod of the node
            // may be missing resets.
            if let Some(reason) = &node_attach_error
                && drain.lost.is_none()
            {
                drain.lost = Some(format!(
                    "the packet program could not be attached to every pod interface of the \
                     node, so HTTP responses (and before 6.10 resets) this pod sends may not be \
                     counted: {reason}"
                ));
            }
            self.sync_pod(drain, &pod, now)?;
        }

        let linger = self.config.linger;
        let retention = self.config.retention;
        let mut expired = Vec::new();
        for (uid, drain) in &mut state.pods {
            if !seen.contains(uid) && drain.timeline.gone_at.is_none() {
                tracing::info!(pod = %drain.id.name, uid, "pod gone");
                drain.timeline.gone_at = Some(now);
                // The addresses stay on record: peers' connects to them are still its failures.
                for addr in &drain.addresses {
                    self.probes.unwatch(*addr)?;
                }
                for pid in std::mem::take(&mut drain.pids) {
                    self.probes.untrack_task(pid)?;
                }
                drain.exited(now);
            }
            if !drain.window_closed() {
                if drain.timeline.terminating_since.is_none()
                    && let Some(since) = self.probes.window_since(drain.slot)?
                {
                    drain.open_window(self.wall(since));
                }
                let totals = self.probes.slot_totals(drain.slot)?;
                drain.update_totals(totals, now);
                drain.charge_unseen_packets();
                if totals.last_accept_ns != 0 {
                    drain.timeline.last_accepted = Some(self.wall(totals.last_accept_ns));
                }
                if new_loss && drain.timeline.terminating_since.is_some() {
                    drain.lost = Some(if skipped > self.last_skipped {
                        format!(
                            "the kernel skipped {} program runs while the pod terminated (another \
                             BPF program or a bpf() map syscall held the CPU)",
                            skipped - self.last_skipped
                        )
                    } else {
                        format!("the kernel lost events while the pod terminated ({loss:?})")
                    });
                }
                // Sockets the full table could not track since the pod appeared, before its
                // window too: they may be its connections, missing from what its exit cut.
                drain.charge_untracked(loss.socket_table_full);
            }
            if let Some(gone) = drain.timeline.gone_at {
                let since = now.duration_since(gone).unwrap_or_default();
                if since >= linger && !drain.window_closed() {
                    drain.timeline.window_closed_at = Some(gone + linger);
                }
                if since >= linger + retention {
                    expired.push(uid.clone());
                }
            }
        }
        for uid in expired {
            if let Some(drain) = state.pods.remove(&uid) {
                self.free_slots.insert(drain.slot);
            }
        }
        // Peer failures are kept as long as finished pods are.
        if let Some(before) = now.checked_sub(linger + retention) {
            state.peer_failures.expire(before);
        }
        self.last_loss = lost_total;
        self.last_skipped = skipped;
        // After the first resync of a complete inventory, what no pod claimed back is stale
        // (pods gone while no agent ran were restored above): stop watching those addresses
        // and free their slots (they are zeroed when given out again).
        let unclaimed = if state.inventory_problem.is_none() {
            std::mem::take(&mut self.watched_by_previous)
        } else {
            BTreeMap::new()
        };
        for (addr, slot) in unclaimed {
            self.probes.unwatch(addr)?;
            if !state.pods.values().any(|p| p.slot == slot) {
                self.free_slots.insert(slot);
            }
        }
        drop(state);
        // The kernel sees this pass's address changes at once, in one table rebuild (outside
        // the state lock: it waits for running programs).
        self.probes.apply_addresses()?;
        self.publish();
        Ok(())
    }

    /// After a restart, the pods an earlier agent watched that are gone now: they went away
    /// while no agent ran. Each is reported from what the pins kept (its identity, its
    /// addresses, the kernel's counts and window, the events still in the ring) as a pod that
    /// is gone, so that its failures are not lost with it: `fail` when the kernel counted
    /// errors in its window, `unknown` otherwise (what happened while no agent ran cannot all
    /// be checked), never absent. Slots without an identity (an older agent's) are freed.
    fn restore_gone_pods(&mut self, observed: &[ObservedPod]) -> Result<(), AgentError> {
        // Only against a complete inventory: a pod the source has not listed yet is not gone.
        if self.watched_by_previous.is_empty() || self.source.problem().is_some() {
            return Ok(());
        }
        let claimed: BTreeSet<u32> = observed
            .iter()
            .flat_map(|pod| &pod.addresses)
            .filter_map(|addr| self.watched_by_previous.get(addr).copied())
            .collect();
        let mut gone: BTreeMap<u32, Vec<IpAddr>> = BTreeMap::new();
        for (addr, slot) in &self.watched_by_previous {
            if !claimed.contains(slot) {
                gone.entry(*slot).or_default().push(*addr);
            }
        }
        if gone.is_empty() {
            return Ok(());
        }
        let now = SystemTime::now();
        let shared = Arc::clone(&self.state);
        let mut state = shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (slot, addresses) in gone {
            let Some((namespace, name, uid)) = self.probes.slot_id(slot)? else {
                continue;
            };
            if state.pods.contains_key(&uid) {
                continue;
            }
            self.watched_by_previous.retain(|_, s| *s != slot);
            let mut drain = PodDrain::new(
                PodId {
                    namespace,
                    name,
                    uid: uid.clone(),
                },
                slot,
                now,
            );
            drain.timeline.first_seen = None;
            drain.addresses = addresses;
            if let Some(since) = self.probes.window_since(slot)? {
                drain.open_window(self.wall(since));
            }
            drain.update_totals(self.probes.slot_totals(slot)?, now);
            if drain.errors() == 0 {
                drain.open_window(now);
                drain.lost = Some(
                    "it went away while no agent ran: its end could not be checked".to_owned(),
                );
            }
            tracing::warn!(pod = %drain.id.name, uid, slot, errors = drain.errors(), "a pod went away while no agent ran: reported from the kernel's record");
            state.pods.insert(uid, drain);
        }
        Ok(())
    }

    fn allocate_slot(&mut self, pod: &ObservedPod) -> Result<u32, AgentError> {
        // After a restart, a pod keeps the slot the previous agent gave its address: its counts
        // and open sockets are there.
        if let Some(slot) = pod
            .addresses
            .iter()
            .find_map(|addr| self.watched_by_previous.get(addr).copied())
        {
            // Every address of the slot is claimed with it.
            self.watched_by_previous.retain(|_, s| *s != slot);
            return Ok(slot);
        }
        let slot = self
            .free_slots
            .pop_first()
            .ok_or(AgentError::SlotsExhausted)?;
        self.probes.reset_slot(slot)?;
        Ok(slot)
    }

    fn sync_pod(
        &mut self,
        drain: &mut PodDrain,
        pod: &ObservedPod,
        now: SystemTime,
    ) -> Result<(), AgentError> {
        // The pod's interfaces come with its addresses: attach when they change (a new pod,
        // a restart), not at every resync.
        if pod.addresses != drain.addresses
            && let Some(netns) = &pod.netns
            && let Err(err) = self.probes.watch_pod_interfaces(netns)
            && drain.lost.is_none()
        {
            let reason = format!(
                "the packet program could not be attached to the pod's interfaces, so HTTP \
                 responses (and before 6.10 resets) it sends are not counted: {}",
                crate::telemetry::chain(&err)
            );
            tracing::warn!(pod = %pod.id.name, "{reason}");
            drain.lost = Some(reason);
        }
        for addr in &pod.addresses {
            if !drain.addresses.contains(addr) {
                self.probes.watch(*addr, drain.slot)?;
            }
        }
        for addr in &drain.addresses {
            if !pod.addresses.contains(addr) {
                self.probes.unwatch(*addr)?;
            }
        }
        drain.addresses.clone_from(&pod.addresses);
        if drain.meta != pod.meta {
            drain.meta.clone_from(&pod.meta);
        }
        // A process of the pod that is still alive but missing from this snapshot (its
        // namespace link is briefly unreadable while it execs) stays the pod's: only a process
        // that is really gone ends the pod.
        let mut pids = pod.pids.clone();
        pids.extend(
            drain
                .pids
                .iter()
                .filter(|pid| !pod.pids.contains(pid) && process_alive(**pid)),
        );
        for pid in &pids {
            if !drain.pids.contains(pid) {
                self.probes.track_task(*pid, drain.slot)?;
            }
        }
        for pid in &drain.pids {
            if !pids.contains(pid) {
                self.probes.untrack_task(*pid)?;
            }
        }
        let had_processes = !drain.pids.is_empty();
        drain.pids = pids;
        if !drain.pids.is_empty() {
            drain.running_again();
        }
        // Deletion opens the termination window, if no SIGTERM did already.
        if let Some(deleting) = pod.deleting_since
            && drain.timeline.terminating_since.is_none()
        {
            // The kernel's window is the truth: a SIGTERM may have opened it first.
            if let Some(since) = self.probes.window_since(drain.slot)? {
                drain.open_window(self.wall(since));
            } else {
                // The kernel counts from now on; the errors since the deletion are taken from
                // their events.
                self.probes
                    .open_window(drain.slot, self.boot_ns(deleting))?;
                drain.open_window_late(deleting, SystemTime::now());
            }
        }
        if had_processes && drain.pids.is_empty() {
            drain.exited(now);
        }
        // A source that sees exits without the processes (Kubernetes without hostPID).
        if let Some(at) = pod.exited_at
            && drain.pids.is_empty()
        {
            drain.exited(at);
        }
        drain.timeline.left_endpoints = pod.left_endpoints;
        drain.in_service = pod.in_service;
        if let Some(at) = pod.ready_since.or_else(|| pod.in_service.then_some(now)) {
            drain.ready(at);
        }
        drain.grace_period = pod.grace_period;
        Ok(())
    }

    /// The pod a SIGNAL or EXIT event is about.
    fn pod_of_process(state: &AgentState, slot: u32, pid: u32) -> Option<String> {
        if slot != NO_SLOT
            && let Some(pod) = state
                .pods
                .values()
                .find(|p| p.slot == slot && p.timeline.gone_at.is_none())
        {
            return Some(pod.id.uid.clone());
        }
        if let Some(pod) = state.pods.values().find(|p| p.pids.contains(&pid)) {
            return Some(pod.id.uid.clone());
        }
        // A process the last resync did not see yet: its namespace says which pod.
        let inode = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok()?.ino();
        let uid = format!("netns-{inode}");
        state.pods.contains_key(&uid).then_some(uid)
    }

    /// The backend a failed connect to a Service IP was translated to, from the node's
    /// connection tracking, looked up while the entry is surely there (now).
    fn service_backend(&mut self, event: &NotableEvent) -> Option<SocketAddr> {
        if event.kind != event_kind::CONNECT_FAILED || event.reason != connect_failure::NO_ANSWER {
            return None;
        }
        let lookup = self.services.as_mut()?;
        let client = SocketAddr::new(IpAddr::from(event.local), event.local_port);
        let server = SocketAddr::new(IpAddr::from(event.remote), event.remote_port);
        match lookup.translation(client, server) {
            Ok(Translation::Backend(backend)) => Some(backend),
            Ok(Translation::Direct | Translation::Unknown) => None,
            Err(err) => {
                if !self.services_warned {
                    self.services_warned = true;
                    tracing::warn!(error = %crate::telemetry::chain(&err), %server, "connection tracking lookup failed");
                }
                None
            }
        }
    }

    fn handle_event(&mut self, event: &NotableEvent) {
        let time = self.wall(event.time_ns);
        let backend = self.service_backend(event);
        let shared = Arc::clone(&self.state);
        let mut state = shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match event.kind {
            event_kind::SIGNAL => {
                let Some(uid) = Self::pod_of_process(&state, event.slot, event.pid) else {
                    return;
                };
                let Some(pod) = state.pods.get_mut(&uid) else {
                    return;
                };
                // The kernel opened the window when it knew the process; otherwise open it now,
                // at the signal's time.
                if let Err(err) = self.probes.open_window(pod.slot, event.time_ns) {
                    tracing::warn!(error = %crate::telemetry::chain(&err), "cannot open the termination window");
                }
                let since = self
                    .probes
                    .window_since(pod.slot)
                    .ok()
                    .flatten()
                    .unwrap_or(event.time_ns);
                pod.open_window(self.wall(since));
                if let Ok(loss) = self.probes.loss() {
                    pod.charge_untracked(loss.socket_table_full);
                }
                if u32::from(event.signal) == 9 && pod.timeline.sigkill_at.is_none() {
                    pod.timeline.sigkill_at = Some(time);
                }
                tracing::info!(pod = %pod.id.name, signal = event.signal, pid = event.pid, "termination signal");
            }
            event_kind::EXIT => {
                let Some(uid) = Self::pod_of_process(&state, event.slot, event.pid) else {
                    return;
                };
                let Some(pod) = state.pods.get_mut(&uid) else {
                    return;
                };
                pod.pids.retain(|&p| p != event.pid);
                let _ = self.probes.untrack_task(event.pid);
                if pod.pids.is_empty() {
                    if let Ok(totals) = self.probes.slot_totals(pod.slot) {
                        pod.update_totals(totals, time);
                    }
                    if let Ok(loss) = self.probes.loss() {
                        pod.charge_untracked(loss.socket_table_full);
                    }
                    // The kernel counted the connections still held at the exit itself.
                    pod.exited_with_open(time, u64::from(event.held));
                    tracing::info!(pod = %pod.id.name, open_at_exit = ?pod.open_at_exit, "last process exited");
                }
            }
            kind => {
                let kind = match kind {
                    event_kind::RESET_SENT => EventKind::ResetSent,
                    event_kind::RESET_RECEIVED => EventKind::ResetReceived,
                    event_kind::REFUSED => EventKind::Refused,
                    event_kind::CONNECT_FAILED => EventKind::ConnectFailed,
                    event_kind::HTTP_5XX => EventKind::Http5xx,
                    event_kind::REQUEST_CUT => EventKind::RequestCut,
                    event_kind::H2_GOAWAY => EventKind::H2Goaway,
                    event_kind::H2_RESET => EventKind::H2Reset,
                    _ => return,
                };
                let Some(pod) = state
                    .pods
                    .values_mut()
                    .filter(|p| p.slot == event.slot)
                    .max_by_key(|p| p.timeline.first_seen)
                else {
                    return;
                };
                let in_window = pod.in_window(time);
                // A connect to a Service IP is the backend's failure: name it, keep the Service.
                let dialed = SocketAddr::new(IpAddr::from(event.remote), event.remote_port);
                let (remote, service) = match backend {
                    Some(backend) => (backend, Some(dialed)),
                    None => (dialed, None),
                };
                let pod_event = PodEvent {
                    pod: pod.id.clone(),
                    kind,
                    time,
                    local: IpAddr::from(event.local),
                    local_port: event.local_port,
                    remote: remote.ip(),
                    remote_port: remote.port(),
                    service,
                    tcp_state: tcp_state::name(u32::from(event.tcp_state)),
                    reason: event.reason,
                    in_window,
                    from_node: event.flags & draingate_common::EVENT_FROM_NODE != 0,
                    request: crate::drain::request_line(event.request),
                };
                pod.push_event(pod_event.clone());
                let peer = (kind == EventKind::ConnectFailed
                    && event.reason == connect_failure::NO_ANSWER)
                    .then(|| state.peer_failure(&pod_event))
                    .flatten();
                // Nobody following is fine.
                let _ = self.events.send(pod_event);
                if let Some(peer) = peer {
                    let _ = self.events.send(peer);
                }
            }
        }
    }
}

/// Whether `pid` is a live process: it exists and is neither a zombie nor dead.
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which is in parentheses and may hold anything.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// How often the agent reads the ring buffer of events without being woken (and it reads it
/// in each resync too). The kernel programs wake it at once only for termination signals and
/// pod process exits, and when a burst has filled a quarter of the ring; every other event
/// (resets, refusals, failed connects) waits for this poll, at most this long. Each event
/// carries its kernel time and the counts are in the kernel's maps, so the wait delays what
/// the agent shows in its event stream, never what it counts.
pub const EVENT_POLL: Duration = Duration::from_millis(100);

/// Every event record in the ring now; a malformed one is logged and skipped.
fn read_events(ring: &mut RingBuf<MapData>) -> Vec<NotableEvent> {
    let mut batch = Vec::new();
    while let Some(record) = ring.next() {
        if let Some(event) = events::decode(&record[..]) {
            batch.push(event);
        } else {
            tracing::warn!(len = record.len(), "malformed event record");
        }
    }
    batch
}

/// The identity of a pod as the API names it (for errors).
#[must_use]
pub fn describe(id: &PodId) -> String {
    format!("{}/{}", id.namespace, id.name)
}

#[cfg(test)]
mod tests;
