//! Named policy slots: where a policy version comes from (built-in or file), how it is
//! (re)loaded safely, and how requests are split between A/B arms and shadow slots.
//!
//! Where a policy file becomes the serving version: [`super::loader::SlotLoader`] — the
//! one loader used by startup, the file watcher and the admin API.
//!
//! Loading or replacing a slot never disturbs serving: the new version is compiled,
//! instantiated, `init`-ed with the slot's config and smoke-tested with one `select` on
//! the current worker snapshot **before** it is published with one atomic pointer swap;
//! requests already routed keep the version they started with. When both versions
//! implement the state hooks, the new one starts from the old one's exported state (a
//! swapped cache_aware keeps its warm tree). Any failure leaves the running version in
//! place and is recorded as the slot's last reload result.

use super::PolicyVersion;
use crate::request::RequestInfo;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::SystemTime;
use vllm_router_sdk::Role;

/// Where a slot's component comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// An embedded built-in, by name.
    Builtin(String),
    /// A component file (watched for changes unless `--no-watch`).
    File(PathBuf),
}

impl std::fmt::Display for PolicySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicySource::Builtin(n) => write!(f, "builtin:{n}"),
            PolicySource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// What to load into a slot: the component and its JSON `init` config.
#[derive(Debug, Clone)]
pub struct SlotSpec {
    /// Component source.
    pub source: PolicySource,
    /// JSON object passed to `init`.
    pub config: String,
    /// Sandbox limits of this slot where they differ from the router's flags.
    pub limits: SlotLimits,
}

/// A slot's own sandbox limits (`None`: the router's `--policy-*` flag). An interpreted
/// policy (JavaScript, Python) may get a larger time budget without loosening the
/// built-ins'. Bounded: at most 1,000 ms per call, 4,096 MiB per memory, 1,000 core
/// instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SlotLimits {
    /// Per-call time limit, ms.
    pub timeout_ms: Option<u64>,
    /// Linear-memory limit per memory, MiB.
    pub max_memory_mb: Option<u64>,
    /// Core instances the component may create.
    pub max_instances: Option<u64>,
}

impl SlotLimits {
    /// `base` with these overrides applied; errors name the value out of bounds.
    pub fn apply(
        &self,
        base: &vllm_router_runtime::Limits,
    ) -> anyhow::Result<vllm_router_runtime::Limits> {
        let mut l = base.clone();
        if let Some(t) = self.timeout_ms {
            anyhow::ensure!(
                (1..=1000).contains(&t),
                "timeout_ms must be 1..=1000, got {t}"
            );
            l.call_ms = t;
        }
        if let Some(m) = self.max_memory_mb {
            anyhow::ensure!(
                (1..=4096).contains(&m),
                "max_memory_mb must be 1..=4096, got {m}"
            );
            l.max_memory = (m as usize) << 20;
        }
        if let Some(i) = self.max_instances {
            anyhow::ensure!(
                (1..=1000).contains(&i),
                "max_instances must be 1..=1000, got {i}"
            );
            l.max_instances = i as usize;
        }
        Ok(l)
    }
}

/// Outcome of the latest load attempt of a slot, shown by the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadStatus {
    /// Seconds since the Unix epoch.
    pub at_unix_s: u64,
    /// `loaded`, `unchanged` or `error`.
    pub result: &'static str,
    /// The version label on success, the reason on error.
    pub message: String,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A named policy slot: the version deciding now, where it came from, its A/B weight.
pub struct PolicySlot {
    /// Slot name (`default`, an A/B arm, `prefill`, `decode`, ...).
    pub name: String,
    /// Worker role this slot chooses among (its smoke test uses workers of this role).
    pub role: Role,
    /// A shadow slot decides on every request but is never acted on.
    pub shadow: bool,
    current: ArcSwap<PolicyVersion>,
    pub(crate) spec: Mutex<SlotSpec>,
    weight: AtomicU32,
    decisions: AtomicU64,
    shadow_agree: AtomicU64,
    pub(crate) last_reload: Mutex<ReloadStatus>,
    /// Serialises loads of this slot (file events and admin calls may race).
    pub(crate) load_lock: Mutex<()>,
}

impl PolicySlot {
    /// A slot serving `version`, loaded from `spec`.
    pub fn new(
        name: &str,
        role: Role,
        spec: SlotSpec,
        version: Arc<PolicyVersion>,
        weight: u32,
        shadow: bool,
    ) -> Self {
        let status = ReloadStatus {
            at_unix_s: unix_now(),
            result: "loaded",
            message: version.label.to_string(),
        };
        PolicySlot {
            name: name.to_string(),
            role,
            shadow,
            current: ArcSwap::new(version),
            spec: Mutex::new(spec),
            weight: AtomicU32::new(weight),
            decisions: AtomicU64::new(0),
            shadow_agree: AtomicU64::new(0),
            last_reload: Mutex::new(status),
            load_lock: Mutex::new(()),
        }
    }

