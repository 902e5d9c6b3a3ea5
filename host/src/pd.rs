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
//! 4. a retryable prefill failure is retried on another prefill worker by the same
//!    retry driver as regular requests (breaker, backoff, retry budget); a final failure
//!    is returned as JSON and decode is never called;
//! 5. the decode request is the client's body, byte for byte, plus the prefill
//!    response's `kv_transfer_params` (NIXL) when it has one; its response (JSON or SSE)
//!    streams to the client unbuffered. Decode is not retried elsewhere: the KV cache
//!    was handed to that worker (P2P NCCL pushes it there).
//!
//! Both stages get the client's headers (`Authorization` included) minus hop-by-hop
//! ones; vllm-project/router drops them.

use crate::error::ApiError;
use crate::forward::{Attempt, Forwarder, Outcome, Sent, Target, body, is_retryable};
use crate::policy::{PolicySlot, Stage};
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
/// prefill returned one, spliced before the closing brace; when the client sent its own
/// `kv_transfer_params` (the last one, if repeated: what JSON parsers keep), only that
/// value's bytes are replaced. The client's other bytes are never re-serialised (a
/// round trip through serde_json changed large numbers by one ULP: found by the
/// `pd_body_rewrite` fuzz target).
pub fn decode_body(
    body: &Bytes,
    kv: Option<&serde_json::value::RawValue>,
) -> Result<Bytes, String> {
    let Some(kv) = kv else {
        return Ok(body.clone());
    };
    let index = vllm_router_sdk::routing::FieldIndex::new(body);
    if let Some(r) = index.range("kv_transfer_params") {
        let mut out = Vec::with_capacity(body.len() - r.len() + kv.get().len());
        out.extend_from_slice(&body[..r.start]);
        out.extend_from_slice(kv.get().as_bytes());
        out.extend_from_slice(&body[r.end..]);
        return Ok(Bytes::from(out));
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

/// Serve a generation request with the two-stage PD flow (see module docs), over the
/// one forwarding core: prefill is [`Forwarder::drive`] with the rewritten body and the
/// PD request id; decode is one attempt on the worker chosen first.
pub async fn serve(
    fwd: &Arc<Forwarder>,
    pd: &Pd,
    req: Arc<RequestInfo>,
    admission: crate::forward::Admitted,
) -> Response<Body> {
    let started = Instant::now();
    let fail =
        |e: ApiError, slot: &str, id: &str| fwd.error_response(&req, Some(slot), e, started, id);
    // Policies that read the KV prefix cache get the prompt's blocks first (one
    // tokenization serves both stages).
    fwd.prepare_prefix(&req, &pd.decode, Role::Decode).await;
    fwd.prepare_prefix(&req, &pd.prefill, Role::Prefill).await;
    // Decode first: its address goes into the id the prefill must see.
    let dtarget = Target {
        role: Role::Decode,
        stage: Stage::Decode,
        slot: Some(&pd.decode),
        shadows: false,
    };
    let Some(decode) = fwd.pick(&req, &dtarget, &[]) else {
        return fail(
            ApiError::no_workers("no healthy decode workers available"),
            "decode",
            &req.request_id,
        );
    };
    let prefill_body = match prefill_body(&req.body) {
        Ok(b) => b,
        Err(m) => {
            return fail(
                ApiError::bad_request("invalid_json", m),
                "prefill",
                &req.request_id,
            );
        }
    };
    let decode_addr = pd.address_of(&decode.worker);
    let ptarget = Target {
        role: Role::Prefill,
        stage: Stage::Prefill,
        slot: Some(&pd.prefill),
        shadows: false,
    };
    let rid = |w: &Worker| Some(pd_request_id(&pd.address_of(w), &decode_addr));
    let prefill_started = Instant::now();
    let sent = match fwd.drive(&req, &ptarget, &prefill_body, &rid).await {
        Ok(s) => s,
        Err(e) if e.code == "no_healthy_workers" => {
            let e = if e.message.starts_with("no healthy workers") {
                ApiError::no_workers("no healthy prefill workers available")
            } else {
                e
            };
            return fail(e, "prefill", &req.request_id);
        }
        Err(e) => {
            let e = ApiError::new(
                e.status.max(StatusCode::BAD_GATEWAY),
                "upstream_error",
                "prefill_failed",
                format!("prefill failed: {}", e.message),
            );
            return fail(e, "prefill", &req.request_id);
        }
    };
    let request_id = sent.request_id.clone();
    let status = sent.resp.status();
    let attempts = sent.attempt.number;
    let (parts_ok, body) = match sent.resp.into_body().collect().await {
        Ok(b) => (true, b.to_bytes()),
        Err(e) => (false, Bytes::from(format!("prefill response broke: {e}"))),
    };
    fwd.settle(
        sent.attempt,
        if parts_ok {
            Outcome::Answered(status)
        } else {
            Outcome::StreamFailed(status)
        },
        None,
        true,
    );
    fwd.metrics
        .pd_stage_seconds
        .with_label_values(&["prefill"])
        .observe(prefill_started.elapsed().as_secs_f64());
    if !(parts_ok && status.is_success()) {
        let msg: String = String::from_utf8_lossy(&body).chars().take(500).collect();
        tracing::debug!(%status, request_id = %request_id, "prefill failed: {msg}");
        let e = if parts_ok && status.is_client_error() && !is_retryable(status) {
            ApiError::new(
                status,
                "invalid_request_error",
                "prefill_rejected",
                format!("prefill worker refused the request: {msg}"),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "prefill_failed",
                format!("prefill failed after {attempts} attempt(s) (last status {status}): {msg}"),
            )
        };
        return fail(e, "prefill", &request_id);
    }
    let kv_raw = serde_json::from_slice::<PrefillAnswer<'_>>(&body)
        .ok()
        .and_then(|a| a.kv_transfer_params)
        .filter(|r| r.get() != "null");
    let dbody = match decode_body(&req.body, kv_raw) {
        Ok(b) => b,
        Err(m) => {
            return fail(
                ApiError::bad_request("invalid_json", m),
                "decode",
                &request_id,
            );
        }
    };
    // Decode: one attempt on the chosen worker, streamed to the client. Not retried
    // elsewhere: the KV cache was handed to that worker.
    let dw = decode.worker.clone();
    let Some(ticket) = dw.breaker_admit() else {
        return fail(
            ApiError::no_workers("decode worker's circuit breaker is open"),
            "decode",
            &request_id,
        );
    };
    let attempt = Attempt {
        choice: decode,
        guard: dw.start_request(),
        ticket,
        sent: Instant::now(),
        number: 1,
    };
    match fwd.send(&req, &dw, dbody, &request_id).await {
        Ok(resp) => {
            let sent = Sent {
                resp,
                attempt,
                request_id,
            };
            body::respond(
                fwd.clone(),
                &req,
                sent,
                admission,
                started,
                Some(prefill_started),
            )
        }
        Err(e) => {
            fwd.settle(attempt, Outcome::Transport(e.kind()), None, true);
            let e = ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "decode_failed",
                format!("decode worker {} failed: {e}", dw.url),
            );
            fail(e, "decode", &request_id)
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

    /// Found by the `pd_body_rewrite` fuzz target: a prefill's `kv_transfer_params`
    /// holding a number beyond f64 (`8E663…`, valid JSON: RFC 8259 sets no range) is
    /// spliced byte for byte, never parsed into a float (which would refuse it, or turn
    /// it into `inf`).
    #[test]
    fn decode_body_splices_numbers_beyond_f64_byte_for_byte() {
        let body = Bytes::from_static(br#"{"okes":2}"#);
        let big = format!("8E66{}", "3".repeat(60));
        let kv = serde_json::value::RawValue::from_string(big.clone()).unwrap();
        let out = decode_body(&body, Some(&kv)).unwrap();
        assert_eq!(
            String::from_utf8(out.to_vec()).unwrap(),
            format!(r#"{{"okes":2,"kv_transfer_params":{big}}}"#)
        );
        // Still a syntactically valid JSON object for the decode worker.
        let m: std::collections::HashMap<String, Box<serde_json::value::RawValue>> =
            serde_json::from_slice(&out).unwrap();
        assert_eq!(m["kv_transfer_params"].get(), big);
    }

    /// Found by the `pd_body_rewrite` fuzz target: a client's own `kv_transfer_params`
    /// used to be replaced by re-serialising the whole body, which changed a 51-digit
    /// number by one ULP. Now only that value's bytes are replaced.
    #[test]
    fn a_clients_own_kv_transfer_params_is_replaced_in_place() {
        let big = "1".repeat(51);
        let body = Bytes::from(format!(
            r#"{{"model":"m", "n":{big},"kv_transfer_params": [1.6,9] ,"x":1.0e-7}}"#
        ));
        let kv =
            serde_json::value::RawValue::from_string(r#"{"remote_engine_id":"e"}"#.into()).unwrap();
        let out = decode_body(&body, Some(&kv)).unwrap();
        assert_eq!(
            String::from_utf8(out.to_vec()).unwrap(),
            format!(
                r#"{{"model":"m", "n":{big},"kv_transfer_params": {{"remote_engine_id":"e"}} ,"x":1.0e-7}}"#
            )
        );
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
