//! The Kubernetes backend: a `coordination.k8s.io/v1` Lease, the object client-go's leader
//! election uses.
//!
//! - **Acquire:** create the Lease if it does not exist (a `409 AlreadyExists` means another
//!   candidate was first), or take it over when it is free (no holder: released) or expired.
//! - **Renew:** the holder rewrites `renewTime` every fifth of the TTL.
//! - **Release:** on shutdown the holder clears `holderIdentity`, so a standby takes over at
//!   its next tick instead of waiting out the TTL.
//! - **Optimistic concurrency:** every write is a PUT carrying the `resourceVersion` read
//!   just before; the API server answers `409 Conflict` if anyone wrote in between, and the
//!   candidate simply does not lead this tick.
//! - **Expiry without trusting clocks:** like client-go, a candidate never compares another
//!   pod's `renewTime` with its own wall clock. It notes, on its own monotonic clock, when it
//!   last saw the Lease change; the Lease is expired when it has not changed for
//!   `leaseDurationSeconds` since. The holder counts its own deadline from *before* its
//!   renewal request (see [`super::Leadership`]), so it steps down before anyone may take
//!   over.
//! - **Term:** `leaseTransitions + 1` (terms start at 1, as with the Postgres lease); every
//!   change of holder increments `leaseTransitions`.
//!
//! Leadership stays an optimisation: every sweeper write is conditional (DESIGN.md), so a
//! split brain during an API-server partition repeats no effect.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::Mutex;

use super::{Elector, Grant};
use crate::handler::BoxFuture;

/// Where the service account's namespace is mounted in a pod.
const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// A candidate for one Lease.
pub struct KubeElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    ttl: Duration,
    state: Mutex<Observed>,
}

/// What this candidate last saw and did.
#[derive(Default)]
struct Observed {
    /// The Lease's resourceVersion when last read, and when (local clock) it last changed.
    version: Option<(String, Instant)>,
    /// Our last successful write while holding: its term and the instant before it was sent.
    renewed: Option<Grant>,
}

impl KubeElector {
    /// Connects with the pod's service account (or `KUBECONFIG`, for running outside a
    /// cluster). `namespace` defaults to the pod's own.
    pub async fn connect(
        name: &str,
        namespace: Option<&str>,
        identity: String,
        ttl: Duration,
    ) -> anyhow::Result<Self> {
        crate::http::install_crypto();
        let mut config = kube::Config::infer().await.map_err(|e| {
            anyhow::anyhow!(
                "TALLY_LEADER_ELECTION=kubernetes: no Kubernetes API found (in-cluster service \
                 account or KUBECONFIG): {e}"
            )
        })?;
        // The next tick is the retry: a renewal must not outlive its usefulness.
        config.default_retry = false;
        let namespace = match namespace {
            Some(ns) => ns.to_owned(),
            None => std::fs::read_to_string(NAMESPACE_FILE)
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| config.default_namespace.clone()),
        };
        let client = kube::Client::try_from(config)
            .map_err(|e| anyhow::anyhow!("building the Kubernetes client: {e}"))?;
        Ok(Self::new(client, &namespace, name, identity, ttl))
    }

    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: String,
        ttl: Duration,
    ) -> Self {
        tracing::info!(
            lease = name,
            namespace,
            identity,
            "leader election: Kubernetes Lease"
        );
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity,
            ttl,
            state: Mutex::new(Observed::default()),
        }
    }

    /// Longest one acquire or renewal may take (GET and PUT): a hung API server must not
    /// hold up the sweeper's loop.
    fn call_timeout(&self) -> Duration {
        (self.ttl / 4).max(Duration::from_millis(200))
    }

    /// The holder writes at most this often; between writes it answers from its last one.
    fn renew_every(&self) -> Duration {
        self.ttl / 5
    }

    fn duration_secs(&self) -> i32 {
        self.ttl.as_secs_f64().ceil().clamp(1.0, i32::MAX as f64) as i32
    }

    async fn step(&self, st: &mut Observed) -> anyhow::Result<Option<Grant>> {
        if let Some(g) = st.renewed
            && g.sent.elapsed() < self.renew_every()
        {
            return Ok(Some(g));
        }
        let sent = Instant::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            st.version = None;
            return self.create(st, sent).await;
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        if st.version.as_ref().map(|v| &v.0) != Some(&version) {
            st.version = Some((version, sent));
        }
        let changed_at = st.version.as_ref().map_or(sent, |v| v.1);
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.identity.as_str());
        let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
        let expired = changed_at.elapsed() > duration;
        if !ours && holder.is_some() && !expired {
            st.renewed = None;
            return Ok(None);
        }
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        if !ours {
            if let Some(previous) = &holder {
                tracing::info!(previous, "taking over the expired leader Lease");
            }
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(self.duration_secs());
        let term = i64::from(spec.lease_transitions.unwrap_or(0)) + 1;
        let written = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await;
        settle(st, written, Grant { term, sent })
    }

    async fn create(&self, st: &mut Observed, sent: Instant) -> anyhow::Result<Option<Grant>> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(
                    [("app.kubernetes.io/name".to_owned(), "tally".to_owned())]
                        .into_iter()
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(self.duration_secs()),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        let written = self.api.create(&PostParams::default(), &lease).await;
        settle(st, written, Grant { term: 1, sent })
    }

    async fn give_up(&self) -> anyhow::Result<bool> {
        let limit = self.call_timeout();
        tokio::time::timeout(limit, self.clear_holder())
            .await
            .map_err(|_| anyhow::anyhow!("the Kubernetes API did not answer within {limit:?}"))?
    }

    async fn clear_holder(&self) -> anyhow::Result<bool> {
        let mut st = self.state.lock().await;
        st.renewed = None;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(false);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await?;
        Ok(true)
    }
}

/// The outcome of a write: leading with `grant`, or a conflict (someone wrote between our
/// read and our write, or created the Lease first: not ours this tick), or an error.
fn settle(
    st: &mut Observed,
    written: Result<Lease, kube::Error>,
    grant: Grant,
) -> anyhow::Result<Option<Grant>> {
    st.renewed = None;
    match written {
        Ok(lease) => {
            st.version = lease.metadata.resource_version.map(|v| (v, Instant::now()));
            st.renewed = Some(grant);
            Ok(Some(grant))
        }
        Err(e) if is_conflict(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `409`: `AlreadyExists` on create, `Conflict` (stale resourceVersion) on replace.
fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Elector for KubeElector {
    fn acquire_or_renew(&self) -> BoxFuture<'_, anyhow::Result<Option<Grant>>> {
        Box::pin(async move {
            let mut st = self.state.lock().await;
            let limit = self.call_timeout();
            match tokio::time::timeout(limit, self.step(&mut st)).await {
                Ok(r) => r,
                Err(_) => {
                    st.renewed = None;
                    anyhow::bail!("the Kubernetes API did not answer within {limit:?}")
                }
            }
        })
    }

    fn release(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            match self.give_up().await {
                Ok(true) => tracing::info!(lease = %self.name, "released the leader Lease"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "releasing the leader Lease failed; it will expire")
                }
            }
        })
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }
}
