//! The admin API: policy slots (list, load/replace, reload, weights, promote, remove) and
//! worker membership (`/add_worker`, `/remove_worker`, as in vllm-project/router).
//!
//! Off unless `--admin-api-key` (or `VLLM_ROUTER_ADMIN_API_KEY`) is set; then every call
//! needs `Authorization: Bearer KEY`, compared in constant time. Without a key the routes
//! answer 404 (the API does not exist); with a wrong or missing token, 401. Every
//! answer is JSON; a failed load changes nothing and says why.

use crate::error::ApiError;
use crate::health::HealthConfig;
use crate::policy::loader::SlotLoader;
use crate::policy::{PolicySlot, PolicySlots, PolicySource, SlotSpec};
use crate::watch::PolicyWatcher;
use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use subtle::ConstantTimeEq;
use vllm_router_sdk::Role;

/// What the admin handlers work on.
pub struct Admin {
    /// Bearer token; `None` = admin API off.
    pub key: Option<String>,
    /// Regular-request slots.
    pub slots: Arc<PolicySlots>,
    /// The one slot loader (also used by startup and the file watcher).
    pub loader: Arc<SlotLoader>,
    /// File watcher (absent with `--no-watch`).
    pub watcher: Option<Arc<PolicyWatcher>>,
    /// A built-in's `init` config from its flags, with a JSON object on top:
    /// `(builtin name, base config) -> config` (see `config::Args::builtin_config_with`).
    pub builtin_config: Box<dyn Fn(&str, &str) -> String + Send + Sync>,
    /// Health probe settings (a worker added by `/add_worker` must answer first).
    pub health: HealthConfig,
}

type St = State<Arc<Admin>>;

/// The admin routes, to be merged into the client-facing router.
pub fn routes(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/admin/policies", get(list))
        .route("/admin/policies/{name}", put(load).delete(remove).get(show))
        .route("/admin/policies/{name}/reload", post(reload))
        .route("/admin/policies/{name}/promote", post(promote))
        .route("/admin/weights", put(weights))
        .route("/add_worker", post(add_worker))
        .route("/remove_worker", post(remove_worker))
        .layer(middleware::from_fn_with_state(admin.clone(), auth))
        .with_state(admin)
}

async fn auth(State(a): St, req: Request, next: Next) -> Response {
    let Some(key) = &a.key else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "admin_disabled",
            "the admin API is off; start the router with --admin-api-key to enable it",
        )
        .into_response();
    };
    let given = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_admin_token",
            "admin calls need `Authorization: Bearer <--admin-api-key>`",
        )
        .into_response();
    }
    next.run(req).await
}

fn slot_json(s: &PolicySlot) -> Value {
    let v = s.current();
    let loaded_at = v
        .loaded_at
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json!({
        "name": s.name,
        "policy": v.name,
        "version": &v.sha256[..12],
        "sha256": v.sha256,
        "source": v.source,
        "config": serde_json::from_str::<Value>(&v.config).unwrap_or(Value::Null),
        "loaded_at_unix_s": loaded_at,
        "weight": s.weight(),
        "shadow": s.shadow,
        "decisions": s.decisions(),
        "shadow_agreements": if s.shadow { json!(s.shadow_agreements()) } else { Value::Null },
        "faults": v.faults(),
        "inits": v.inits(),
        "last_reload": s.last_reload(),
    })
}

fn bad(code: &'static str, msg: impl Into<String>) -> Response {
    ApiError::bad_request(code, msg).into_response()
}

/// 422 for a policy that did not load (the running version is unchanged).
fn load_failed(msg: String) -> Response {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request_error",
        "policy_load_failed",
        msg,
    )
    .into_response()
}

fn not_found(name: &str) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no_such_slot",
        format!("no policy slot named '{name}'"),
    )
    .into_response()
}

async fn list(State(a): St) -> Response {
    let slots: Vec<Value> = a.slots.all().iter().map(|s| slot_json(s)).collect();
    axum::Json(json!({"slots": slots, "sticky": a.slots.sticky})).into_response()
}

async fn show(State(a): St, Path(name): Path<String>) -> Response {
    match a.slots.get(&name) {
        Some(s) => axum::Json(slot_json(&s)).into_response(),
        None => not_found(&name),
    }
}

