//! `vllm-sim`: a simulated vLLM OpenAI-compatible server, the stand-in for vLLM on
//! machines without a GPU. Speaks vLLM's wire format (field names, `usage`, SSE chunk
//! shape, `data: [DONE]`) and reports which worker answered (header
//! `x-vllm-sim-worker`, and the `system_fingerprint` field).
//!
//! Prefix-cache model (for measuring routing quality): the prompt is rendered the way
//! the router renders routing text (chat messages `role\ncontent\n` in order, or the
//! prompt), one token is taken as 4 characters, and the text is cut into blocks of
//! `--block-chars` (64 = 16 tokens, vLLM's default block size). Complete blocks are keyed
//! by a chained hash (a block's key covers everything before it, as in vLLM's automatic
//! prefix caching) and kept in an LRU of `--cache-blocks` entries. A request hits the
//! leading run of cached blocks; its cached tokens go to the response header
//! `x-sim-cached-tokens`, to `usage.prompt_tokens_details.cached_tokens`, and to the
//! `vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total` counters (tokens).
//! With `--prefill-us-per-token`, uncached tokens add simulated prefill time before the
//! first token (reported as `x-sim-prefill-us`).
//!
//! Tokens: the rendered prompt is cut into 4-byte pieces, one token each (ids from the
//! bytes); `POST /tokenize` answers vLLM's shape (`count`, `max_model_len`, `tokens`)
//! for the same rendering, so a router tokenizing through it gets exactly the tokens the
//! cache is keyed on. Blocks are `--block-chars / 4` tokens.
//!
//! `POST /v1/chat/completions/render` and `/v1/completions/render` answer the token ids
//! (`token_ids`) without generating or caching.
//!
//! KV events (`--kv-events`): every block entering the cache is published as a
//! `BlockStored` (parent hash, token ids, block size) and every LRU eviction as a
//! `BlockRemoved`, in vLLM's wire format — ZMQ PUB frames `[topic, seq (u64 BE),
//! msgpack KVEventBatch]`, events in map form or (`--kv-events-form array`) array form,
//! hashes as 32 bytes or (`--kv-int-hashes`) integers — with a replay ROUTER socket
//! holding the last 10,000 batches, both listed by `GET /kv_event_sources`. Test hooks:
//! `POST /sim/config {"kv_drop_batches": N}` withholds the next N batches from the PUB
//! socket (replay still has them: a gap), `POST /sim/kv/restart` empties the cache and
//! restarts the sequence at 0 (an engine restart).
//!
//! Generated text is common one-token English words (`the of and to …`), so clients that
//! count tokens see one per generated token.
//!
//! Test knobs: flags at start, `POST /sim/config` at run time (same names, JSON), and
//! per request the header `x-sim-status: CODE` (answer with that status). Recent requests
//! (path, headers, parsed body, and the raw body bytes as text) are listed by
//! `GET /sim/requests`.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Parser, Debug, Clone, Serialize, Deserialize)]
#[command(name = "vllm-sim", about = "Simulated vLLM worker for tests and demos")]
struct Args {
    /// Model to serve (as `vllm serve MODEL`; overrides `--model`), so the simulator can
    /// stand in for vLLM under `vllm-router serve --engine-cmd vllm-sim`.
    #[serde(skip)]
    served_model: Option<String>,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    #[serde(skip)]
    host: String,
    /// Port to bind (0 = any free port; the chosen port is printed as `LISTENING <port>`).
    #[arg(long, default_value_t = 0)]
    #[serde(skip)]
    port: u16,
    #[command(flatten)]
    #[serde(flatten)]
    knobs: Knobs,
}

