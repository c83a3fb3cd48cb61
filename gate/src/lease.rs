//! Leader election through a `coordination.k8s.io/v1` Lease, so the gate Deployment can run two
//! replicas: both answer the rollout tools and the webhook, only the leader writes readiness
//! conditions and Events (two writers would race each other's conditions and Events).
//!
//! The rule is client-go's: a replica takes the Lease when nobody holds it or its holder has
//! not renewed it for `leaseDurationSeconds`, measured on this replica's own clock from when it
//! last saw the record change (so clocks of different nodes never need to agree); every write is
//! conditional on the Lease's `resourceVersion`, so of two replicas racing only one wins. The
//! leader renews every [`LeaseConfig::renew`] and stops leading ([`Leadership::lost`]) when it
//! could not renew for [`LeaseConfig::deadline`], which is shorter than the duration: it stops
//! before anyone else may start.

use std::time::{Duration, Instant, SystemTime};

use draingate_serve::telemetry::chain;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{Api, api::PostParams};

/// How a replica competes for the Lease.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica (its pod's name).
    pub identity: String,
    /// How long a holder that stopped renewing keeps the Lease.
    pub duration: Duration,
    /// How often the leader renews, and others try to take it.
    pub renew: Duration,
    /// The leader steps down when it could not renew for this long (less than `duration`).
    pub deadline: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    #[must_use]
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration: Duration::from_secs(15),
            renew: Duration::from_secs(2),
            deadline: Duration::from_secs(10),
        }
    }
}

/// This replica's name in the Lease: `$POD_NAME` (the downward API), else the host name and
/// process id.
#[must_use]
pub fn identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_or_else(|_| "gate".into(), |h| h.trim().to_owned());
        format!("{host}-{}", std::process::id())
    })
}

/// What this replica last saw of the Lease, and when (on its own clock).
#[derive(Debug)]
struct Observed {
    holder: Option<String>,
    resource_version: Option<String>,
    at: Instant,
}

/// One replica's view of the Lease.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<Observed>,
}

fn now_micro() -> MicroTime {
    MicroTime(
        k8s_openapi::jiff::Timestamp::try_from(SystemTime::now())
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

impl Elector {
    #[must_use]
    pub fn new(client: kube::Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        }
    }

    /// One attempt to take or renew the Lease: `Ok(true)` when this replica holds it now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let me = self.config.identity.clone();
        let duration = i32::try_from(self.config.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: kube::api::ObjectMeta {
                    name: Some(self.config.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(now_micro()),
                    renew_time: Some(now_micro()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(true)
                }
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(err) => Err(err),
            };
        };
        self.observe(&lease);
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let held_by_me = holder.as_deref() == Some(me.as_str());
        let their_duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.config.duration, Duration::from_secs);
        let expired = self
            .observed
            .as_ref()
            .is_some_and(|o| o.at.elapsed() >= their_duration);
        if !(held_by_me || holder.is_none() || expired) {
            return Ok(false);
        }
        if !held_by_me {
            spec.acquire_time = Some(now_micro());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
            spec.holder_identity = Some(me);
        }
        spec.renew_time = Some(now_micro());
        spec.lease_duration_seconds = Some(duration);
        // Conditional on the resourceVersion read: a replica that wrote in between wins.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.observe(&written);
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Notes the record as seen now, if it changed (holder or version) since last seen.
    fn observe(&mut self, lease: &Lease) {
        let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
        let resource_version = lease.metadata.resource_version.clone();
        if self
            .observed
            .as_ref()
            .is_some_and(|o| o.holder == holder && o.resource_version == resource_version)
        {
            return;
        }
        self.observed = Some(Observed {
            holder,
            resource_version,
            at: Instant::now(),
        });
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&mut self) {
        let mut logged_holder = None;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(
                        lease = %format!("{}/{}", self.config.namespace, self.config.name),
                        identity = %self.config.identity,
                        "leading: this replica holds the readiness gate"
                    );
                    return;
                }
                Ok(false) => {
                    let holder = self.observed.as_ref().and_then(|o| o.holder.clone());
                    if holder != logged_holder {
                        tracing::info!(
                            holder = holder.as_deref().unwrap_or("nobody"),
                            "another replica leads; standing by"
                        );
                        logged_holder = holder;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %chain(&err), "cannot read or take the Lease");
                }
            }
            tokio::time::sleep(self.config.renew).await;
        }
    }

    /// Renews the Lease until it cannot for [`LeaseConfig::deadline`] or another replica took
    /// it; returns then (this replica no longer leads). Each attempt is bounded by what is left
    /// of the deadline, counted from the start of the last attempt that succeeded: a request
    /// that hangs cannot keep a replica leading past it.
    pub async fn hold(&mut self) {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.config.renew).await;
            let started = Instant::now();
            let left = self.config.deadline.saturating_sub(renewed.elapsed());
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => renewed = started,
                Ok(Ok(false)) => {
                    tracing::warn!("another replica took the Lease: no longer leading");
                    return;
                }
                Ok(Err(err)) => {
                    tracing::warn!(error = %chain(&err), "cannot renew the Lease");
                }
                Err(_) => tracing::warn!("renewing the Lease timed out"),
            }
            if renewed.elapsed() >= self.config.deadline {
                tracing::warn!("the Lease was not renewed in time: no longer leading");
                return;
            }
        }
    }

    /// Gives the Lease up (at shutdown), so another replica takes over at once rather than
    /// after the lease duration.
    pub async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now_micro());
        if let Err(err) = self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(error = %chain(&err), "cannot give the Lease up");
        }
    }
}

/// Runs `work` while this replica leads, again each time it leads anew, until `shutdown`
/// (then the Lease is given up, so another replica takes over at once). `work` is not meant to
/// end: when it does (an error, or a panic), the Lease is given up and the reason returned, so
/// the caller can stop rather than stand by forever.
pub async fn lead<W, F, E>(
    mut elector: Elector,
    mut work: W,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String>
where
    W: FnMut() -> F,
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = elector.acquire() => {}
            () = &mut shutdown => return Ok(()),
        }
        let mut task = tokio::spawn(work());
        tokio::select! {
            () = elector.hold() => {
                // Stop writing before anyone may take over.
                task.abort();
                let _ = task.await;
            }
            ended = &mut task => {
                elector.release().await;
                return Err(match ended {
                    Ok(Ok(())) => "the readiness gate's controller stopped".to_owned(),
                    Ok(Err(err)) => err.to_string(),
                    Err(err) => format!("the readiness gate's controller failed: {err}"),
                });
            }
            () = &mut shutdown => {
                task.abort();
                let _ = task.await;
                elector.release().await;
                return Ok(());
            }
        }
    }
}