    /// The version deciding now.
    pub fn current(&self) -> Arc<PolicyVersion> {
        self.current.load_full()
    }

    /// Publish a new version; requests already routed keep the old one until they end.
    pub fn publish(&self, version: Arc<PolicyVersion>) {
        self.current.store(version);
    }

    /// Where the slot's component comes from now.
    pub fn spec(&self) -> SlotSpec {
        self.spec.lock().clone()
    }

    /// The file this slot is loaded from, if any.
    pub fn file(&self) -> Option<PathBuf> {
        match &self.spec.lock().source {
            PolicySource::File(p) => Some(p.clone()),
            PolicySource::Builtin(_) => None,
        }
    }

    /// A/B weight (relative; 0 = takes no traffic).
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Set the A/B weight.
    pub fn set_weight(&self, w: u32) {
        self.weight.store(w, Ordering::Relaxed);
    }

    /// Decisions made by this slot (serving or shadow).
    pub fn decisions(&self) -> u64 {
        self.decisions.load(Ordering::Relaxed)
    }

    /// Count one decision.
    pub fn count_decision(&self) {
        self.decisions.fetch_add(1, Ordering::Relaxed);
    }

    /// Shadow decisions that agreed with the serving arm.
    pub fn shadow_agreements(&self) -> u64 {
        self.shadow_agree.load(Ordering::Relaxed)
    }

    /// Count a shadow decision that agreed with the serving arm.
    pub fn count_agreement(&self) {
        self.shadow_agree.fetch_add(1, Ordering::Relaxed);
    }

    /// The latest load attempt.
    pub fn last_reload(&self) -> ReloadStatus {
        self.last_reload.lock().clone()
    }
}

/// The slots deciding requests: A/B arms (weights) and shadows for regular requests,
/// plus fixed slots (PD's `prefill` and `decode`).
pub struct PolicySlots {
    list: ArcSwap<Vec<Arc<PolicySlot>>>,
    fixed: Vec<Arc<PolicySlot>>,
    /// Sticky arm assignment by session key (`--ab-sticky`).
    pub sticky: bool,
    edit: Mutex<()>,
}

use vllm_router_sdk::routing::{SESSION_KEY_FIELDS, SESSION_KEY_HEADERS, stable_hash64};

impl PolicySlots {
    /// Slots in order; at least one non-shadow slot.
    pub fn new(slots: Vec<Arc<PolicySlot>>, sticky: bool) -> Self {
        Self::with_fixed(slots, Vec::new(), sticky)
    }

    /// Like [`PolicySlots::new`], plus fixed slots that are not A/B arms (PD stages).
    pub fn with_fixed(
        slots: Vec<Arc<PolicySlot>>,
        fixed: Vec<Arc<PolicySlot>>,
        sticky: bool,
    ) -> Self {
        PolicySlots {
            fixed,
            list: ArcSwap::new(Arc::new(slots)),
            sticky,
            edit: Mutex::new(()),
        }
    }

    /// All slots.
    pub fn all(&self) -> Arc<Vec<Arc<PolicySlot>>> {
        self.list.load_full()
    }

    /// Every slot, A/B arms, shadows and fixed ones (for worker-set pushes).
    pub fn every_slot(&self) -> Vec<Arc<PolicySlot>> {
        let mut v: Vec<_> = self.list.load().iter().cloned().collect();
        v.extend(self.fixed.iter().cloned());
        v
    }

    /// A fixed slot by name (`prefill`, `decode`).
    pub fn fixed(&self, name: &str) -> Option<Arc<PolicySlot>> {
        self.fixed.iter().find(|s| s.name == name).cloned()
    }

    /// A slot by name.
    pub fn get(&self, name: &str) -> Option<Arc<PolicySlot>> {
        self.list.load().iter().find(|s| s.name == name).cloned()
    }

    /// Add a slot, or replace the one with the same name.
    pub fn upsert(&self, slot: Arc<PolicySlot>) {
        let _g = self.edit.lock();
        let mut v: Vec<_> = self.list.load().iter().cloned().collect();
        match v.iter().position(|s| s.name == slot.name) {
            Some(i) => v[i] = slot,
            None => v.push(slot),
        }
        self.list.store(Arc::new(v));
    }