/// Behaviour knobs, settable by flags and `POST /sim/config`.
#[derive(clap::Args, Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
struct Knobs {
    /// Name reported in `x-vllm-sim-worker` and `system_fingerprint`.
    #[arg(long, default_value = "sim")]
    worker_id: String,
    /// Model name served.
    #[arg(long, default_value = "sim-model")]
    model: String,
    /// Output tokens when the request gives no `max_tokens`.
    #[arg(long, default_value_t = 16)]
    output_tokens: u32,
    /// Delay before the first token, ms.
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    /// Delay between tokens, ms.
    #[arg(long, default_value_t = 0)]
    token_delay_ms: u64,
    /// Answer every generation request with this status (0 = behave normally).
    #[arg(long, default_value_t = 0)]
    fail_status: u16,
    /// Require `Authorization: Bearer KEY` on generation requests (as vLLM's `--api-key`)
    /// and on `/health` (as an auth proxy in front of it would); 401 otherwise. Empty:
    /// no key.
    #[arg(long, default_value = "")]
    api_key: String,
    /// Answer `/health` with 503 when true.
    #[arg(long, default_value_t = false)]
    unhealthy: bool,
    /// Prefix-cache capacity in blocks (0 = no prefix cache).
    #[arg(long, default_value_t = 4096)]
    cache_blocks: usize,
    /// Characters per cache block (4 characters ≈ 1 token).
    #[arg(long, default_value_t = 64)]
    block_chars: usize,
    /// Simulated prefill cost per uncached prompt token, microseconds (0 = none).
    #[arg(long, default_value_t = 0)]
    prefill_us_per_token: u64,
    /// Extra requests to report as waiting in `vllm:num_requests_waiting` (simulates a
    /// queue building up in the engine).
    #[arg(long, default_value_t = 0)]
    waiting: u64,
    /// Role in a PD deployment: `regular`, `prefill` (answers a request carrying
    /// `kv_transfer_params.do_remote_decode` with NIXL-style hand-off params) or `decode`.
    #[arg(long, default_value = "regular")]
    role: String,
    /// Send P2P NCCL discovery heartbeats (msgpack over a ZMQ DEALER socket) to this
    /// router address (`HOST:PORT`); empty = don't.
    #[arg(long, default_value = "")]
    register: String,
    /// ZMQ address announced in heartbeats (default `127.0.0.1:<port + 10000>`).
    #[arg(long, default_value = "")]
    zmq_address: String,
    /// Heartbeat interval, ms.
    #[arg(long, default_value_t = 1000)]
    register_interval_ms: u64,
    /// Publish vLLM KV-cache events (ZMQ PUB + replay ROUTER on free 127.0.0.1 ports,
    /// listed at `GET /kv_event_sources`).
    #[arg(long, default_value_t = false)]
    #[serde(skip)]
    kv_events: bool,
    /// Event layout: `map` (newer vLLM) or `array` (older vLLM).
    #[arg(long, default_value = "map")]
    #[serde(skip)]
    kv_events_form: String,
    /// Send block hashes as integers (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`) instead
    /// of bytes.
    #[arg(long, default_value_t = false)]
    #[serde(skip)]
    kv_int_hashes: bool,
    /// Withhold this many upcoming event batches from the PUB socket (the replay socket
    /// still serves them): simulates lost messages.
    #[arg(long, default_value_t = 0)]
    kv_drop_batches: u64,
    /// Keep the last 256 requests for `GET /sim/requests` (off for benchmarks).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    record: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            worker_id: "sim".into(),
            model: "sim-model".into(),
            output_tokens: 16,
            ttft_ms: 0,
            token_delay_ms: 0,
            fail_status: 0,
            api_key: String::new(),
            unhealthy: false,
            cache_blocks: 4096,
            block_chars: 64,
            prefill_us_per_token: 0,
            waiting: 0,
            role: "regular".into(),
            register: String::new(),
            zmq_address: String::new(),
            register_interval_ms: 1000,
            kv_events: false,
            kv_events_form: "map".into(),
            kv_int_hashes: false,
            kv_drop_batches: 0,
            record: true,
        }
    }
}

#[derive(Serialize, Clone)]
struct Recorded {
    path: String,
    headers: Vec<(String, String)>,
    body: Value,
    /// The body exactly as received (UTF-8 text), for byte-exact forwarding tests.
    raw: String,
}

/// Generated text: common English words that real tokenizers (BPE, SentencePiece) count
/// as one token each, so client tools that count tokens (`vllm bench serve`) see one
/// token per generated token.
const OUT_WORDS: [&str; 16] = [
    "the", "of", "and", "to", "in", "is", "it", "that", "for", "on", "was", "with", "as", "at",
    "by", "be",
];

/// The `i`-th generated token's text (a word and a space).
fn out_token(i: u32) -> String {
    format!("{} ", OUT_WORDS[i as usize % OUT_WORDS.len()])
}

