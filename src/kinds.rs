//! Kinds: what each kind's handler and policy are, how an operator writes one (API, CLI, or
//! a file loaded at start), and the worker's live catalog of them.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::domain::Backoff;
use crate::handler::{Handler, Handlers, Simulate, SimulateConfig, Webhook, WebhookSettings};
use crate::intake::FieldError;
use crate::store::{KindRow, Store, StoreError};

/// A kind as an operator writes it (the body of `PUT /api/admin/kinds/{name}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindSpec {
    pub handler: String,
    #[serde(default)]
    pub webhook: Option<WebhookSpec>,
    #[serde(default)]
    pub max_attempts: Option<i32>,
    #[serde(default)]
    pub backoff_base_sec: Option<f64>,
    #[serde(default)]
    pub backoff_multiplier: Option<f64>,
    #[serde(default)]
    pub backoff_max_sec: Option<f64>,
    #[serde(default)]
    pub default_chunk_size: Option<i32>,
    #[serde(default)]
    pub concurrency_limit: Option<i32>,
    #[serde(default)]
    pub paused: Option<bool>,
}

/// Webhook settings as written (the secret is write-only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub signing_secret: Option<String>,
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub allowed_hosts: Option<Vec<String>>,
}

/// A kind as the API shows it (the signing secret only as "set").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindView {
    pub name: String,
    pub handler: String,
    pub webhook: Option<WebhookView>,
    pub max_attempts: i32,
    pub backoff_base_sec: f64,
    pub backoff_multiplier: f64,
    pub backoff_max_sec: f64,
    pub default_chunk_size: i32,
    pub concurrency_limit: Option<i32>,
    pub paused: bool,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookView {
    pub url: Option<String>,
    pub timeout_ms: u64,
    pub signing_secret_set: bool,
    pub headers: BTreeMap<String, String>,
    pub allowed_hosts: Vec<String>,
}

impl From<&KindRow> for KindView {
    fn from(k: &KindRow) -> Self {
        let webhook = k
            .webhook
            .as_ref()
            .and_then(|w| serde_json::from_value::<WebhookSettings>(w.clone()).ok())
            .map(|w| WebhookView {
                url: w.url,
                timeout_ms: w.timeout_ms,
                signing_secret_set: w.signing_secret.is_some(),
                headers: w.headers,
                allowed_hosts: w.allowed_hosts,
            });
        KindView {
            name: k.name.clone(),
            handler: k.handler.clone(),
            webhook,
            max_attempts: k.max_attempts,
            backoff_base_sec: k.backoff_base_sec,
            backoff_multiplier: k.backoff_multiplier,
            backoff_max_sec: k.backoff_max_sec,
            default_chunk_size: k.default_chunk_size,
            concurrency_limit: k.concurrency_limit,
            paused: k.paused,
            created_at: k.created_at,
            updated_at: k.updated_at,
        }
    }
}

/// Policy for kinds created without it (from `TALLY_MAX_RETRIES`, `TALLY_DEFAULT_CHUNK_SIZE`,
/// `TALLY_BACKOFF_*`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KindDefaults {
    pub max_attempts: i32,
    pub chunk_size: i32,
    pub backoff_base_sec: f64,
    pub backoff_multiplier: f64,
    pub backoff_max_sec: f64,
}

impl Default for KindDefaults {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            chunk_size: 400,
            backoff_base_sec: 5.0,
            backoff_multiplier: 2.0,
            backoff_max_sec: 3600.0,
        }
    }
}