    /// Remove a slot. Refused when it would leave no serving arm with weight > 0.
    pub fn remove(&self, name: &str) -> Result<Arc<PolicySlot>, String> {
        let _g = self.edit.lock();
        let v: Vec<_> = self.list.load().iter().cloned().collect();
        let Some(i) = v.iter().position(|s| s.name == name) else {
            return Err(format!("no slot named '{name}'"));
        };
        let rest: Vec<_> = v
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, s)| s.clone())
            .collect();
        if !rest.iter().any(|s| !s.shadow && s.weight() > 0) {
            return Err(format!(
                "removing '{name}' would leave no serving slot with weight > 0; promote another slot first"
            ));
        }
        self.list.store(Arc::new(rest));
        Ok(v[i].clone())
    }

    /// Set weights by slot name; all-or-nothing. Refused when no serving arm would keep
    /// weight > 0, or a name is unknown or a shadow.
    pub fn set_weights(&self, weights: &[(String, u32)]) -> Result<(), String> {
        let _g = self.edit.lock();
        let list = self.list.load();
        for (n, _) in weights {
            match list.iter().find(|s| &s.name == n) {
                None => return Err(format!("no slot named '{n}'")),
                Some(s) if s.shadow => {
                    return Err(format!("slot '{n}' is a shadow; it takes no traffic"));
                }
                Some(_) => {}
            }
        }
        let total: u64 = list
            .iter()
            .filter(|s| !s.shadow)
            .map(|s| {
                weights
                    .iter()
                    .find(|(n, _)| *n == s.name)
                    .map(|(_, w)| *w)
                    .unwrap_or_else(|| s.weight()) as u64
            })
            .sum();
        if total == 0 {
            return Err("weights would send traffic nowhere (all zero)".into());
        }
        for (n, w) in weights {
            if let Some(s) = list.iter().find(|s| &s.name == n) {
                s.set_weight(*w);
            }
        }
        Ok(())
    }

    /// Give `name` all the traffic (weight 100, other arms 0; they stay loaded for
    /// rollback). A shadow cannot be promoted.
    pub fn promote(&self, name: &str) -> Result<(), String> {
        let list = self.list.load();
        let mut w: Vec<(String, u32)> = Vec::new();
        for s in list.iter().filter(|s| !s.shadow) {
            w.push((s.name.clone(), if s.name == name { 100 } else { 0 }));
        }
        if !w.iter().any(|(n, _)| n == name) {
            return Err(format!("no serving slot named '{name}'"));
        }
        self.set_weights(&w)
    }

    /// The serving arm for a request: weighted random, or, with `--ab-sticky`, by the hash
    /// of the session key so the same key always gets the same arm (random when the
    /// request has no key).
    pub fn pick(&self, req: &RequestInfo) -> Arc<PolicySlot> {
        let list = self.list.load();
        let serving = || list.iter().filter(|s| !s.shadow && s.weight() > 0);
        let total: u64 = serving().map(|s| s.weight() as u64).sum();
        let first = || {
            list.iter()
                .find(|s| !s.shadow)
                .cloned()
                .unwrap_or_else(|| list[0].clone())
        };
        if total == 0 {
            return first();
        }
        if serving().nth(1).is_none() {
            return serving().next().cloned().unwrap_or_else(first);
        }
        let point = match self.sticky.then(|| session_key(req)).flatten() {
            Some(k) => stable_hash64(k.as_bytes()) % total,
            None => rand::random_range(0..total),
        };
        let mut acc = 0u64;
        for s in serving() {
            acc += s.weight() as u64;
            if point < acc {
                return s.clone();
            }
        }
        first()
    }

    /// Shadow slots.
    pub fn shadows(&self) -> Vec<Arc<PolicySlot>> {
        self.list
            .load()
            .iter()
            .filter(|s| s.shadow)
            .cloned()
            .collect()
    }

    /// Slots (fixed ones included) loaded from `path`.
    pub fn loaded_from(&self, path: &Path) -> Vec<Arc<PolicySlot>> {
        self.every_slot()
            .into_iter()
            .filter(|s| s.file().as_deref() == Some(path))
            .collect()
    }
}

