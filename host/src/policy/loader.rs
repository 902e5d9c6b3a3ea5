//! Where a policy file becomes the serving version: [`SlotLoader`] reads a component
//! (once: the bytes hashed are the bytes compiled), compiles and instantiates it, runs
//! `init` once, pushes the current worker set, smoke-tests one `select`, hands over the
//! previous version's state, and publishes it into the slot. Startup, the file watcher and
//! the admin API all load through it.

use super::builtin;
use super::slots::{PolicySlot, PolicySource, ReloadStatus, SlotSpec, unix_now};
use super::sync::worker_infos;
use super::{NoChoice, PolicyEngine, PolicyVersion, Stage};
use crate::metrics::Metrics;
use crate::request::RequestInfo;
use crate::workers::Registry;
use std::sync::Arc;
use vllm_router_sdk::{Candidate, Role};

/// A component read from its source, hashed once.
struct Loaded {
    /// Policy name (built-in name or file stem).
    name: String,
    /// Component bytes (borrowed for built-ins).
    bytes: std::borrow::Cow<'static, [u8]>,
    /// SHA-256 of `bytes`, hex.
    sha256: String,
}

/// Read a spec's component bytes (once: the bytes hashed are the bytes compiled).
fn read_source(source: &PolicySource) -> anyhow::Result<Loaded> {
    let (name, bytes) = match source {
        PolicySource::Builtin(n) => {
            let b = builtin::find(n).ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown built-in policy '{n}'; built-ins: {}",
                    builtin::names()
                )
            })?;
            (b.name.to_string(), std::borrow::Cow::Borrowed(b.wasm))
        }
        PolicySource::File(p) => {
            let bytes = std::fs::read(p)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "custom".into());
            (name, std::borrow::Cow::Owned(bytes))
        }
    };
    let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    Ok(Loaded {
        name,
        bytes,
        sha256,
    })
}

/// The synthetic request of the load-time smoke test (request id `smoke-test`).
fn smoke_request() -> Arc<RequestInfo> {
    let body = bytes::Bytes::from_static(
        br#"{"model":"smoke-test","messages":[{"role":"user","content":"router smoke test"}]}"#,
    );
    let mut info = RequestInfo::from_json(
        http::Method::POST,
        "/v1/chat/completions".into(),
        "/v1/chat/completions".into(),
        http::HeaderMap::new(),
        body,
    )
    .expect("static JSON");
    info.request_id = "smoke-test".into();
    Arc::new(info)
}

/// Builds, validates and publishes policy versions; shared by startup, the file
/// watcher and the admin API, so a slot is loaded the same way from all three.
pub struct SlotLoader {
    /// The wasmtime engine.
    pub engine: Arc<PolicyEngine>,
    /// Workers (a new version is told the current set and smoke-tested on it).
    pub registry: Arc<Registry>,
    /// Metrics (reload results, policy info, slot weights).
    pub metrics: Arc<Metrics>,
}

impl SlotLoader {
    /// Build and validate a version from `spec`: read, check the optional sha256 pin,
    /// compile, instantiate, `init` (once), `workers-changed` with the current set, then
    /// one smoke-test `select` (request id `smoke-test`) over the workers of `role`
    /// (skipped when there are none). The same instance then serves. The error says
    /// which step failed.
    pub fn build(
        &self,
        spec: &SlotSpec,
        pin_sha256: Option<&str>,
        role: Role,
    ) -> anyhow::Result<Arc<PolicyVersion>> {
        self.build_from(spec, &read_source(&spec.source)?, pin_sha256, role)
    }

    fn build_from(
        &self,
        spec: &SlotSpec,
        src: &Loaded,
        pin_sha256: Option<&str>,
        role: Role,
    ) -> anyhow::Result<Arc<PolicyVersion>> {
        if src.bytes.is_empty() {
            anyhow::bail!("{} is empty", spec.source);
        }
        if let Some(pin) = pin_sha256 {
            if !src.sha256.eq_ignore_ascii_case(pin) {
                anyhow::bail!("sha256 mismatch: file has {}, pinned {pin}", src.sha256);
            }
        }
        let set = self.registry.snapshot();
        let limits = spec.limits.apply(&self.engine.limits)?;
        let version = self.engine.load_limited(
            &src.name,
            &spec.source.to_string(),
            &src.bytes,
            &src.sha256,
            &spec.config,
            set.generation,
            &worker_infos(&set),
            limits,
        )?;
        let cands: Vec<Candidate> = set
            .workers
            .iter()
            .filter(|w| w.role == role)
            .map(|w| Candidate {
                id: w.id,
                in_flight: w.in_flight(),
                engine: None,
            })
            .collect();
        if !cands.is_empty() {
            let stage = match role {
                Role::Regular => Stage::Regular,
                Role::Prefill => Stage::Prefill,
                Role::Decode => Stage::Decode,
            };
            match version.select(smoke_request(), stage, set.generation, &cands) {
                Ok(_) | Err(NoChoice::Declined(_)) => {}
                Err(NoChoice::Syncing) => {
                    // The set changed while loading; the sync pushes the new one.
                }
                Err(NoChoice::Fault(f)) => {
                    anyhow::bail!("smoke-test select failed: {f}")
                }
            }
        }
        Ok(version)
    }