fn err(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

/// Whether `name` is a valid kind name (the orders table's CHECK says the same).
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

impl KindSpec {
    /// Validates the spec field by field and builds the row to store.
    pub fn to_row(&self, name: &str, d: &KindDefaults) -> Result<KindRow, FieldError> {
        if !valid_name(name) {
            return Err(err(
                "name",
                "must be 1-63 characters: a lower-case letter, then lower-case letters, digits, '_' or '-'",
            ));
        }
        let webhook = match (self.handler.as_str(), &self.webhook) {
            ("simulate", None) => None,
            ("simulate", Some(_)) => {
                return Err(err("webhook", "must be absent for the simulate handler"));
            }
            ("webhook", None) => {
                return Err(err("webhook", "is required for the webhook handler"));
            }
            ("webhook", Some(w)) => Some(w.validate()?),
            _ => return Err(err("handler", "must be \"simulate\" or \"webhook\"")),
        };
        let max_attempts = self.max_attempts.unwrap_or(d.max_attempts);
        if !(1..=100).contains(&max_attempts) {
            return Err(err("max_attempts", "must be between 1 and 100"));
        }
        let base = self.backoff_base_sec.unwrap_or(d.backoff_base_sec);
        if !(0.001..=86_400.0).contains(&base) {
            return Err(err("backoff_base_sec", "must be between 0.001 and 86400"));
        }
        let mult = self.backoff_multiplier.unwrap_or(d.backoff_multiplier);
        if !(1.0..=10.0).contains(&mult) {
            return Err(err("backoff_multiplier", "must be between 1 and 10"));
        }
        let max = self.backoff_max_sec.unwrap_or(d.backoff_max_sec.max(base));
        if !(0.001..=604_800.0).contains(&max) {
            return Err(err("backoff_max_sec", "must be between 0.001 and 604800"));
        }
        if max < base {
            return Err(err(
                "backoff_max_sec",
                "must not be less than backoff_base_sec",
            ));
        }
        let chunk = self.default_chunk_size.unwrap_or(d.chunk_size);
        if !(1..=crate::domain::chunk::CHUNK_SIZE_MAX as i32).contains(&chunk) {
            return Err(err("default_chunk_size", "must be between 1 and 1000000"));
        }
        if let Some(c) = self.concurrency_limit
            && !(1..=10_000).contains(&c)
        {
            return Err(err(
                "concurrency_limit",
                "must be between 1 and 10000, or null",
            ));
        }
        Ok(KindRow {
            name: name.to_owned(),
            handler: self.handler.clone(),
            webhook: webhook.map(|w| serde_json::to_value(w).expect("settings serialise")),
            max_attempts,
            backoff_base_sec: base,
            backoff_multiplier: mult,
            backoff_max_sec: max,
            default_chunk_size: chunk,
            concurrency_limit: self.concurrency_limit,
            paused: self.paused.unwrap_or(false),
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        })
    }
}

impl WebhookSpec {
    fn validate(&self) -> Result<WebhookSettings, FieldError> {
        let allowed = self.allowed_hosts.clone().unwrap_or_default();
        for h in &allowed {
            if h.trim().is_empty() || h.len() > 255 || h.contains('/') {
                return Err(err(
                    "webhook.allowed_hosts",
                    "entries are host names, host:port or *.domain",
                ));
            }
        }
        match &self.url {
            Some(u) => {
                let url = crate::intake::parse_http_url("webhook.url", u)?;
                if !allowed.is_empty() && !crate::intake::host_allowed(&url, &allowed) {
                    return Err(err(
                        "webhook.url",
                        "its host is not in webhook.allowed_hosts",
                    ));
                }
            }
            None if allowed.is_empty() => {
                return Err(err(
                    "webhook.allowed_hosts",
                    "is required when webhook.url is absent (orders' targets are then the URLs)",
                ));
            }
            None => {}
        }
        let timeout_ms = self.timeout_ms.unwrap_or(10_000);
        if !(1..=300_000).contains(&timeout_ms) {
            return Err(err("webhook.timeout_ms", "must be between 1 and 300000"));
        }
        if let Some(s) = &self.signing_secret
            && !(16..=512).contains(&s.len())
        {
            return Err(err("webhook.signing_secret", "must be 16 to 512 bytes"));
        }
        let headers = self.headers.clone().unwrap_or_default();
        for (k, v) in &headers {
            let name_ok = !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            let reserved = matches!(
                k.to_ascii_lowercase().as_str(),
                "content-type"
                    | "content-length"
                    | "host"
                    | "idempotency-key"
                    | "traceparent"
                    | "x-tally-signature"
                    | "x-tally-timestamp"
            );
            if !name_ok || reserved {
                return Err(err(
                    "webhook.headers",
                    format!("{k:?} is not an allowed header name"),
                ));
            }
            if v.chars().any(char::is_control) {
                return Err(err(
                    "webhook.headers",
                    format!("the value of {k:?} has control characters"),
                ));
            }
        }
        Ok(WebhookSettings {
            url: self.url.clone(),
            timeout_ms,
            signing_secret: self.signing_secret.clone(),
            headers,
            allowed_hosts: allowed,
        })
    }
}

/// Kinds loaded at start from a file (`TALLY_KINDS_FILE`, e.g. a Helm ConfigMap): a JSON
/// object of name → spec.
pub fn parse_kinds_file(text: &str, d: &KindDefaults) -> Result<Vec<KindRow>, String> {
    let specs: BTreeMap<String, KindSpec> =
        serde_json::from_str(text).map_err(|e| format!("TALLY_KINDS_FILE is not valid: {e}"))?;
    specs
        .iter()
        .map(|(name, spec)| {
            spec.to_row(name, d)
                .map_err(|e| format!("TALLY_KINDS_FILE: kind {name:?}: {e}"))
        })
        .collect()
}

/// One kind as a worker runs it.
pub struct KindRuntime {
    pub handler: Arc<dyn Handler>,
    pub backoff: Backoff,
    /// Per-process limit on concurrent attempts of this kind.
    pub limit: Option<Arc<Semaphore>>,
    pub paused: bool,
    row: Option<KindRow>,
}

impl KindRuntime {
    /// Whether a claim may take tasks of this kind now.
    pub fn claimable(&self) -> bool {
        !self.paused
            && self
                .limit
                .as_ref()
                .is_none_or(|s| s.available_permits() > 0)
    }
}

/// What a worker knows of the kinds and the fault-injection switch; refreshed from the
/// database every few seconds. Handlers given in code (tests, embedders) take precedence
/// over stored kinds of the same name and use the worker's default backoff.
pub struct Catalog {
    fixed: Handlers,
    fixed_backoff: Backoff,
    simulate: SimulateConfig,
    client: reqwest::Client,
    /// Whether stored kinds are loaded at all (false: only the fixed handlers).
    dynamic: bool,
    current: RwLock<Arc<Snapshot>>,
}

/// One consistent view of the catalog.
#[derive(Default)]
pub struct Snapshot {
    pub kinds: BTreeMap<String, Arc<KindRuntime>>,
    /// Fraction of attempts failed on purpose (admin fault injection), 0 when off.
    pub fault_rate: f64,
}

impl Catalog {
    pub fn new(
        fixed: Handlers,
        fixed_backoff: Backoff,
        simulate: SimulateConfig,
        dynamic: bool,
    ) -> Self {
        let catalog = Self {
            fixed,
            fixed_backoff,
            simulate,
            client: crate::http::client(),
            dynamic,
            current: RwLock::new(Arc::new(Snapshot::default())),
        };
        let snap = catalog.build(&[], 0.0, &Snapshot::default());
        *catalog.current.write().expect("catalog lock") = Arc::new(snap);
        catalog
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().expect("catalog lock").clone()
    }

    /// Reloads stored kinds and the fault-injection switch.
    pub async fn refresh(&self, store: &Store) -> Result<(), StoreError> {
        let rows = if self.dynamic {
            store.list_kinds().await?
        } else {
            Vec::new()
        };
        let control = store.control().await?;
        let rate = if control.fault_injection_enabled {
            control.fault_injection_rate
        } else {
            0.0
        };
        let old = self.snapshot();
        let snap = self.build(&rows, rate, &old);
        *self.current.write().expect("catalog lock") = Arc::new(snap);
        Ok(())
    }

    fn build(&self, rows: &[KindRow], fault_rate: f64, old: &Snapshot) -> Snapshot {
        let mut kinds = BTreeMap::new();
        for row in rows {
            if self.fixed.get(&row.name).is_some() {
                continue;
            }
            // Unchanged kinds keep their runtime (and their semaphore's permits in use).
            if let Some(prev) = old.kinds.get(&row.name)
                && prev.row.as_ref() == Some(row)
            {
                kinds.insert(row.name.clone(), prev.clone());
                continue;
            }
            let handler: Arc<dyn Handler> = match row.handler.as_str() {
                // TALLY_SIMULATE_* (no failures unless configured, as the demo's chaos does).
                "simulate" => Arc::new(Simulate::new(self.simulate.clone())),
                "webhook" => match row
                    .webhook
                    .clone()
                    .map(serde_json::from_value::<WebhookSettings>)
                {
                    Some(Ok(settings)) => Arc::new(Webhook::new(self.client.clone(), settings)),
                    _ => {
                        tracing::error!(kind = %row.name, "stored webhook settings are unreadable; kind skipped");
                        continue;
                    }
                },
                other => {
                    tracing::error!(kind = %row.name, handler = other, "unknown handler; kind skipped");
                    continue;
                }
            };
            let backoff = Backoff::new(
                Duration::from_secs_f64(row.backoff_base_sec),
                row.backoff_multiplier,
                Duration::from_secs_f64(row.backoff_max_sec.max(row.backoff_base_sec)),
                self.fixed_backoff
                    .jitter()
                    .min(1.0 - 1.0 / row.backoff_multiplier.max(1.0)),
            )
            .unwrap_or(self.fixed_backoff);
            kinds.insert(
                row.name.clone(),
                Arc::new(KindRuntime {
                    handler,
                    backoff,
                    limit: row
                        .concurrency_limit
                        .map(|n| Arc::new(Semaphore::new(n.max(1) as usize))),
                    paused: row.paused,
                    row: Some(row.clone()),
                }),
            );
        }
        for name in self.fixed.kinds() {
            let handler = self.fixed.get(&name).expect("listed").clone();
            let runtime = match old.kinds.get(&name) {
                Some(prev) if prev.row.is_none() => prev.clone(),
                _ => Arc::new(KindRuntime {
                    handler,
                    backoff: self.fixed_backoff,
                    limit: None,
                    paused: false,
                    row: None,
                }),
            };
            kinds.insert(name, runtime);
        }
        Snapshot { kinds, fault_rate }
    }
}

impl Snapshot {
    /// Whether a task claimed with `kind_version` (its kind's `updated_at` at claim time)
    /// would run on a stale copy of its kind: the catalog must be reloaded first.
    pub fn is_stale(
        &self,
        kind: &str,
        kind_version: Option<chrono::DateTime<chrono::Utc>>,
    ) -> bool {
        match (self.kinds.get(kind), kind_version) {
            // Handlers given in code are never reloaded.
            (Some(k), _) if k.row.is_none() => false,
            (Some(k), Some(v)) => k.row.as_ref().is_some_and(|r| r.updated_at != v),
            (Some(_), None) => true,
            (None, Some(_)) => true,
            (None, None) => false,
        }
    }

    /// The kinds a claim may take now.
    pub fn claimable_kinds(&self) -> Vec<String> {
        self.kinds
            .iter()
            .filter(|(_, k)| k.claimable())
            .map(|(n, _)| n.clone())
            .collect()
    }
}