/// The session key of a request for sticky assignment: first client header of
/// `SESSION_KEY_HEADERS` (a router-generated request id is not a client header), then
/// body fields (`SESSION_KEY_FIELDS`).
pub fn session_key(req: &RequestInfo) -> Option<String> {
    for h in SESSION_KEY_HEADERS {
        if let Some(v) = req.header(h).filter(|v| !v.is_empty()) {
            return Some(v.to_string());
        }
    }
    if req.body.is_empty() {
        return None;
    }
    SESSION_KEY_FIELDS
        .iter()
        .find_map(|f| req.body_field(f).filter(|v| !v.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::super::loader::SlotLoader;
    use super::*;
    use crate::breaker::BreakerShared;
    use crate::metrics::Metrics;
    use crate::policy::PolicyEngine;
    use crate::workers::Registry;

    fn loader() -> SlotLoader {
        let registry = Arc::new(Registry::with_breaker(Arc::new(BreakerShared::default())));
        registry
            .add("http://127.0.0.1:1", Role::Regular, 2)
            .unwrap();
        SlotLoader {
            engine: PolicyEngine::new(5, 64).unwrap(),
            registry,
            metrics: Arc::new(Metrics::new()),
        }
    }

    fn slot(l: &SlotLoader, name: &str, weight: u32, shadow: bool) -> Arc<PolicySlot> {
        let spec = SlotSpec {
            source: PolicySource::Builtin("round_robin".into()),
            config: "{}".into(),
            limits: Default::default(),
        };
        l.new_slot(name, Role::Regular, spec, weight, shadow, None)
            .unwrap()
    }

    fn request(session: Option<&str>) -> RequestInfo {
        let mut h = http::HeaderMap::new();
        if let Some(s) = session {
            h.insert("x-session-id", s.parse().unwrap());
        }
        RequestInfo::raw(
            http::Method::POST,
            "/v1/completions".into(),
            "/v1/completions".into(),
            h,
            bytes::Bytes::new(),
        )
    }

    #[test]
    fn ab_pick_follows_weights_promote_and_remove() {
        let l = loader();
        let slots = PolicySlots::new(
            vec![
                slot(&l, "a", 100, false),
                slot(&l, "b", 0, false),
                slot(&l, "s", 0, true),
            ],
            false,
        );
        let r = request(None);
        assert!(
            (0..50).all(|_| slots.pick(&r).name == "a"),
            "weight 0 got traffic"
        );
        assert_eq!(slots.shadows().len(), 1);
        slots
            .set_weights(&[("a".into(), 50), ("b".into(), 50)])
            .unwrap();
        let b = (0..2000).filter(|_| slots.pick(&r).name == "b").count();
        assert!((850..1150).contains(&b), "50/50 split gave b {b} of 2000");
        assert!(
            slots.set_weights(&[("s".into(), 5)]).is_err(),
            "a shadow takes no traffic"
        );
        assert!(
            slots
                .set_weights(&[("a".into(), 0), ("b".into(), 0)])
                .is_err()
        );
        slots.promote("b").unwrap();
        assert_eq!(
            (
                slots.get("a").unwrap().weight(),
                slots.get("b").unwrap().weight()
            ),
            (0, 100)
        );
        assert!(slots.promote("s").is_err());
        assert!(slots.remove("b").is_err(), "would leave no serving arm");
        slots.remove("a").unwrap();
        assert!(matches!(slots.remove("zz"), Err(m) if m.starts_with("no slot")));
        assert_eq!(slots.every_slot().len(), 2);
    }

    #[test]
    fn sticky_arms_keep_a_session_on_one_arm() {
        let l = loader();
        let slots = PolicySlots::new(
            vec![slot(&l, "a", 50, false), slot(&l, "b", 50, false)],
            true,
        );
        for key in ["alice", "bob", "carol", "dave"] {
            let r = request(Some(key));
            let first = slots.pick(&r).name.clone();
            assert!((0..20).all(|_| slots.pick(&r).name == first), "{key} moved");
        }
    }

    #[test]
    fn a_reload_of_identical_bytes_is_unchanged_and_a_new_spec_is_loaded_once() {
        let l = loader();
        let s = slot(&l, "a", 100, false);
        assert!(!l.reload(&s, None, None).unwrap(), "same bytes and config");
        let spec = SlotSpec {
            source: PolicySource::Builtin("random".into()),
            config: "{}".into(),
            limits: Default::default(),
        };
        assert!(l.reload(&s, Some(spec), None).unwrap());
        assert_eq!(s.current().name, "random");
        assert_eq!(s.current().inits(), 1, "init once per load");
        let bad = SlotSpec {
            source: PolicySource::Builtin("nope".into()),
            config: "{}".into(),
            limits: Default::default(),
        };
        assert!(l.reload(&s, Some(bad), None).is_err());
        assert_eq!(
            s.current().name,
            "random",
            "a failed load keeps the last good one"
        );
        assert_eq!(s.last_reload().result, "error");
    }
}