/// The simulator's tokenizer: 4-byte pieces of the text, one token each.
fn tokenize(text: &[u8]) -> Vec<u32> {
    text.chunks(4)
        .map(|c| {
            let mut b = [0u8; 4];
            b[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(b) & 0x7FFF_FFFF
        })
        .collect()
}

use vllm_router::kv::events::KvEvent;

/// LRU of blocks keyed by a chained hash over their tokens (the "engine hash"), with
/// hit/query counters in tokens; reports the KV events each access causes.
#[derive(Default)]
struct PrefixCache {
    stamp_of: HashMap<u64, u64>,
    by_stamp: BTreeMap<u64, u64>,
    clock: u64,
    hits_tokens: u64,
    query_tokens: u64,
}

impl PrefixCache {
    /// Look up and insert the blocks of `text`; returns (prompt tokens, cached tokens)
    /// and pushes the resulting `BlockStored` / `BlockRemoved` events onto `events`.
    fn access(
        &mut self,
        text: &[u8],
        block_chars: usize,
        capacity: usize,
        events: &mut Vec<KvEvent>,
    ) -> (u64, u64) {
        let toks = tokenize(text);
        let tokens = (toks.len() as u64).max(1);
        let bs = block_chars / 4;
        if capacity == 0 || bs == 0 {
            self.query_tokens += tokens;
            return (tokens, 0);
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut parent: Option<u64> = None;
        let mut hit_blocks = 0u64;
        let mut leading = true;
        let mut removed = Vec::new();
        for block in toks.chunks_exact(bs) {
            for t in block {
                for b in t.to_le_bytes() {
                    h ^= b as u64;
                    h = h.wrapping_mul(0x0000_0100_0000_01b3);
                }
            }
            self.clock += 1;
            match self.stamp_of.insert(h, self.clock) {
                Some(old) => {
                    self.by_stamp.remove(&old);
                    if leading {
                        hit_blocks += 1;
                    }
                }
                None => {
                    leading = false;
                    events.push(KvEvent::BlockStored {
                        block_hashes: vec![h],
                        parent,
                        token_ids: block.to_vec(),
                        block_size: bs as u32,
                        lora_name: None,
                        medium: Some("GPU".into()),
                    });
                }
            }
            self.by_stamp.insert(self.clock, h);
            while self.stamp_of.len() > capacity {
                let (_, victim) = self.by_stamp.pop_first().expect("non-empty");
                self.stamp_of.remove(&victim);
                removed.push(victim);
            }
            parent = Some(h);
        }
        if !removed.is_empty() {
            events.push(KvEvent::BlockRemoved {
                block_hashes: removed,
                medium: Some("GPU".into()),
            });
        }
        let cached = (hit_blocks * bs as u64).min(tokens);
        self.query_tokens += tokens;
        self.hits_tokens += cached;
        (tokens, cached)
    }
}

/// The KV-event publisher's side of the simulator.
struct KvPub {
    tx: tokio::sync::mpsc::UnboundedSender<Vec<KvEvent>>,
    endpoint: String,
    replay: String,
    /// Set by `POST /sim/kv/restart`: the publisher restarts its sequence at 0.
    restart: std::sync::atomic::AtomicBool,
}

struct Sim {
    port: u16,
    knobs: Mutex<Knobs>,
    cache: Mutex<PrefixCache>,
    kv: Option<KvPub>,
    recent: Mutex<VecDeque<Recorded>>,
    running: AtomicU64,
    served: AtomicU64,
    next_id: AtomicU64,
}

type St = State<Arc<Sim>>;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn err(status: StatusCode, msg: &str) -> Response {
    let body = json!({"object": "error", "message": msg, "type": "BadRequestError", "param": null, "code": status.as_u16()});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Whether `headers` carry the key `--api-key` asks for (always true without one).
fn authorized(k: &Knobs, headers: &HeaderMap) -> bool {
    k.api_key.is_empty()
        || headers.get("authorization").and_then(|v| v.to_str().ok())
            == Some(format!("Bearer {}", k.api_key).as_str())
}

async fn health(State(s): St, headers: HeaderMap) -> Response {
    if !authorized(&s.knobs.lock(), &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if s.knobs.lock().unhealthy {
        StatusCode::SERVICE_UNAVAILABLE.into_response()
    } else {
        StatusCode::OK.into_response()
    }
}

async fn models(State(s): St) -> Response {
    let k = s.knobs.lock().clone();
    axum::Json(json!({"object": "list", "data": [{
        "id": k.model, "object": "model", "created": now(), "owned_by": "vllm", "root": k.model,
        "parent": null, "max_model_len": 4096, "permission": []}]}))
    .into_response()
}

async fn metrics(State(s): St) -> Response {
    let k = s.knobs.lock().clone();
    let running = s.running.load(Ordering::Relaxed);
    let (queries, hits) = {
        let c = s.cache.lock();
        (c.query_tokens, c.hits_tokens)
    };
    let text = format!(
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{engine=\"0\",model_name=\"{m}\"}} {running}\n\
         # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{engine=\"0\",model_name=\"{m}\"}} {waiting}\n\
         # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"{m}\"}} 0.0\n\
         # HELP vllm:request_success_total Count of successfully processed requests.\n\
         # TYPE vllm:request_success_total counter\n\
         vllm:request_success_total{{engine=\"0\",model_name=\"{m}\"}} {served}\n\
         # HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.\n\
         # TYPE vllm:prefix_cache_queries_total counter\n\
         vllm:prefix_cache_queries_total{{engine=\"0\",model_name=\"{m}\"}} {queries}\n\
         # HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.\n\
         # TYPE vllm:prefix_cache_hits_total counter\n\
         vllm:prefix_cache_hits_total{{engine=\"0\",model_name=\"{m}\"}} {hits}\n",
        m = k.model,
        served = s.served.load(Ordering::Relaxed),
        queries = queries,
        waiting = k.waiting,
        hits = hits,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn set_config(State(s): St, body: Bytes) -> Response {
    let cur = serde_json::to_value(&*s.knobs.lock()).unwrap();
    let mut merged = cur;
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(patch)) => {
            for (k, v) in patch {
                merged[k] = v;
            }
        }
        _ => return err(StatusCode::BAD_REQUEST, "expected a JSON object"),
    }
    match serde_json::from_value::<Knobs>(merged) {
        Ok(k) => {
            *s.knobs.lock() = k.clone();
            axum::Json(k).into_response()
        }
        Err(e) => err(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

async fn recent(State(s): St) -> Response {
    let v: Vec<Recorded> = s.recent.lock().iter().cloned().collect();
    axum::Json(v).into_response()
}

async fn clear_recent(State(s): St) -> Response {
    s.recent.lock().clear();
    StatusCode::NO_CONTENT.into_response()
}

/// The body as a JSON object, or `None`.
fn json_object(body: &[u8]) -> Option<Value> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .filter(Value::is_object)
}

async fn generate(State(s): St, uri: axum::http::Uri, headers: HeaderMap, raw: Bytes) -> Response {
    let path = uri.path().to_string();
    let Some(body) = json_object(&raw) else {
        return err(
            StatusCode::BAD_REQUEST,
            "request body must be a JSON object",
        );
    };
    let k = s.knobs.lock().clone();
    if k.record {
        let mut r = s.recent.lock();
        if r.len() >= 256 {
            r.pop_front();
        }
        r.push_back(Recorded {
            path: path.clone(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect(),
            body: body.clone(),
            raw: String::from_utf8_lossy(&raw).into_owned(),
        });
    }
    if !authorized(&k, &headers) {
        return err(StatusCode::UNAUTHORIZED, "invalid or missing API key");
    }
    let forced = headers
        .get("x-sim-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok());
    let status = forced.or(if k.fail_status != 0 {
        Some(k.fail_status)
    } else {
        None
    });
    if let Some(code) = status {
        let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if code != StatusCode::OK {
            let mut r = err(
                code,
                &format!("simulated failure {} from {}", code.as_u16(), k.worker_id),
            );
            r.headers_mut()
                .insert("x-vllm-sim-worker", k.worker_id.parse().unwrap());
            return r;
        }
    }
    if body.get("model").and_then(Value::as_str).is_none() {
        return err(StatusCode::BAD_REQUEST, "field required: model");
    }
    let chat = path.ends_with("/chat/completions");
    let max_tokens = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .and_then(Value::as_u64)
        .map(|v| v as u32)
        .unwrap_or(k.output_tokens);
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let model = body["model"].as_str().unwrap_or(&k.model).to_string();
    let text = vllm_router_sdk::routing::routing_text(
        &raw,
        &vllm_router_sdk::routing::FieldIndex::new(&raw),
    );
    let mut events = Vec::new();
    let (ptoks, cached) = {
        let mut c = s.cache.lock();
        let r = c.access(text.as_bytes(), k.block_chars, k.cache_blocks, &mut events);
        // Sent under the lock, so batches leave in cache order.
        if let (Some(kv), false) = (&s.kv, events.is_empty()) {
            let _ = kv.tx.send(events);
        }
        r
    };
    let prefill_us = (ptoks - cached) * k.prefill_us_per_token;
    let ptoks = ptoks as u32;
    let n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let id = if chat {
        format!("chatcmpl-{}-{n}", k.worker_id)
    } else {
        format!("cmpl-{}-{n}", k.worker_id)
    };
    let created = now();
    // NIXL-style hand-off: a prefill asked for a remote decode answers with the params
    // the decode instance needs to pull the KV cache.
    let kv_out = if k.role == "prefill"
        && body.pointer("/kv_transfer_params/do_remote_decode") == Some(&json!(true))
    {
        json!({"do_remote_prefill": true, "do_remote_decode": false,
            "remote_engine_id": format!("engine-{}", k.worker_id), "remote_block_ids": [1, 2, 3],
            "remote_host": "127.0.0.1", "remote_port": s.port, "tp_size": 1})
    } else {
        Value::Null
    };
    let usage = json!({"prompt_tokens": ptoks, "total_tokens": ptoks + max_tokens, "completion_tokens": max_tokens, "prompt_tokens_details": {"cached_tokens": cached}});
    let worker = k.worker_id.clone();
    s.running.fetch_add(1, Ordering::Relaxed);

    let sim_headers = move |r: &mut Response| {
        let h = r.headers_mut();
        h.insert("x-sim-cached-tokens", cached.into());
        h.insert("x-sim-prompt-tokens", (ptoks as u64).into());
        h.insert("x-sim-prefill-us", prefill_us.into());
    };
    let ttft = Duration::from_millis(k.ttft_ms) + Duration::from_micros(prefill_us);
    if !stream {
        let total = ttft + Duration::from_millis(k.token_delay_ms * max_tokens as u64);
        if !total.is_zero() {
            tokio::time::sleep(total).await;
        }
        let text: String = (0..max_tokens).map(out_token).collect();
        let out = if chat {
            json!({"id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "reasoning_content": null, "content": text, "tool_calls": []},
                    "logprobs": null, "finish_reason": "length", "stop_reason": null}],
                "usage": usage, "prompt_logprobs": null, "system_fingerprint": worker, "kv_transfer_params": kv_out})
        } else {
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": "length", "stop_reason": null, "prompt_logprobs": null}],
                "usage": usage, "system_fingerprint": worker, "kv_transfer_params": kv_out})
        };
        s.running.fetch_sub(1, Ordering::Relaxed);
        s.served.fetch_add(1, Ordering::Relaxed);
        let mut r = axum::Json(out).into_response();
        r.headers_mut()
            .insert("x-vllm-sim-worker", worker.parse().unwrap());
        sim_headers(&mut r);
        return r;
    }

    // The stream's events, in order: the role chunk (chat), one chunk per token, the
    // usage chunk (when asked), `[DONE]`.
    let role_chunk = chat.then(|| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": worker,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]})
    });
    let token_chunk = {
        let (id, model, worker) = (id.clone(), model.clone(), worker.clone());
        move |i: u32| {
            let fin = if i + 1 == max_tokens {
                json!("length")
            } else {
                Value::Null
            };
            if chat {
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": worker,
                    "choices": [{"index": 0, "delta": {"content": out_token(i)}, "logprobs": null, "finish_reason": fin}]})
            } else {
                json!({"id": id, "object": "text_completion", "created": created, "model": model, "system_fingerprint": worker,
                    "choices": [{"index": 0, "text": out_token(i), "logprobs": null, "finish_reason": fin, "stop_reason": null}]})
            }
        }
    };
    let usage_chunk = include_usage.then(|| {
        let obj = if chat { "chat.completion.chunk" } else { "text_completion" };
        json!({"id": id, "object": obj, "created": created, "model": model, "choices": [], "usage": usage})
    });
    let event = |v: Value| Bytes::from(format!("data: {v}\n\n"));
    const DONE: &[u8] = b"data: [DONE]\n\n";
    let body = if ttft.is_zero() && k.token_delay_ms == 0 {
        // Nothing to wait for: every event is rendered now and the body yields them as
        // separate chunks with no task, channel or wake-up per event, so that a router
        // benchmark measures the router's per-chunk cost rather than the simulator's.
        let mut events = Vec::with_capacity(max_tokens as usize + 3);
        events.extend(role_chunk.map(event));
        events.extend((0..max_tokens).map(|i| event(token_chunk(i))));
        events.extend(usage_chunk.map(event));
        events.push(Bytes::from_static(DONE));
        s.running.fetch_sub(1, Ordering::Relaxed);
        s.served.fetch_add(1, Ordering::Relaxed);
        Body::from_stream(futures_util::stream::iter(
            events.into_iter().map(Ok::<_, std::io::Error>),
        ))
    } else {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
        let sim = s.clone();
        tokio::spawn(async move {
            let send = |v: Value| {
                let tx = tx.clone();
                async move { tx.send(Ok(event(v))).await.is_ok() }
            };
            if !ttft.is_zero() {
                tokio::time::sleep(ttft).await;
            }
            let mut ok = true;
            if let Some(v) = role_chunk {
                ok &= send(v).await;
            }
            for i in 0..max_tokens {
                if !ok {
                    break;
                }
                if i > 0 && k.token_delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(k.token_delay_ms)).await;
                }
                ok &= send(token_chunk(i)).await;
            }
            if let (true, Some(v)) = (ok, usage_chunk) {
                ok &= send(v).await;
            }
            if ok {
                let _ = tx.send(Ok(Bytes::from_static(DONE))).await;
            }
            sim.running.fetch_sub(1, Ordering::Relaxed);
            sim.served.fetch_add(1, Ordering::Relaxed);
        });
        Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|x| (x, rx))
        }))
    };
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        "text/event-stream; charset=utf-8".parse().unwrap(),
    );
    r.headers_mut()
        .insert("x-vllm-sim-worker", k.worker_id.parse().unwrap());
    sim_headers(&mut r);
    r
}

