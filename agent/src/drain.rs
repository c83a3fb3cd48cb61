//! A pod's termination window, timeline and verdict, exactly as docs/verdict.md defines them.
//! Pure bookkeeping: the agent feeds it counters, processes and events; nothing here touches the
//! kernel, so every rule is unit-tested.

use std::{collections::VecDeque, fmt::Write as _, net::IpAddr, time::SystemTime};

use crate::{inventory::PodId, loader::SlotTotals};

/// Most events kept per pod; older ones are dropped first and counted in `events_dropped`.
pub const EVENTS_PER_POD: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    Terminating,
    Exited,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Not terminating: no window has opened.
    None,
    Pending,
    Pass,
    Fail,
    /// Data was lost while the window was open; never counts as pass.
    Unknown,
}

impl Verdict {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Pending => "pending",
            Self::Pass => "pass",
            Self::Fail => "fail",
            Self::Unknown => "unknown",
        }
    }
}

impl Phase {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Terminating => "terminating",
            Self::Exited => "exited",
        }
    }
}

/// When things happened to the pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeline {
    pub first_seen: Option<SystemTime>,
    /// First seen ready: a ready endpoint of a Service (Kubernetes), or as the caller that made
    /// the pod said (a rehearsal).
    pub ready_at: Option<SystemTime>,
    /// The window opened: first SIGTERM (or SIGKILL) to one of its processes.
    pub terminating_since: Option<SystemTime>,
    pub last_accepted: Option<SystemTime>,
    /// Open connections reached zero inside the window.
    pub drained_at: Option<SystemTime>,
    /// Its last process exited.
    pub exited_at: Option<SystemTime>,
    pub sigkill_at: Option<SystemTime>,
    /// It stopped taking new connections from its Services (Kubernetes: its endpoints are no
    /// longer ready); traffic accepted after this arrived some other way.
    pub left_endpoints: Option<SystemTime>,
    /// Its addresses (namespace) disappeared; the window closes a linger later.
    pub gone_at: Option<SystemTime>,
    /// The window closed (`gone_at` plus the linger): the totals are final.
    pub window_closed_at: Option<SystemTime>,
}

/// What kind of failure an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    ResetSent,
    ResetReceived,
    Refused,
    ConnectFailed,
    /// A client on this node got no answer connecting to this pod (the peer view).
    PeerConnectFailed,
    /// The pod answered a client's HTTP/1.x request with a 5xx status (`reason`).
    Http5xx,
    /// The pod closed a connection (FIN) with a client's HTTP/1.x request unanswered.
    RequestCut,
    /// The pod sent an HTTP/2 GOAWAY (`reason`: its error code): its drain signal, no error.
    H2Goaway,
    /// The pod reset an HTTP/2 stream with an error (`reason`: the error code).
    H2Reset,
}

impl EventKind {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ResetSent => "reset_sent",
            Self::ResetReceived => "reset_received",
            Self::Refused => "refused",
            Self::ConnectFailed => "connect_failed",
            Self::PeerConnectFailed => "peer_connect_failed",
            Self::Http5xx => "http_5xx",
            Self::RequestCut => "request_cut",
            Self::H2Goaway => "http2_goaway",
            Self::H2Reset => "http2_reset",
        }
    }
}

/// One notable event of a pod, with its 5-tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEvent {
    pub pod: PodId,
    pub kind: EventKind,
    pub time: SystemTime,
    pub local: IpAddr,
    pub local_port: u16,
    pub remote: IpAddr,
    pub remote_port: u16,
    pub tcp_state: &'static str,
    /// Kernel reset reason number (6.10+), 0 when unknown; for a failed connect, one of
    /// `draingate_common::connect_failure`.
    pub reason: u32,
    /// Inside the termination window: counts as an error (for kinds that are errors).
    pub in_window: bool,
    /// The peer is one of the node's own addresses (a kubelet probe): never an error.
    pub from_node: bool,
    /// For a failed connect to a Service IP: that address, which the node's connection
    /// tracking translated to `remote` (the backend pod's).
    pub service: Option<std::net::SocketAddr>,
    /// For an HTTP 5xx or a cut request: the start of the request line (see
    /// [`request_line`]), when the kernel saw the request.
    pub request: Option<String>,
}

