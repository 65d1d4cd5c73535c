//! Leader election with a `coordination.k8s.io/v1` Lease, as client-go does it: the holder
//! renews `renewTime` every `retry_period`; others take the lease over once
//! `renewTime + leaseDurationSeconds` has passed. Every write carries the resourceVersion it
//! read, so two candidates can never both succeed.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This candidate's identity (pod name, or host name and PID).
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long steps down.
    pub renew_deadline: Duration,
    /// Interval between attempts (renewals and acquisitions).
    pub retry_period: Duration,
}

impl LeaseConfig {
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What one attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// We hold the lease (acquired or renewed).
    Leading,
    /// Someone else holds a valid lease.
    Following { holder: Option<String> },
}

pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX).max(1)
}

impl LeaderElector {
    pub fn new(client: kube::Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
        let Some(renew) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
            return true;
        };
        let dur = i64::from(spec.lease_duration_seconds.unwrap_or(0));
        renew
            .0
            .checked_add(SignedDuration::from_secs(dur))
            .map_or(true, |end| end <= now)
    }

    /// One acquire-or-renew step.
    pub async fn try_acquire_or_renew(&self) -> kube::Result<Attempt> {
        let now = Timestamp::now();
        let me = &self.config.identity;
        let existing = match self.api.get_opt(&self.config.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(me.clone()),
                        lease_duration_seconds: Some(seconds(self.config.lease_duration)),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(Attempt::Leading),
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        Ok(Attempt::Following { holder: None })
                    }
                    Err(e) => Err(e),
                };
            }
            Some(l) => l,
        };
        let spec = existing.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(me.as_str());
        if !mine && holder.is_some() && !Self::expired(&spec, now) {
            return Ok(Attempt::Following { holder });
        }
        let mut next = existing.clone();
        let mut s = spec.clone();
        if !mine {
            s.holder_identity = Some(me.clone());
            s.acquire_time = Some(MicroTime(now));
            s.lease_transitions = Some(s.lease_transitions.unwrap_or(0) + 1);
        }
        s.renew_time = Some(MicroTime(now));
        s.lease_duration_seconds = Some(seconds(self.config.lease_duration));
        next.spec = Some(s);
        // `existing` carries its resourceVersion: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(Attempt::Leading),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Following { holder }),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (on shutdown) so a standby can take over at once.
    pub async fn release(&self) -> kube::Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Campaigns until `stop` flips to true. `leading` is set to true when the lease is held and
    /// back to false when it is lost (renewals failing for longer than `renew_deadline`).
    pub async fn run(self, leading: watch::Sender<bool>, mut stop: watch::Receiver<bool>) {
        let mut last_renew: Option<tokio::time::Instant> = None;
        loop {
            let result = self.try_acquire_or_renew().await;
            let now = tokio::time::Instant::now();
            match result {
                Ok(Attempt::Leading) => {
                    if !*leading.borrow() {
                        tracing::info!(identity = %self.config.identity, "acquired the leader lease");
                    }
                    last_renew = Some(now);
                    leading.send_replace(true);
                }
                Ok(Attempt::Following { holder }) => {
                    if *leading.borrow() {
                        tracing::warn!(?holder, "lost the leader lease");
                    }
                    last_renew = None;
                    leading.send_replace(false);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader lease request failed");
                    if let Some(t) = last_renew
                        && now.duration_since(t) > self.config.renew_deadline
                    {
                        tracing::warn!("could not renew the leader lease in time; stepping down");
                        last_renew = None;
                        leading.send_replace(false);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.retry_period) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        if *leading.borrow() {
            if let Err(e) = self.release().await {
                tracing::warn!(error = %e, "could not release the leader lease");
            }
            leading.send_replace(false);
        }
    }
}