async fn embeddings(State(s): St, headers: HeaderMap, body: Bytes) -> Response {
    let Some(body) = json_object(&body) else {
        return err(
            StatusCode::BAD_REQUEST,
            "request body must be a JSON object",
        );
    };
    let _ = headers;
    let k = s.knobs.lock().clone();
    let out = json!({"id": "embd-sim", "object": "list", "created": now(), "model": body.get("model").cloned().unwrap_or(json!(k.model)),
        "data": [{"index": 0, "object": "embedding", "embedding": [0.1, 0.2, 0.3, 0.4]}],
        "usage": {"prompt_tokens": 4, "total_tokens": 4, "completion_tokens": 0, "prompt_tokens_details": null}});
    let mut r = axum::Json(out).into_response();
    r.headers_mut()
        .insert("x-vllm-sim-worker", k.worker_id.parse().unwrap());
    r
}

/// The prompt of a request body as the simulator's tokens (the rendering the cache
/// uses); a 400 answer when the body is not a JSON object.
fn prompt_tokens(raw: &[u8]) -> Result<Vec<u32>, Response> {
    if json_object(raw).is_none() {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "request body must be a JSON object",
        ));
    }
    let text = vllm_router_sdk::routing::routing_text(
        raw,
        &vllm_router_sdk::routing::FieldIndex::new(raw),
    );
    Ok(tokenize(text.as_bytes()))
}