/// The start of a request line from the first bytes the kernel kept of it: printable ASCII up
/// to the end of the line, cut at the space before the version (`GET /api`, `POST /v`);
/// `None` when none were kept.
#[must_use]
pub fn request_line(bytes: [u8; 8]) -> Option<String> {
    let end = bytes
        .iter()
        .position(|&b| b == 0 || b == b'\r' || b == b'\n')
        .unwrap_or(bytes.len());
    let text: String = bytes[..end]
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                char::from(b)
            } else {
                '?'
            }
        })
        .collect();
    let text = match text.match_indices(' ').nth(1) {
        Some((second_space, _)) => text[..second_space].to_owned(),
        None => text,
    };
    (!text.is_empty()).then_some(text)
}

impl PodEvent {
    /// A reset or refusal with a client (not the node), a client's connect that got no
    /// answer from the pod (the peer view), or a 5xx answer to a client: a failure of the
    /// pod's, inside its window or outside it.
    #[must_use]
    pub const fn is_error(&self) -> bool {
        !self.from_node
            && matches!(
                self.kind,
                EventKind::ResetSent
                    | EventKind::ResetReceived
                    | EventKind::Refused
                    | EventKind::PeerConnectFailed
                    | EventKind::Http5xx
                    | EventKind::RequestCut
                    | EventKind::H2Reset
            )
    }
}

/// A pod's errors outside its termination window: how it started (see [`PodDrain::startup`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Startup {
    pub resets_sent: u64,
    pub resets_received: u64,
    pub refused: u64,
    /// Clients' connects to it that got no answer (timed out, or unreachable), from the
    /// clients' side: an accept queue that overflowed drops SYNs without a packet back.
    pub no_answer: u64,
    /// HTTP responses with a 5xx status to clients.
    pub http_5xx: u64,
    /// Clients' HTTP requests it closed connections on without answering.
    pub requests_cut: u64,
    /// HTTP/2 streams it reset with an error.
    pub h2_resets: u64,
    /// Of all of them, the ones before the pod was ready.
    pub before_ready: u64,
    pub first_error_at: Option<SystemTime>,
    /// The last one, from the events: an old pod's errors before its termination fail the
    /// rollout when they come after the rollout began.
    pub last_error_at: Option<SystemTime>,
}

impl Startup {
    #[must_use]
    pub const fn errors(&self) -> u64 {
        self.resets_sent
            + self.resets_received
            + self.refused
            + self.no_answer
            + self.http_5xx
            + self.requests_cut
            + self.h2_resets
    }

    /// What the errors say, for people (`name` is the pod's): empty when there were none.
    #[must_use]
    pub fn reason(&self, name: &str) -> String {
        let errors = self.errors();
        if errors == 0 {
            return String::new();
        }
        let after = errors.saturating_sub(self.before_ready);
        let resets = self.resets_sent + self.resets_received;
        let mut reason = if self.refused > 0 {
            let hint = if after > 0 {
                "it was ready before its server listened: no readiness probe, or one that does \
                 not check the server's port?"
            } else {
                "clients reached it before it was ready"
            };
            format!(
                "{name} refused {} connections while nothing listened on the port ({} before \
                 it was ready, {after} after): {hint}",
                self.refused, self.before_ready
            )
        } else {
            format!(
                "{name} had {errors} errors outside its termination window ({} before it was \
                 ready, {after} after)",
                self.before_ready
            )
        };
        if resets > 0 {
            let _ = write!(
                reason,
                "; {} resets sent, {} received",
                self.resets_sent, self.resets_received
            );
        }
        if self.no_answer > 0 {
            let _ = write!(
                reason,
                "; {} client connects got no answer (timed out: a full accept queue drops SYNs)",
                self.no_answer
            );
        }
        if self.requests_cut > 0 {
            let _ = write!(reason, "; {} HTTP requests cut", self.requests_cut);
        }
        if self.h2_resets > 0 {
            let _ = write!(reason, "; {} HTTP/2 streams reset", self.h2_resets);
        }
        if self.http_5xx > 0 {
            let _ = write!(reason, "; {} HTTP 5xx responses", self.http_5xx);
        }
        reason
    }
}

