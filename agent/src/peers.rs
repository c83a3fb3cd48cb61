//! Connects by this node's pods that got no answer from an address that is no pod here, kept
//! for the rollout gate's peer view (it matches them with pods on other nodes). Bounded per
//! address and in addresses, so that one client hammering a dead address (a crash-looping
//! app's database, say) cannot push out the evidence about any other address; what is dropped
//! is reported, so the gate never mistakes a gap for a clean record.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    time::SystemTime,
};

use crate::drain::PodEvent;

/// Most failures kept per address; older ones go first.
pub const PER_ADDRESS: usize = 16;
/// Most addresses kept; the one whose newest failure is oldest goes first.
pub const MAX_ADDRESSES: usize = 128;

#[derive(Debug, Default)]
struct Bucket {
    events: VecDeque<PodEvent>,
    /// The newest failure dropped for room: this address's record is whole only after it.
    complete_since: Option<SystemTime>,
}

/// The failures, by the address that did not answer.
#[derive(Debug, Default)]
pub struct PeerLog {
    by_address: HashMap<IpAddr, Bucket>,
    /// The newest failure lost with an address pushed out: the record of *any* address is
    /// whole only after it.
    pub complete_since: Option<SystemTime>,
}

/// The later of a maybe-unset time and `b`.
fn later(a: Option<SystemTime>, b: SystemTime) -> SystemTime {
    a.map_or(b, |a| a.max(b))
}

impl PeerLog {
    /// Records a connect that got no answer from `event.remote`.
    pub fn record(&mut self, event: PodEvent) {
        if !self.by_address.contains_key(&event.remote) && self.by_address.len() >= MAX_ADDRESSES {
            let oldest = self
                .by_address
                .iter()
                .min_by_key(|(_, b)| b.events.back().map(|e| e.time))
                .map(|(address, _)| *address);
            if let Some(bucket) = oldest.and_then(|a| self.by_address.remove(&a))
                && let Some(newest) = bucket.events.back()
            {
                self.complete_since = Some(later(self.complete_since, newest.time));
            }
        }
        let bucket = self.by_address.entry(event.remote).or_default();
        if bucket.events.len() >= PER_ADDRESS
            && let Some(dropped) = bucket.events.pop_front()
        {
            bucket.complete_since = Some(later(bucket.complete_since, dropped.time));
        }
        bucket.events.push_back(event);
    }

    /// Forgets failures before `before` (kept as long as finished pods are).
    pub fn expire(&mut self, before: SystemTime) {
        self.by_address.retain(|_, bucket| {
            while bucket.events.front().is_some_and(|e| e.time < before) {
                bucket.events.pop_front();
            }
            !bucket.events.is_empty()
        });
    }

    /// Every failure kept.
    pub fn events(&self) -> impl Iterator<Item = &PodEvent> {
        self.by_address.values().flat_map(|b| b.events.iter())
    }

    /// The addresses whose record has a gap, and from when it is whole.
    pub fn gaps(&self) -> impl Iterator<Item = (IpAddr, SystemTime)> {
        self.by_address
            .iter()
            .filter_map(|(address, b)| b.complete_since.map(|c| (*address, c)))
    }

    /// How many failures are kept.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_address.values().map(|b| b.events.len()).sum()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_address.is_empty()
    }
}