    /// Build a new slot serving `spec` (startup and the admin API).
    pub fn new_slot(
        &self,
        name: &str,
        role: Role,
        spec: SlotSpec,
        weight: u32,
        shadow: bool,
        pin_sha256: Option<&str>,
    ) -> anyhow::Result<Arc<PolicySlot>> {
        let v = self
            .build(&spec, pin_sha256, role)
            .map_err(|e| anyhow::anyhow!("policy slot '{name}' ({}): {e:#}", spec.source))?;
        tracing::info!(slot = %name, policy = %v.label, source = %v.source, weight, shadow, "policy loaded");
        self.metrics.set_policy_info(name, None, &v);
        if !shadow {
            self.metrics
                .slot_weight
                .with_label_values(&[name])
                .set(weight as i64);
        }
        Ok(Arc::new(PolicySlot::new(
            name, role, spec, v, weight, shadow,
        )))
    }

    /// Load `spec` (or the slot's current spec when `None`) into `slot` and publish it
    /// if it validates. Skips (`Ok(false)`) when the bytes are identical to the serving
    /// version's and the config did not change. On failure nothing changes except the
    /// recorded status.
    pub fn reload(
        &self,
        slot: &PolicySlot,
        spec: Option<SlotSpec>,
        pin_sha256: Option<&str>,
    ) -> anyhow::Result<bool> {
        let _serial = slot.load_lock.lock();
        let t0 = std::time::Instant::now();
        let spec = spec.unwrap_or_else(|| slot.spec());
        let old = slot.current();
        let outcome = (|| -> anyhow::Result<Option<Arc<PolicyVersion>>> {
            let src = read_source(&spec.source)?;
            if src.sha256 == old.sha256 && spec.config == old.config && pin_sha256.is_none() {
                return Ok(None);
            }
            let new = self.build_from(&spec, &src, pin_sha256, slot.role)?;
            // State hand-off: both sides must implement it; a refusal means "start cold".
            let state = old.export_state();
            if !state.is_empty() {
                match new.import_state(&state) {
                    Ok(true) => {
                        tracing::info!(slot = %slot.name, from = %old.label, to = %new.label, bytes = state.len(), "policy state handed over")
                    }
                    Ok(false) => {
                        tracing::info!(slot = %slot.name, to = %new.label, "new version declined the previous state; starting cold")
                    }
                    Err(f) => anyhow::bail!("state import failed: {f}"),
                }
            }
            Ok(Some(new))
        })();
        let status = match &outcome {
            Ok(Some(v)) => ReloadStatus {
                at_unix_s: unix_now(),
                result: "loaded",
                message: v.label.to_string(),
            },
            Ok(None) => ReloadStatus {
                at_unix_s: unix_now(),
                result: "unchanged",
                message: old.label.to_string(),
            },
            Err(e) => ReloadStatus {
                at_unix_s: unix_now(),
                result: "error",
                message: format!("{e:#}"),
            },
        };
        self.metrics
            .policy_reloads
            .with_label_values(&[slot.name.as_str(), status.result])
            .inc();
        *slot.last_reload.lock() = status;
        match outcome {
            Ok(Some(v)) => {
                tracing::info!(slot = %slot.name, from = %old.label, to = %v.label, source = %spec.source, "policy swapped (validated and published in {:?})", t0.elapsed());
                self.metrics.set_policy_info(&slot.name, Some(&old), &v);
                *slot.spec.lock() = spec;
                slot.publish(v);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(e) => {
                tracing::warn!(slot = %slot.name, serving = %old.label, source = %spec.source, "policy load refused, last good version keeps serving: {e:#}");
                Err(e)
            }
        }
    }
}
