//! Final verdicts kept after the agents forgot the pods.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, SystemTime},
};

use crate::{Judgement, Query};

/// Final verdicts kept after the agents forgot the pods: at most `capacity` entries, none older
/// than `max_age`. Keyed by workload and old pod-template-hash.
#[derive(Debug)]
pub struct History {
    entries: BTreeMap<Query, Judgement>,
    order: VecDeque<(SystemTime, Query)>,
    capacity: usize,
    max_age: Duration,
}

impl History {
    #[must_use]
    pub fn new(capacity: usize, max_age: Duration) -> Self {
        Self {
            entries: BTreeMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            max_age,
        }
    }

    /// Keeps a final verdict of `query` (which must name its old hash); others are ignored.
    pub fn record(&mut self, query: &Query, judgement: &Judgement) {
        if !judgement.is_final() || query.old.is_none() {
            return;
        }
        let key = Query {
            new: None,
            ..query.clone()
        };
        if self.entries.get(&key).is_some_and(|j| j == judgement) {
            return;
        }
        self.entries.insert(key.clone(), judgement.clone());
        self.order.retain(|(_, q)| q != &key);
        self.order.push_back((judgement.checked_at, key));
        while self.order.len() > self.capacity {
            if let Some((_, q)) = self.order.pop_front() {
                self.entries.remove(&q);
            }
        }
    }

    /// The newest kept verdict for `query`: of its old hash, or of any hash but its new one.
    pub fn lookup(&mut self, query: &Query, now: SystemTime) -> Option<Judgement> {
        while let Some((at, q)) = self.order.front() {
            if now.duration_since(*at).unwrap_or_default() <= self.max_age {
                break;
            }
            self.entries.remove(q);
            self.order.pop_front();
        }
        self.order
            .iter()
            .rev()
            .map(|(_, q)| q)
            .find(|q| {
                q.namespace == query.namespace
                    && q.kind == query.kind
                    && q.name == query.name
                    && query
                        .old
                        .as_ref()
                        .is_none_or(|old| q.old.as_ref() == Some(old))
                    && (query.new.is_none() || q.old != query.new)
            })
            .and_then(|q| self.entries.get(q))
            .map(|j| Judgement {
                from_history: true,
                ..j.clone()
            })
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