/// vLLM's `POST /tokenize`: the same rendering the cache uses, in vLLM's answer shape.
async fn tokenize_route(State(s): St, raw: Bytes) -> Response {
    let tokens = match prompt_tokens(&raw) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let mut r = axum::Json(
        json!({"count": tokens.len(), "max_model_len": 4096, "tokens": tokens, "token_strs": null}),
    )
    .into_response();
    let worker = s.knobs.lock().worker_id.clone();
    if let Ok(v) = worker.parse() {
        r.headers_mut().insert("x-vllm-sim-worker", v);
    }
    r
}

/// vLLM's render endpoints (`/v1/chat/completions/render`, `/v1/completions/render`):
/// the prompt's token ids without generating (vllm-project/router tokenizes through
/// them). Nothing is cached.
async fn render_route(State(s): St, raw: Bytes) -> Response {
    let tokens = match prompt_tokens(&raw) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let model = s.knobs.lock().model.clone();
    axum::Json(json!({"model": model, "token_ids": tokens, "prompt_token_ids": tokens, "sampling_params": {}}))
        .into_response()
}

/// vLLM's `GET /kv_event_sources` (vLLM #55844): endpoints per data-parallel rank.
async fn kv_sources(State(s): St) -> Response {
    match &s.kv {
        Some(kv) => {
            axum::Json(json!({"0": {"endpoint": kv.endpoint, "replay_endpoint": kv.replay}}))
                .into_response()
        }
        None => err(
            StatusCode::NOT_FOUND,
            "KV events are not enabled (--kv-events)",
        ),
    }
}