/// Everything the agent knows of one pod.
#[derive(Debug, Clone)]
pub struct PodDrain {
    pub id: PodId,
    pub meta: crate::inventory::PodMeta,
    /// A ready endpoint of some Service now (Kubernetes source).
    pub in_service: bool,
    /// Its termination grace period, when the source knows it.
    pub grace_period: Option<std::time::Duration>,
    pub slot: u32,
    /// Its addresses; once it is gone, the last ones it had (peers may still try them).
    pub addresses: Vec<IpAddr>,
    pub pids: Vec<u32>,
    /// Counters over the pod's life (while the agent watched it), frozen when the window closes;
    /// the kernel also counts the window's share (`win_*`).
    pub totals: SlotTotals,
    pub timeline: Timeline,
    /// The connections its processes still held (had not closed) when the last one exited:
    /// the exit cut them. Connections they had closed but whose closing handshake was still
    /// going on are not counted.
    pub open_at_exit: Option<u64>,
    /// Why the counts are incomplete, when they are.
    pub lost: Option<String>,
    /// The kernel's count of sockets it could not track (node-wide, socket table full) when
    /// the pod was first seen: any more since may be this pod's connections, missing from its
    /// open count, so a window that sees more cannot pass.
    pub untracked_at_start: u64,
    /// Connects to the pod by clients on this node that got no answer, inside the window.
    pub peer_failures: u64,
    pub events: VecDeque<PodEvent>,
    pub events_dropped: u64,
    /// Error events outside the window before the pod was ready (or with no readiness known),
    /// and after.
    startup_before_ready: u64,
    startup_after_ready: u64,
    /// Clients' connects that got no answer from it outside its window (the peer view).
    startup_no_answer: u64,
    /// The first and last error events outside the window.
    first_startup_error: Option<SystemTime>,
    last_startup_error: Option<SystemTime>,
    /// When the kernel began counting the window, when that was after the window's start (the
    /// agent learned of a deletion late): errors between the two are only in the events.
    window_counted_from: Option<SystemTime>,
    /// Errors inside the window from before the kernel counted it (from their events), by
    /// kind: resets sent, resets received, refusals, connects that got no answer, HTTP 5xx.
    late: [u64; 7],
}

impl PodDrain {
    #[must_use]
    pub fn new(id: PodId, slot: u32, now: SystemTime) -> Self {
        Self {
            id,
            meta: crate::inventory::PodMeta::default(),
            in_service: false,
            grace_period: None,
            slot,
            addresses: Vec::new(),
            pids: Vec::new(),
            totals: SlotTotals::default(),
            timeline: Timeline {
                first_seen: Some(now),
                ..Timeline::default()
            },
            open_at_exit: None,
            lost: None,
            untracked_at_start: 0,
            peer_failures: 0,
            events: VecDeque::new(),
            events_dropped: 0,
            startup_before_ready: 0,
            startup_after_ready: 0,
            startup_no_answer: 0,
            first_startup_error: None,
            last_startup_error: None,
            window_counted_from: None,
            late: [0; 7],
        }
    }

    /// Records when the pod was first seen ready.
    pub fn ready(&mut self, at: SystemTime) {
        if self.timeline.ready_at.is_none() {
            self.timeline.ready_at = Some(at);
        }
    }

    /// Its errors outside its termination window, kubelet probes left out: for a new pod of a
    /// rollout, how it started. From the kernel's counters (life less window), which stay exact
    /// when events are lost; the split at readiness and the first error's time come from the
    /// events (when events were lost, errors without one count as before readiness).
    #[must_use]
    pub fn startup(&self) -> Startup {
        let t = self.totals;
        let window = self.window();
        // The kernel's totals less its window's, less the window's errors it counted late.
        let resets_sent = t
            .resets_sent
            .saturating_sub(window.resets_sent + self.late[0]);
        let resets_received = t
            .resets_received
            .saturating_sub(window.resets_received + self.late[1]);
        let refused = t.refused.saturating_sub(window.refused + self.late[2]);
        let no_answer = self.startup_no_answer;
        let http_5xx = t.http_5xx.saturating_sub(window.http_5xx + self.late[4]);
        let requests_cut = t
            .requests_cut
            .saturating_sub(window.requests_cut + self.late[5]);
        let h2_resets = t.h2_resets.saturating_sub(window.h2_resets + self.late[6]);
        let errors = resets_sent
            + resets_received
            + refused
            + no_answer
            + http_5xx
            + requests_cut
            + h2_resets;
        let seen = self.startup_before_ready + self.startup_after_ready;
        Startup {
            resets_sent,
            resets_received,
            refused,
            no_answer,
            http_5xx,
            requests_cut,
            h2_resets,
            before_ready: (self.startup_before_ready + errors.saturating_sub(seen)).min(errors),
            first_error_at: self.first_startup_error,
            last_error_at: self.last_startup_error,
        }
    }

