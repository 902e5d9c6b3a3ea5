//! vLLM prefill/decode disaggregation: the two-stage flow of vLLM's
//! `disagg_proxy_p2p_nccl_xpyd.py` (P2P NCCL connector) and `toy_proxy_server.py` (NIXL
//! connector), with policies choosing both workers.
//!
//! For a generation POST (`/v1/completions`, `/v1/chat/completions`, `/v1/responses`):
//! 1. the `prefill` slot picks a prefill worker, the `decode` slot a decode worker;
//! 2. both stages carry `X-Request-Id: ___prefill_addr_{P}___decode_addr_{D}_{uuid4 hex}`,
//!    P and D being the instances' ZMQ addresses when known from discovery, else their
//!    HTTP `host:port` (the P2P NCCL connector parses this id to find its peer);
//! 3. the prefill request is the client's JSON with `max_tokens: 1` (and
//!    `max_completion_tokens: 1` if present), `min_tokens` clamped to 1, `stream: false`,
//!    no `stream_options`, and `kv_transfer_params` asking for a remote decode;
//! 4. a retryable prefill failure is retried on another prefill worker (breaker,
//!    backoff); a final failure is returned as JSON and decode is never called;
//! 5. the decode request is the client's body, byte for byte, plus the prefill
//!    response's `kv_transfer_params` (NIXL) when it has one; its response (JSON or SSE)
//!    streams to the client unbuffered. Decode is not retried elsewhere: the KV cache
//!    was handed to that worker (P2P NCCL pushes it there).
//!
//! Both stages get the client's headers (`Authorization` included) minus hop-by-hop
//! ones; vllm-project/router drops them.

use crate::error::ApiError;
use crate::policy::{self, PolicySlot, Stage};
use crate::proxy::{Proxy, is_retryable, set_request_id};
use crate::request::RequestInfo;
use crate::workers::Worker;
use axum::body::Body;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use vllm_router_sdk::Role;

/// The PD policy slots and what discovery knows about instances.
pub struct Pd {
    /// Chooses the prefill worker.
    pub prefill: Arc<PolicySlot>,
    /// Chooses the decode worker.
    pub decode: Arc<PolicySlot>,
    /// ZMQ address by worker base URL (from discovery).
    pub zmq_addresses: RwLock<HashMap<String, String>>,
}

/// Routes that take the two-stage flow.
pub fn is_generation(path: &str) -> bool {
    matches!(
        path,
        "/v1/completions" | "/v1/chat/completions" | "/v1/responses"
    )
}

impl Pd {
    /// The address a worker is known by in the request id: its ZMQ address when it
    /// registered one, else `host:port`.
    pub fn address_of(&self, w: &Worker) -> String {
        self.zmq_addresses
            .read()
            .get(&w.url)
            .cloned()
            .unwrap_or_else(|| w.authority.to_string())
    }
}

/// The request id both stages carry (vLLM P2P NCCL format).
pub fn pd_request_id(prefill_addr: &str, decode_addr: &str) -> String {
    format!(
        "___prefill_addr_{prefill_addr}___decode_addr_{decode_addr}_{}",
        uuid::Uuid::new_v4().simple()
    )
}

/// The prefill body: the client's JSON object with the changes of step 3.
pub fn prefill_body(body: &[u8]) -> Result<Bytes, String> {
    let mut v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| format!("request body: {e}"))?;
    v.insert("max_tokens".into(), 1.into());
    if v.contains_key("max_completion_tokens") {
        v.insert("max_completion_tokens".into(), 1.into());
    }
    if let Some(m) = v.get("min_tokens").and_then(|m| m.as_u64()) {
        if m > 1 {
            v.insert("min_tokens".into(), 1.into());
        }
    }
    v.insert("stream".into(), false.into());
    v.remove("stream_options");
    v.insert(
        "kv_transfer_params".into(),
        serde_json::json!({"do_remote_decode": true, "do_remote_prefill": false,
            "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null}),
    );
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|e| e.to_string())
}

/// The decode body: the client's bytes, plus `"kv_transfer_params": <raw>` when the
/// prefill returned one. Spliced before the closing brace (the client's bytes are kept)
/// unless the client sent its own `kv_transfer_params`, which is then replaced.
pub fn decode_body(
    body: &Bytes,
    kv: Option<&serde_json::value::RawValue>,
) -> Result<Bytes, String> {
    let Some(kv) = kv else {
        return Ok(body.clone());
    };
    let index = vllm_router_sdk::routing::FieldIndex::new(body);
    if index.range("kv_transfer_params").is_some() {
        let mut v: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(body).map_err(|e| e.to_string())?;
        v.insert(
            "kv_transfer_params".into(),
            serde_json::from_str(kv.get()).map_err(|e| e.to_string())?,
        );
        return serde_json::to_vec(&v)
            .map(Bytes::from)
            .map_err(|e| e.to_string());
    }
    let end = body
        .iter()
        .rposition(|b| *b == b'}')
        .ok_or("request body is not a JSON object")?;
    let empty = body[..end]
        .iter()
        .rev()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    let mut out = Vec::with_capacity(body.len() + kv.get().len() + 24);
    out.extend_from_slice(&body[..end]);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(b"\"kv_transfer_params\":");
    out.extend_from_slice(kv.get().as_bytes());
    out.extend_from_slice(&body[end..]);
    Ok(Bytes::from(out))
}

