//! What a check asks about: one rollout (namespace, workload, old and new pod-template-hash),
//! parsed and bounded the same for every face.

use std::{collections::BTreeSet, fmt::Write as _, time::Duration};

use draingate_proto::v1 as pb;

use crate::MAX_WAIT;

/// `wait` when it is within [`MAX_WAIT`]; both faces take their waits through this.
pub fn check_wait(wait: Duration) -> Result<Duration, QueryError> {
    if wait > MAX_WAIT {
        return Err(QueryError(format!(
            "wait {} is longer than the gate's limit of {}",
            humantime::format_duration(wait),
            humantime::format_duration(MAX_WAIT)
        )));
    }
    Ok(wait)
}

/// The workload kinds whose pods the agents report with an owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Deployment,
    /// Argo Rollouts' `Rollout`.
    Rollout,
}

impl Kind {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deployment => "Deployment",
            Self::Rollout => "Rollout",
        }
    }

    /// `Deployment`, `deployment`, `deploy`, `Rollout`, `rollout`, `ro` (kubectl's short names).
    pub fn parse(s: &str) -> Result<Self, QueryError> {
        match s.to_ascii_lowercase().as_str() {
            "deployment" | "deployments" | "deploy" => Ok(Self::Deployment),
            "rollout" | "rollouts" | "ro" => Ok(Self::Rollout),
            _ => Err(QueryError(format!(
                "unknown workload kind {}: use Deployment or Rollout",
                draingate_serve::telemetry::quoted(s)
            ))),
        }
    }
}

/// A malformed question; the message says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

/// What is asked: one workload's rollout, optionally narrowed to the old pods' hash.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Query {
    pub namespace: String,
    pub kind: Kind,
    pub name: String,
    /// Judge only pods with this pod-template-hash.
    pub old: Option<String>,
    /// Never judge pods with this pod-template-hash (the new version).
    pub new: Option<String>,
}

/// Kubernetes' limit for a name (DNS-1123 subdomain).
const MAX_NAME: usize = 253;

fn check_name(what: &str, value: &str, max: usize) -> Result<(), QueryError> {
    let valid = !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !value.starts_with(['-', '.'])
        && !value.ends_with(['-', '.']);
    if valid {
        Ok(())
    } else {
        Err(QueryError(format!(
            "invalid {what} {}: a Kubernetes name is 1 to {max} lower-case letters, digits, '-' \
             or '.', starting and ending with a letter or digit",
            draingate_serve::telemetry::quoted(value)
        )))
    }
}

impl Query {
    /// A query from its parts as people write them: `workload` is `deploy/NAME`,
    /// `rollout/NAME`, or `NAME` with `kind` (Deployment when absent).
    pub fn new(
        namespace: &str,
        workload: &str,
        kind: Option<&str>,
        old: Option<&str>,
        new: Option<&str>,
    ) -> Result<Self, QueryError> {
        let (kind, name) = match workload.split_once('/') {
            Some((k, name)) => {
                let parsed = Kind::parse(k)?;
                if let Some(kind) = kind
                    && Kind::parse(kind)? != parsed
                {
                    return Err(QueryError(format!(
                        "kind {} contradicts workload {}",
                        draingate_serve::telemetry::quoted(kind),
                        draingate_serve::telemetry::quoted(workload)
                    )));
                }
                (parsed, name)
            }
            None => (kind.map_or(Ok(Kind::Deployment), Kind::parse)?, workload),
        };
        check_name("namespace", namespace, 63)?;
        check_name("workload name", name, MAX_NAME)?;
        let hash = |what: &str, h: Option<&str>| -> Result<Option<String>, QueryError> {
            match h.filter(|h| !h.is_empty()) {
                None => Ok(None),
                Some(h) => {
                    check_name(what, h, 63)?;
                    Ok(Some(h.to_owned()))
                }
            }
        };
        let query = Self {
            namespace: namespace.to_owned(),
            kind,
            name: name.to_owned(),
            old: hash("old pod-template-hash", old)?,
            new: hash("new pod-template-hash", new)?,
        };
        if query.old.is_some() && query.old == query.new {
            return Err(QueryError(
                "old and new pod-template-hash are the same".into(),
            ));
        }
        Ok(query)
    }

    /// `namespace/Kind/name`, with the hashes when given.
    #[must_use]
    pub fn describe(&self) -> String {
        let mut s = format!("{}/{}/{}", self.namespace, self.kind.as_str(), self.name);
        if let Some(old) = &self.old {
            let _ = write!(s, " old {old}");
        }
        if let Some(new) = &self.new {
            let _ = write!(s, " new {new}");
        }
        s
    }

    pub(crate) fn owns(&self, pod: &pb::Pod) -> bool {
        pod.pod
            .as_ref()
            .is_some_and(|r| r.namespace == self.namespace)
            && pod.owner_kind == self.kind.as_str()
            && pod.owner_name == self.name
    }

    /// Whether `pod` is of the rollout's new version: its hash is `new`, or, without `new`, it
    /// has a hash and it is neither `old` nor one of the terminating pods' (`old_hashes`).
    pub(crate) fn is_new(&self, pod: &pb::Pod, old_hashes: &BTreeSet<&str>) -> bool {
        let hash = pod.pod_template_hash.as_str();
        if hash.is_empty() {
            return false;
        }
        match (&self.new, &self.old) {
            (Some(new), _) => hash == new,
            (None, Some(old)) => hash != old && !old_hashes.contains(hash),
            (None, None) => !old_hashes.contains(hash),
        }
    }

    pub(crate) fn judges(&self, pod: &pb::Pod) -> bool {
        self.old
            .as_ref()
            .is_none_or(|old| &pod.pod_template_hash == old)
            && self
                .new
                .as_ref()
                .is_none_or(|new| &pod.pod_template_hash != new)
    }
}