    /// Clients' connects to it that got no answer over its whole life (the peer view): in its
    /// window (those counted late included) and outside it.
    #[must_use]
    pub const fn no_answer(&self) -> u64 {
        self.peer_failures + self.late[3] + self.startup_no_answer
    }

    fn count_late(late: &mut [u64; 7], kind: EventKind) {
        let index = match kind {
            EventKind::ResetSent => 0,
            EventKind::ResetReceived => 1,
            EventKind::Refused => 2,
            EventKind::Http5xx => 4,
            EventKind::RequestCut => 5,
            EventKind::H2Reset => 6,
            _ => 3,
        };
        late[index] += 1;
    }

    /// Records that the termination window opened at `at` (the kernel counts its share from
    /// then on), if not recorded yet.
    pub fn open_window(&mut self, at: SystemTime) {
        if self.timeline.terminating_since.is_none() {
            self.timeline.terminating_since = Some(at);
        }
    }

    /// Records that the window opened at `at` though the kernel counts it only from `counted`
    /// (the agent learned of the deletion late: the watch's delay, a resync, a pod deleted and
    /// gone in between). The errors between the two are taken from their events, those seen so
    /// far and those still to come, so that none of the window's errors is missed.
    pub fn open_window_late(&mut self, at: SystemTime, counted: SystemTime) {
        if self.timeline.terminating_since.is_some() {
            return;
        }
        self.timeline.terminating_since = Some(at);
        if counted <= at {
            return;
        }
        self.window_counted_from = Some(counted);
        let ready_at = self.timeline.ready_at;
        for event in &mut self.events {
            if event.is_error() && !event.in_window && event.time >= at && event.time < counted {
                event.in_window = true;
                Self::count_late(&mut self.late, event.kind);
                // It was counted as a startup error when it came; it is the window's.
                if event.kind == EventKind::PeerConnectFailed {
                    self.startup_no_answer = self.startup_no_answer.saturating_sub(1);
                }
                if ready_at.is_some_and(|ready| event.time >= ready) {
                    self.startup_after_ready = self.startup_after_ready.saturating_sub(1);
                } else {
                    self.startup_before_ready = self.startup_before_ready.saturating_sub(1);
                }
            }
        }
        // The last error outside the window is now before it opened: from the events kept, or,
        // when they were dropped, just before the window (never later than it was).
        if self.last_startup_error.is_some_and(|last| last >= at) {
            let kept = self
                .events
                .iter()
                .filter(|e| e.is_error() && !e.in_window)
                .map(|e| e.time)
                .max();
            let remaining = self.startup_before_ready + self.startup_after_ready > 0;
            self.last_startup_error = kept.or(remaining.then_some(at));
        }
    }

    /// New counters from the kernel. Ignored once the window closed (final totals).
    pub fn update_totals(&mut self, totals: SlotTotals, now: SystemTime) {
        if self.window_closed() {
            return;
        }
        self.totals = totals;
        if self.timeline.terminating_since.is_some()
            && totals.open == 0
            && self.timeline.drained_at.is_none()
        {
            self.timeline.drained_at = Some(now);
        }
    }