/// Body of `PUT /admin/policies/{name}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadBody {
    builtin: Option<String>,
    path: Option<std::path::PathBuf>,
    config: Option<Value>,
    sha256: Option<String>,
    weight: Option<u32>,
    shadow: Option<bool>,
    /// Sandbox limits of this slot (else the router's `--policy-*` flags).
    timeout_ms: Option<u64>,
    max_memory_mb: Option<u64>,
    max_instances: Option<u64>,
}

async fn load(State(a): St, Path(name): Path<String>, body: axum::body::Bytes) -> Response {
    let b: LoadBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return bad(
                "invalid_json",
                format!(
                    "expected {{\"builtin\"|\"path\", \"config\"?, \"sha256\"?, \"weight\"?, \"shadow\"?}}: {e}"
                ),
            );
        }
    };
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return bad(
            "invalid_slot_name",
            "slot names are 1-64 characters of [A-Za-z0-9_-]",
        );
    }
    let existing = a.slots.get(&name);
    let source = match (b.builtin, b.path) {
        (Some(n), None) => PolicySource::Builtin(n),
        (None, Some(p)) => PolicySource::File(crate::watch::canonical_file(&p)),
        (None, None) => match &existing {
            Some(s) => s.spec().source,
            None => return bad("missing_source", "give `builtin` or `path`"),
        },
        (Some(_), Some(_)) => return bad("ambiguous_source", "give `builtin` or `path`, not both"),
    };
    let config = match b.config {
        None => existing
            .as_ref()
            .filter(|s| s.spec().source == source)
            .map(|s| s.spec().config)
            .unwrap_or_else(|| "{}".to_string()),
        Some(Value::Object(m)) => Value::Object(m).to_string(),
        Some(_) => return bad("invalid_config", "`config` must be a JSON object"),
    };
    let config = match &source {
        PolicySource::Builtin(n) => (a.builtin_config)(n, &config),
        PolicySource::File(_) => config,
    };
    let spec = SlotSpec {
        source: source.clone(),
        config,
        limits: crate::policy::SlotLimits {
            timeout_ms: b.timeout_ms,
            max_memory_mb: b.max_memory_mb,
            max_instances: b.max_instances,
        },
    };
    let a2 = a.clone();
    let pin = b.sha256.clone();
    // Compiling takes tens of milliseconds: keep it off the async workers.
    let result = tokio::task::spawn_blocking(move || -> Result<Arc<PolicySlot>, String> {
        match existing {
            Some(slot) => {
                if b.shadow.is_some_and(|sh| sh != slot.shadow) {
                    return Err("a slot cannot change between serving and shadow; remove it and load it again".into());
                }
                a2.loader.reload(&slot, Some(spec), pin.as_deref())
                    .map_err(|e| format!("{e:#}"))?;
                if let Some(w) = b.weight {
                    a2.slots.set_weights(&[(slot.name.clone(), w)])?;
                }
                Ok(slot)
            }
            None => {
                let shadow = b.shadow.unwrap_or(false);
                let weight = if shadow { 0 } else { b.weight.unwrap_or(0) };
                let slot = a2
                    .loader
                    .new_slot(&name, Role::Regular, spec, weight, shadow, pin.as_deref())
                    .map_err(|e| format!("{e:#}"))?;
                a2.slots.upsert(slot.clone());
                Ok(slot)
            }
        }
    })
    .await;
    match result {
        Ok(Ok(slot)) => {
            if let (Some(w), Some(f)) = (&a.watcher, slot.file()) {
                if let Err(e) = w.watch(&f) {
                    tracing::warn!("{e:#}");
                }
            }
            a.loader
                .metrics
                .slot_weight
                .with_label_values(&[&slot.name])
                .set(slot.weight() as i64);
            axum::Json(slot_json(&slot)).into_response()
        }
        Ok(Err(msg)) => load_failed(format!("policy not loaded, nothing changed: {msg}")),
        Err(e) => ApiError::internal(format!("load task failed: {e}")).into_response(),
    }
}