/// vLLM's `GET /get_server_info`, reduced to what routers read: the block size.
async fn server_info(State(s): St) -> Response {
    let k = s.knobs.lock().clone();
    axum::Json(json!({"model": k.model, "cache_config": {"block_size": k.block_chars / 4}}))
        .into_response()
}

/// `POST /sim/kv/restart`: an engine restart as the router sees it — empty cache,
/// sequence back to 0.
async fn kv_restart(State(s): St) -> Response {
    *s.cache.lock() = PrefixCache::default();
    if let Some(kv) = &s.kv {
        kv.restart.store(true, Ordering::SeqCst);
    }
    StatusCode::NO_CONTENT.into_response()
}

/// Bind the PUB and replay sockets; returns their endpoints.
async fn kv_sockets() -> anyhow::Result<(zeromq::PubSocket, zeromq::RouterSocket, String, String)> {
    use zeromq::Socket;
    let mut publ = zeromq::PubSocket::new();
    let ep = publ.bind("tcp://127.0.0.1:0").await?.to_string();
    let mut replay = zeromq::RouterSocket::new();
    let rep = replay.bind("tcp://127.0.0.1:0").await?.to_string();
    Ok((publ, replay, ep, rep))
}

/// Publish batches from `rx` with sequence numbers; serve replays.
async fn kv_publisher(
    sim: Arc<Sim>,
    mut publ: zeromq::PubSocket,
    mut replay: zeromq::RouterSocket,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Vec<KvEvent>>,
    form: vllm_router::kv::events::encode::Form,
    kind: vllm_router::kv::events::encode::HashKind,
) {
    use zeromq::{SocketRecv, SocketSend, ZmqMessage};
    let buffer: Arc<Mutex<VecDeque<(u64, Bytes)>>> = Arc::default();
    {
        let buffer = buffer.clone();
        tokio::spawn(async move {
            while let Ok(m) = replay.recv().await {
                let frames = m.into_vec();
                // [identity, "", start_seq]
                let (Some(id), Some(start)) = (frames.first(), frames.last()) else {
                    continue;
                };
                let Ok(start) = <[u8; 8]>::try_from(&start[..]) else {
                    continue;
                };
                let start = u64::from_be_bytes(start);
                let items: Vec<(u64, Bytes)> = buffer
                    .lock()
                    .iter()
                    .filter(|(s, _)| *s >= start)
                    .cloned()
                    .collect();
                for (seq, payload) in items {
                    let msg = ZmqMessage::try_from(vec![
                        id.clone(),
                        Bytes::new(),
                        Bytes::copy_from_slice(&seq.to_be_bytes()),
                        payload,
                    ])
                    .unwrap();
                    if replay.send(msg).await.is_err() {
                        break;
                    }
                }
                let end = ZmqMessage::try_from(vec![
                    id.clone(),
                    Bytes::new(),
                    Bytes::copy_from_slice(&(-1i64).to_be_bytes()),
                    Bytes::new(),
                ])
                .unwrap();
                let _ = replay.send(end).await;
            }
        });
    }
    let mut seq: u64 = 0;
    while let Some(events) = rx.recv().await {
        if let Some(kv) = &sim.kv {
            if kv.restart.swap(false, Ordering::SeqCst) {
                seq = 0;
                buffer.lock().clear();
            }
        }
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let payload = Bytes::from(vllm_router::kv::events::encode::batch(
            ts, &events, 0, form, kind,
        ));
        {
            let mut b = buffer.lock();
            b.push_back((seq, payload.clone()));
            if b.len() > 10_000 {
                b.pop_front();
            }
        }
        let drop = {
            let mut k = sim.knobs.lock();
            if k.kv_drop_batches > 0 {
                k.kv_drop_batches -= 1;
                true
            } else {
                false
            }
        };
        if !drop {
            let msg = ZmqMessage::try_from(vec![
                Bytes::new(),
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                payload,
            ])
            .unwrap();
            let _ = publ.send(msg).await;
        }
        seq += 1;
    }
}