    /// Marks the counts incomplete when the pod accepted connections (the tracepoints count
    /// them) but the packet program saw none of its SYN-ACKs: its packets bypass the TC filter
    /// (an agent outside the node's network namespace, a CNI that redirects them before
    /// `clsact`), so its HTTP answers, and before 6.10 its resets, go uncounted: its verdict is
    /// `unknown`, never a pass it cannot prove. A few accepted connections first: the per-CPU
    /// sums are read one CPU after the other, and a first SYN-ACK counted on a CPU already read
    /// could be missing beside its connection counted on a later one.
    pub fn charge_unseen_packets(&mut self) {
        const AT_LEAST: u64 = 4;
        let t = &self.totals;
        if self.lost.is_none() && t.accepted >= AT_LEAST && t.synacks_seen == 0 {
            self.lost = Some(format!(
                "the packet program saw none of the {} connections it accepted: its packets \
                 bypass the TC filter (an agent without hostNetwork, or a CNI that redirects \
                 them before clsact), so its HTTP answers (and before 6.10 its resets) are not \
                 counted",
                t.accepted
            ));
        }
    }

    /// The last process exited at `at`, noticed late (by a rescan, or from container statuses
    /// without hostPID): the connections still open now stand in for the count at the exit.
    /// Not `held`, which is 0 once no process is left: the exit released every socket, and
    /// those still open are ones it may have cut.
    pub fn exited(&mut self, at: SystemTime) {
        self.exited_with_open(at, self.totals.open);
    }

    /// The pod has processes again: an exit before its window opened was not its end (a
    /// short-lived process that entered its namespace, such as `ip netns exec`, or a container
    /// restart), so it is forgotten; the pod's real exit is recorded when it comes. Inside the
    /// window an exit stands.
    pub fn running_again(&mut self) {
        if self.timeline.terminating_since.is_none() && self.timeline.exited_at.is_some() {
            self.timeline.exited_at = None;
            self.open_at_exit = None;
        }
    }

    /// Charges the sockets the kernel could not track since the pod appeared (`untracked`,
    /// the node's count now) to a terminating pod: some may be its connections, missing from
    /// its open count, so its verdict is `unknown`, never a pass it cannot prove.
    pub fn charge_untracked(&mut self, untracked: u64) {
        if self.lost.is_none()
            && self.timeline.terminating_since.is_some()
            && !self.window_closed()
            && untracked > self.untracked_at_start
        {
            self.lost = Some(format!(
                "{} sockets on this node could not be tracked (socket table full) since the pod \
                 appeared: some may be its connections, missing from its open count",
                untracked - self.untracked_at_start
            ));
        }
    }

    /// The last process exited at `at` still holding `held` connections (as the kernel saw at
    /// the exit): connections its processes had not closed, which the exit cut.
    pub fn exited_with_open(&mut self, at: SystemTime, held: u64) {
        if self.timeline.exited_at.is_none() {
            self.timeline.exited_at = Some(at);
            self.open_at_exit = Some(held);
        }
    }

    /// Counters inside the window (all zero when no window opened).
    #[must_use]
    pub fn window(&self) -> SlotTotals {
        if self.timeline.terminating_since.is_none() {
            return SlotTotals::default();
        }
        let t = self.totals;
        SlotTotals {
            accepted: t.win_accepted,
            resets_sent: t.win_resets_sent,
            resets_received: t.win_resets_received,
            refused: t.win_refused,
            failed_connects: t.win_failed_connects,
            http_5xx: t.win_http_5xx,
            requests_cut: t.win_requests_cut,
            h2_resets: t.win_h2_resets,
            open: t.open,
            last_accept_ns: t.last_accept_ns,
            ..SlotTotals::default()
        }
    }

    /// Failures inside the window: resets the pod sent or received on its connections,
    /// connections it refused, connects to it that got no answer (the peer view), HTTP 5xx
    /// answers to clients and HTTP requests it cut. Its own failed connects to others are shown
    /// but are not its drain's failures.
    #[must_use]
    pub fn errors(&self) -> u64 {
        let w = self.window();
        w.resets_sent
            + w.resets_received
            + w.refused
            + w.http_5xx
            + w.requests_cut
            + w.h2_resets
            + self.peer_failures
            + self.late.iter().sum::<u64>()
    }

    /// Whether the window closed (its totals are final).
    #[must_use]
    pub fn window_closed(&self) -> bool {
        self.timeline.window_closed_at.is_some()
    }