#[derive(serde::Deserialize)]
struct PrefillAnswer<'a> {
    #[serde(borrow, default)]
    kv_transfer_params: Option<&'a serde_json::value::RawValue>,
}

impl Proxy {
    /// Serve a generation request with the two-stage PD flow (see module docs).
    pub async fn forward_pd(
        self: &Arc<Self>,
        pd: &Pd,
        req: Arc<RequestInfo>,
        admission: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Response<Body> {
        let route = crate::metrics::route_label(&req.path);
        let started = Instant::now();
        let fail = |e: ApiError, id: &str| {
            self.finish_error(route, "prefill", &e, started);
            let mut r = axum::response::IntoResponse::into_response(e);
            set_request_id(r.headers_mut(), id);
            r
        };
        let set = self.registry.snapshot();
        // Decode first: its address goes into the id the prefill must see.
        let dcands = policy::candidates(&set, Role::Decode, &[]);
        let Some(decode) = policy::choose(
            &pd.decode,
            &req,
            Stage::Decode,
            &set,
            &dcands,
            &self.metrics,
        ) else {
            return fail(
                ApiError::no_workers("no healthy decode workers available"),
                &req.request_id,
            );
        };
        let prefill_body = match prefill_body(&req.body) {
            Ok(b) => b,
            Err(m) => return fail(ApiError::bad_request("invalid_json", m), &req.request_id),
        };
        let mut tried = Vec::new();
        let mut attempt = 0u32;
        let mut last_err = None;
        let mut request_id = req.request_id.clone();
        let prefill_started = started;
        let mut kv: Option<Bytes> = None;
        let mut prefill_ok = false;
        while attempt < self.retry.attempts {
            let set = self.registry.snapshot();
            let pcands = policy::candidates(&set, Role::Prefill, &tried);
            let Some(choice) = policy::choose(
                &pd.prefill,
                &req,
                Stage::Prefill,
                &set,
                &pcands,
                &self.metrics,
            ) else {
                break;
            };
            let w = choice.worker.clone();
            tried.push(w.id);
            let Some(ticket) = w.breaker_admit() else {
                continue;
            };
            if attempt > 0 {
                self.metrics.retries.with_label_values(&[route]).inc();
                tokio::time::sleep(self.retry.backoff(attempt - 1)).await;
            }
            attempt += 1;
            request_id = pd_request_id(&pd.address_of(&w), &pd.address_of(&decode.worker));
            let guard = w.start_request();
            let t0 = Instant::now();
            let r = self
                .send_with(&req, &w, prefill_body.clone(), &request_id)
                .await;
            let outcome = match r {
                Ok(resp) => {
                    let status = resp.status();
                    match resp.into_body().collect().await {
                        Ok(b) if status.is_success() => Ok(b.to_bytes()),
                        Ok(b) => Err((
                            status,
                            String::from_utf8_lossy(&b.to_bytes())
                                .chars()
                                .take(500)
                                .collect::<String>(),
                            false,
                        )),
                        Err(e) => Err((
                            StatusCode::BAD_GATEWAY,
                            format!("prefill response broke: {e}"),
                            false,
                        )),
                    }
                }
                Err(e) => Err((StatusCode::BAD_GATEWAY, e.to_string(), e.is_connect())),
            };
            drop(guard);
            self.metrics
                .pd_stage_seconds
                .with_label_values(&["prefill"])
                .observe(t0.elapsed().as_secs_f64());
            match outcome {
                Ok(body) => {
                    ticket.record(true);
                    w.record_success(1);
                    self.metrics
                        .pd_stage_requests
                        .with_label_values(&["prefill", "200"])
                        .inc();
                    kv = Some(body);
                    prefill_ok = true;
                    break;
                }
                Err((status, msg, hard)) => {
                    ticket.record(status.as_u16() < 500);
                    if status.is_server_error() {
                        w.record_failure(hard, self.failure_threshold);
                    }
                    self.metrics
                        .pd_stage_requests
                        .with_label_values(&["prefill", status.as_str()])
                        .inc();
                    tracing::debug!(worker = %w.name(), %status, "prefill failed: {msg}");
                    last_err = Some((status, msg));
                    if !is_retryable(status) {
                        break;
                    }
                }
            }
        }
        if !prefill_ok {
            let e = match last_err {
                None => ApiError::no_workers("no healthy prefill workers available"),
                Some((status, msg)) if !is_retryable(status) && status.is_client_error() => {
                    ApiError::new(
                        status,
                        "invalid_request_error",
                        "prefill_rejected",
                        format!("prefill worker refused the request: {msg}"),
                    )
                }
                Some((status, msg)) => ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_error",
                    "prefill_failed",
                    format!(
                        "prefill failed after {attempt} attempt(s) (last status {status}): {msg}"
                    ),
                ),
            };
            return fail(e, &request_id);
        }
        let prefill_resp = kv.unwrap_or_default();
        let kv_raw = serde_json::from_slice::<PrefillAnswer<'_>>(&prefill_resp)
            .ok()
            .and_then(|a| a.kv_transfer_params)
            .filter(|r| r.get() != "null");
        let body = match decode_body(&req.body, kv_raw) {
            Ok(b) => b,
            Err(m) => return fail(ApiError::bad_request("invalid_json", m), &request_id),
        };
        // Decode: one attempt on the chosen worker, streamed to the client.
        let dw = decode.worker.clone();
        let Some(ticket) = dw.breaker_admit() else {
            return fail(
                ApiError::no_workers("decode worker's circuit breaker is open"),
                &request_id,
            );
        };
        let guard = dw.start_request();
        let sent = Instant::now();
        match self.send_with(&req, &dw, body, &request_id).await {
            Ok(resp) => {
                let status = resp.status();
                self.metrics
                    .pd_stage_requests
                    .with_label_values(&["decode", status.as_str()])
                    .inc();
                let ticket = if status.is_server_error() {
                    ticket.record(false);
                    None
                } else {
                    Some(ticket)
                };
                let _ = prefill_started;
                let mut out = self.respond(
                    req, resp, decode, guard, ticket, admission, started, sent, true,
                );
                set_request_id(out.headers_mut(), &request_id);
                out
            }
            Err(e) => {
                ticket.record(false);
                dw.record_failure(false, self.failure_threshold);
                self.metrics
                    .pd_stage_requests
                    .with_label_values(&["decode", "502"])
                    .inc();
                let e = ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_error",
                    "decode_failed",
                    format!("decode worker {} failed: {e}", dw.url),
                );
                self.finish_error(route, "decode", &e, started);
                let mut r = axum::response::IntoResponse::into_response(e);
                set_request_id(r.headers_mut(), &request_id);
                r
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn prefill_body_follows_vllm_proxies() {
        let b = br#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":50,"min_tokens":5,"max_tokens":50}"#;
        let v: Value = serde_json::from_slice(&prefill_body(b).unwrap()).unwrap();
        assert_eq!(v["max_tokens"], 1);
        assert_eq!(v["max_completion_tokens"], 1);
        assert_eq!(v["min_tokens"], 1);
        assert_eq!(v["stream"], false);
        assert!(v.get("stream_options").is_none());
        assert_eq!(
            v["kv_transfer_params"],
            json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null})
        );
        let v: Value =
            serde_json::from_slice(&prefill_body(br#"{"model":"m","prompt":"x"}"#).unwrap())
                .unwrap();
        assert!(v.get("max_completion_tokens").is_none() && v.get("min_tokens").is_none());
    }

    #[test]
    fn decode_body_keeps_client_bytes_and_adds_the_handoff() {
        let body = Bytes::from_static(br#"{"model":"m",  "prompt":"x" }"#);
        let kv = serde_json::value::RawValue::from_string(
            r#"{"remote_engine_id":"e1","remote_block_ids":[1,2]}"#.into(),
        )
        .unwrap();
        let out = decode_body(&body, Some(&kv)).unwrap();
        assert_eq!(&out[..], &br#"{"model":"m",  "prompt":"x" ,"kv_transfer_params":{"remote_engine_id":"e1","remote_block_ids":[1,2]}}"#[..]);
        assert_eq!(decode_body(&body, None).unwrap(), body);
        let empty = decode_body(&Bytes::from_static(b"{ }"), Some(&kv)).unwrap();
        assert!(serde_json::from_slice::<Value>(&empty).is_ok());
        let own = Bytes::from_static(br#"{"model":"m","kv_transfer_params":{"x":1}}"#);
        let v: Value = serde_json::from_slice(&decode_body(&own, Some(&kv)).unwrap()).unwrap();
        assert_eq!(v["kv_transfer_params"]["remote_engine_id"], "e1");
    }

    #[test]
    fn request_id_has_the_p2p_nccl_shape() {
        let id = pd_request_id("10.0.0.1:21001", "10.0.0.2:22001");
        let (head, uuid) = id.rsplit_once('_').unwrap();
        assert_eq!(
            head,
            "___prefill_addr_10.0.0.1:21001___decode_addr_10.0.0.2:22001"
        );
        assert_eq!(uuid.len(), 32);
        assert!(uuid.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