/// P2P NCCL discovery heartbeats while `register` is set (re-read every interval, so
/// `POST /sim/config {"register": ""}` makes the instance go silent).
async fn heartbeats(sim: Arc<Sim>) {
    use zeromq::{Socket, SocketSend};
    let mut sock: Option<(String, zeromq::DealerSocket)> = None;
    loop {
        let k = sim.knobs.lock().clone();
        tokio::time::sleep(Duration::from_millis(k.register_interval_ms.max(10))).await;
        if k.register.is_empty() {
            sock = None;
            continue;
        }
        if sock.as_ref().is_none_or(|(a, _)| *a != k.register) {
            let mut d = zeromq::DealerSocket::new();
            if let Err(e) = d.connect(&format!("tcp://{}", k.register)).await {
                eprintln!("vllm-sim: cannot connect to {}: {e}", k.register);
                continue;
            }
            sock = Some((k.register.clone(), d));
        }
        let kind = if k.role == "prefill" { "P" } else { "D" };
        let zmq = if k.zmq_address.is_empty() {
            format!("127.0.0.1:{}", sim.port as u32 + 10000)
        } else {
            k.zmq_address.clone()
        };
        let mut m = std::collections::BTreeMap::new();
        m.insert("type", kind.to_string());
        m.insert("http_address", format!("127.0.0.1:{}", sim.port));
        m.insert("zmq_address", zmq);
        let payload = rmp_serde::to_vec_named(&m).expect("msgpack");
        if let Some((_, d)) = sock.as_mut() {
            if let Err(e) = d.send(zeromq::ZmqMessage::from(payload)).await {
                eprintln!("vllm-sim: heartbeat failed: {e}");
                sock = None;
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if let Some(m) = args.served_model.take() {
        args.knobs.model = m;
    }
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await?;
    let port = listener.local_addr()?.port();
    let (kv, kv_task) = if args.knobs.kv_events {
        let (publ, replay, endpoint, replay_ep) = kv_sockets().await?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        use vllm_router::kv::events::encode::{Form, HashKind};
        let form = if args.knobs.kv_events_form == "array" {
            Form::Array
        } else {
            Form::Map
        };
        let kind = if args.knobs.kv_int_hashes {
            HashKind::Int
        } else {
            HashKind::Bytes
        };
        (
            Some(KvPub {
                tx,
                endpoint,
                replay: replay_ep,
                restart: Default::default(),
            }),
            Some((publ, replay, rx, form, kind)),
        )
    } else {
        (None, None)
    };
    let sim = Arc::new(Sim {
        port,
        knobs: Mutex::new(args.knobs.clone()),
        cache: Mutex::new(PrefixCache::default()),
        kv,
        recent: Mutex::new(VecDeque::new()),
        running: AtomicU64::new(0),
        served: AtomicU64::new(0),
        next_id: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/sim/config", post(set_config))
        .route("/sim/requests", get(recent).delete(clear_recent))
        .route("/v1/embeddings", post(embeddings))
        .route("/tokenize", post(tokenize_route))
        .route("/v1/chat/completions/render", post(render_route))
        .route("/v1/completions/render", post(render_route))
        .route("/kv_event_sources", get(kv_sources))
        .route("/get_server_info", get(server_info))
        .route("/sim/kv/restart", post(kv_restart))
        .fallback(generate)
        .with_state(sim.clone());
    tokio::spawn(heartbeats(sim.clone()));
    if let Some((publ, replay, rx, form, kind)) = kv_task {
        tokio::spawn(kv_publisher(sim.clone(), publ, replay, rx, form, kind));
    }
    println!("LISTENING {port}");
    use std::io::Write;
    std::io::stdout().flush()?;
    // TCP_NODELAY, as vLLM's server (uvicorn) sets it: without it a stream's chunks
    // wait for the client's delayed ACK (~40 ms per stream), and every router in the
    // streaming benchmark measured the same ~1,450 streams/s, the simulator's stall.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}