    /// Whether a failure at `time` falls inside the termination window.
    #[must_use]
    pub fn in_window(&self, time: SystemTime) -> bool {
        self.timeline
            .terminating_since
            .is_some_and(|since| time >= since)
            && !self.window_closed()
    }

    #[must_use]
    pub fn phase(&self) -> Phase {
        if self.timeline.exited_at.is_some() {
            Phase::Exited
        } else if self.timeline.terminating_since.is_some() {
            Phase::Terminating
        } else {
            Phase::Running
        }
    }

    #[must_use]
    pub fn verdict(&self) -> Verdict {
        self.verdict_and_reason().0
    }

    /// The verdict and why, for people.
    #[must_use]
    pub fn verdict_and_reason(&self) -> (Verdict, String) {
        if self.timeline.terminating_since.is_none() {
            return (Verdict::None, "not terminating".into());
        }
        if let Some(lost) = &self.lost {
            return (Verdict::Unknown, format!("counts incomplete: {lost}"));
        }
        let errors = self.errors();
        if errors > 0 {
            let w = self.window();
            let mut reason = format!(
                "{errors} errors while terminating: {} resets sent, {} received, {} refused",
                w.resets_sent, w.resets_received, w.refused
            );
            if self.peer_failures > 0 {
                let _ = write!(
                    reason,
                    ", {} connects to it got no answer",
                    self.peer_failures
                );
            }
            if w.http_5xx > 0 {
                let _ = write!(reason, ", {} HTTP 5xx responses", w.http_5xx);
            }
            if w.h2_resets > 0 {
                let _ = write!(reason, ", {} HTTP/2 streams reset", w.h2_resets);
            }
            if w.requests_cut > 0 {
                let _ = write!(
                    reason,
                    ", {} HTTP requests cut (the pod closed their connections unanswered)",
                    w.requests_cut
                );
            }
            let late: u64 = self.late.iter().sum();
            if late > 0 {
                let _ = write!(reason, ", {late} before the agent learned of its deletion");
            }
            return (Verdict::Fail, reason);
        }
        if let Some(open) = self.open_at_exit.filter(|&open| open > 0) {
            return (
                Verdict::Fail,
                format!(
                    "{open} connections still open, not closed by the pod, when its last \
                     process exited"
                ),
            );
        }
        if self.totals.open > 0 {
            return (
                Verdict::Pending,
                format!("{} connections still open", self.totals.open),
            );
        }
        // Not before the exit: until then the pod may still accept connections and fail them.
        // Every pod gets an exit: its last process's, its containers' (without hostPID), or its
        // leaving the API server.
        if self.timeline.exited_at.is_none() {
            return (Verdict::Pending, "drained; waiting for it to exit".into());
        }
        (
            Verdict::Pass,
            "drained with zero errors before exiting".into(),
        )
    }

    /// Adds an event, dropping the oldest beyond [`EVENTS_PER_POD`].
    pub fn push_event(&mut self, event: PodEvent) {
        // (A peer's failure in the window is counted in `peer_failures` when it comes.)
        if event.is_error()
            && event.in_window
            && event.kind != EventKind::PeerConnectFailed
            && self
                .window_counted_from
                .is_some_and(|counted| event.time < counted)
        {
            Self::count_late(&mut self.late, event.kind);
        }
        if event.is_error() && !event.in_window {
            if event.kind == EventKind::PeerConnectFailed {
                self.startup_no_answer += 1;
            }
            if self
                .timeline
                .ready_at
                .is_some_and(|ready| event.time >= ready)
            {
                self.startup_after_ready += 1;
            } else {
                self.startup_before_ready += 1;
            }
            if self
                .first_startup_error
                .is_none_or(|first| event.time < first)
            {
                self.first_startup_error = Some(event.time);
            }
            if self.last_startup_error.is_none_or(|last| event.time > last) {
                self.last_startup_error = Some(event.time);
            }
        }
        if self.events.len() == EVENTS_PER_POD {
            self.events.pop_front();
            self.events_dropped += 1;
        }
        self.events.push_back(event);
    }
}

#[cfg(test)]
mod tests;