async fn reload(State(a): St, Path(name): Path<String>) -> Response {
    let Some(slot) = a.slots.get(&name) else {
        return not_found(&name);
    };
    let a2 = a.clone();
    let s2 = slot.clone();
    let r = tokio::task::spawn_blocking(move || a2.loader.reload(&s2, None, None)).await;
    match r {
        Ok(Ok(_)) => axum::Json(slot_json(&slot)).into_response(),
        Ok(Err(e)) => load_failed(format!(
            "reload refused, last good version keeps serving: {e:#}"
        )),
        Err(e) => ApiError::internal(format!("reload task failed: {e}")).into_response(),
    }
}

async fn remove(State(a): St, Path(name): Path<String>) -> Response {
    match a.slots.remove(&name) {
        Ok(s) => {
            let v = s.current();
            let _ = a.loader.metrics.policy_info.remove_label_values(&[
                &name,
                &v.name,
                &v.sha256[..12],
                &v.source,
            ]);
            let _ = a.loader.metrics.slot_weight.remove_label_values(&[&name]);
            tracing::info!(slot = %name, "policy slot removed");
            axum::Json(json!({"removed": name})).into_response()
        }
        Err(msg) if msg.starts_with("no slot") => not_found(&name),
        Err(msg) => ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "slot_in_use",
            msg,
        )
        .into_response(),
    }
}

async fn weights(State(a): St, body: axum::body::Bytes) -> Response {
    let m: std::collections::BTreeMap<String, u32> = match serde_json::from_slice(&body) {
        Ok(m) => m,
        Err(e) => {
            return bad(
                "invalid_json",
                format!("expected {{\"slot\": weight, ...}}: {e}"),
            );
        }
    };
    let w: Vec<(String, u32)> = m.into_iter().collect();
    match a.slots.set_weights(&w) {
        Ok(()) => {
            refresh_weights(&a);
            tracing::info!(?w, "A/B weights changed");
            list(State(a)).await
        }
        Err(msg) => bad("invalid_weights", msg),
    }
}

/// Mirror every serving slot's weight into `vllm_router_slot_weight`.
fn refresh_weights(a: &Admin) {
    for s in a.slots.all().iter().filter(|s| !s.shadow) {
        a.loader
            .metrics
            .slot_weight
            .with_label_values(&[&s.name])
            .set(s.weight() as i64);
    }
}

async fn promote(State(a): St, Path(name): Path<String>) -> Response {
    match a.slots.promote(&name) {
        Ok(()) => {
            refresh_weights(&a);
            tracing::info!(slot = %name, "slot promoted: takes all traffic");
            list(State(a)).await
        }
        Err(msg) => bad("invalid_slot", msg),
    }
}

#[derive(Deserialize)]
struct UrlQuery {
    url: Option<String>,
}

async fn add_worker(State(a): St, Query(q): Query<UrlQuery>) -> Response {
    let Some(url) = q.url else {
        return bad("missing_url", "POST /add_worker?url=http://host:port");
    };
    let uri: http::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => return bad("invalid_url", format!("'{url}' is not a URL: {e}")),
    };
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
        return bad(
            "invalid_url",
            format!("'{url}' must look like http://host:port or https://host:port"),
        );
    }
    let probe = format!("{}{}", url.trim_end_matches('/'), a.health.endpoint);
    let timeout = a.health.timeout;
    if !crate::health::probe_url(&crate::health::probe_client(timeout), &probe, timeout).await {
        return bad(
            "worker_unhealthy",
            format!("{probe} did not answer 2xx; worker not added"),
        );
    }
    match a.loader.registry.add(&url, Role::Regular, 1) {
        Ok(ids) => {
            tracing::info!(worker = %url, "worker added by admin API");
            axum::Json(json!({"added": url, "ids": ids})).into_response()
        }
        Err(e) => bad("invalid_url", e),
    }
}

async fn remove_worker(State(a): St, Query(q): Query<UrlQuery>) -> Response {
    let Some(url) = q.url else {
        return bad("missing_url", "POST /remove_worker?url=http://host:port");
    };
    let n = a.loader.registry.remove(&url);
    if n == 0 {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "no_such_worker",
            format!("no worker {url}"),
        )
        .into_response();
    }
    tracing::info!(worker = %url, removed = n, "worker removed by admin API");
    axum::Json(json!({"removed": url, "workers": n})).into_response()
}
