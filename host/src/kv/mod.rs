//! Exact prefix-cache routing from vLLM's KV-cache events.
//!
//! - [`events`]: the wire format (msgpack batches, map and array forms, bytes and
//!   integer hashes);
//! - [`index`]: which worker holds which block, keyed by a router-side chain hash over
//!   token ids, bounded in memory, shared by every policy slot and surviving hot swaps;
//! - [`source`]: one ZMQ subscriber per (worker, data-parallel rank) with sequence
//!   tracking, replay and the exact / degraded / fallback states;
//! - [`KvEvents`] (here): which sources exist (`--kv-event-source` flags, or each
//!   worker's `GET /kv_event_sources`), reconciled with the worker set, and the request
//!   side: a prompt is tokenized by a worker's `/tokenize` (which applies the model's chat
//!   template, so chat prompts become exactly the tokens the engine caches) and cut into
//!   blocks, only for a policy that imports `vllm:router-kv/prefix-cache`.
//!
//! Why the worker's `/tokenize` rather than a tokenizer in the router: it is exact for
//! every model, chat template, tool schema and `chat_template_kwargs` without shipping
//! model files or a Jinja engine, and it needs no configuration; its cost is one HTTP
//! round trip to a worker's API server per routed request (measured against the
//! simulator in docs/kv-events.md). A local tokenizer (the `tokenizers` crate with the
//! model's `tokenizer.json`, plus its chat template) would save that trip at the price of
//! per-model files and template fidelity — the next step if the trip shows in TTFT.

pub mod events;
pub mod index;
pub mod source;

pub use index::{KvIndex, SourceState};

use crate::metrics::Metrics;
use crate::request::RequestInfo;
use crate::workers::{Registry, Worker};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use parking_lot::Mutex;
use serde::Deserialize;
use source::SourceSpec;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// KV-event settings from the flags.
#[derive(Debug, Clone)]
pub struct KvConfig {
    /// `--kv-event-source URL=ENDPOINT`: a worker base URL and its rank-0 publisher.
    pub sources: Vec<(String, String)>,
    /// `--kv-event-replay-source URL=ENDPOINT`.
    pub replay: Vec<(String, String)>,
    /// `--kv-event-block-size`: tokens per block until an event says otherwise.
    pub block_size: u32,
    /// `--kv-index-max-blocks`: per-worker bound of the index, blocks.
    pub max_blocks_per_worker: usize,
    /// `--kv-event-discovery`: ask workers without a flag for `GET /kv_event_sources`.
    pub discover: bool,
    /// `--kv-tokenize-timeout-ms`.
    pub tokenize_timeout: Duration,
}

/// A prompt cut into chain-hashed blocks, attached to a request before `select`.
#[derive(Debug)]
pub struct KvPrompt {
    /// Chain keys of the prompt's full blocks.
    pub keys: Vec<u64>,
    /// The index to match them against.
    pub index: Arc<KvIndex>,
}

impl KvPrompt {
    /// The `prefix-cache` answer: pushes one word per candidate and returns total blocks.
    pub fn matches(&self, candidates: &[u32], out: &mut Vec<u64>) -> u32 {
        self.index.match_prefix(&self.keys, candidates, out);
        self.keys.len() as u32
    }
}

/// Parse `URL=ENDPOINT` (one flag value).
pub fn parse_source(s: &str) -> Result<(String, String), String> {
    let (url, ep) = s.split_once('=').ok_or_else(|| {
        format!(
            "{s:?}: expected WORKER_URL=ENDPOINT (e.g. http://10.0.0.1:8000=tcp://10.0.0.1:5557)"
        )
    })?;
    let url = url.trim().trim_end_matches('/').to_string();
    let ep = ep.trim().to_string();
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!(
            "{s:?}: the worker URL must start with http:// or https://"
        ));
    }
    if !ep.starts_with("tcp://") {
        return Err(format!("{s:?}: the endpoint must be tcp://HOST:PORT"));
    }
    Ok((url, ep))
}

/// The endpoint of data-parallel rank `rank`: vLLM publishes rank r at port + r. A
/// wildcard host (`*`, `0.0.0.0`, `::`) is the worker's own host. `None` when the
/// endpoint is not `tcp://HOST:PORT`.
pub fn rank_endpoint(endpoint: &str, rank: u32, worker_host: &str) -> Option<String> {
    let rest = endpoint.strip_prefix("tcp://")?;
    let (host, port) = rest.rsplit_once(':')?;
    let port: u32 = port.parse().ok()?;
    let host = match host {
        "*" | "0.0.0.0" | "::" | "[::]" | "" => worker_host,
        h => h,
    };
    let port = port + rank;
    (port <= 65535).then(|| format!("tcp://{host}:{port}"))
}

/// What a worker's `GET /kv_event_sources` says: per DP rank, the publisher and the
/// replay socket. Accepted shapes: `{"0": "tcp://…"}` or
/// `{"0": {"endpoint": "tcp://…", "replay_endpoint": "tcp://…"}}`.
pub fn parse_discovery(body: &[u8]) -> Result<HashMap<u32, (String, Option<String>)>, String> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Entry {
        Plain(String),
        Full {
            endpoint: String,
            #[serde(default)]
            replay_endpoint: Option<String>,
        },
    }
    let m: HashMap<String, Entry> =
        serde_json::from_slice(body).map_err(|e| format!("not a JSON object of endpoints: {e}"))?;
    m.into_iter()
        .map(|(k, v)| {
            let rank: u32 = k
                .parse()
                .map_err(|_| format!("key {k:?} is not a data-parallel rank"))?;
            Ok(match v {
                Entry::Plain(e) => (rank, (e, None)),
                Entry::Full {
                    endpoint,
                    replay_endpoint,
                } => (rank, (endpoint, replay_endpoint)),
            })
        })
        .collect()
}

/// A worker's discovery answer, cached per URL.
struct Discovered {
    at: Instant,
    /// `None`: the worker has no KV-event sources (or did not answer).
    ranks: Option<HashMap<u32, (String, Option<String>)>>,
}

/// How long a failed discovery is trusted before asking again.
const REDISCOVER: Duration = Duration::from_secs(30);
/// How often sources are reconciled with the worker set while KV events are in use.
const RECONCILE: Duration = Duration::from_secs(2);

/// The KV-event subsystem: the index, its sources, and request-side tokenization.
pub struct KvEvents {
    /// The index every policy slot reads.
    pub index: Arc<KvIndex>,
    cfg: KvConfig,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    client: crate::forward::UpstreamClient,
    probe: crate::health::ProbeClient,
    /// A policy reading the prefix cache is loaded: discover sources.
    wanted: AtomicBool,
    wake: Arc<tokio::sync::Notify>,
    running: Mutex<HashMap<u32, (SourceSpec, tokio::task::JoinHandle<()>)>>,
    discovered: Mutex<HashMap<String, Discovered>>,
}

impl KvEvents {
    /// Start the subsystem (its reconcile task runs only while sources are configured
    /// or a policy asked for them: an idle router without KV policies does nothing).
    pub fn start(cfg: KvConfig, registry: Arc<Registry>, metrics: Arc<Metrics>) -> Arc<Self> {
        let kv = Arc::new(KvEvents {
            index: Arc::new(KvIndex::new(cfg.max_blocks_per_worker, cfg.block_size)),
            client: crate::forward::upstream_client(),
            probe: crate::health::probe_client(Duration::from_secs(2)),
            wanted: AtomicBool::new(!cfg.sources.is_empty()),
            cfg,
            registry,
            metrics,
            wake: Arc::new(tokio::sync::Notify::new()),
            running: Mutex::new(HashMap::new()),
            discovered: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&kv);
        tokio::spawn(async move {
            loop {
                let Some(kv) = weak.upgrade() else { return };
                if kv.wanted.load(Ordering::Acquire) {
                    kv.reconcile().await;
                    let sleep = tokio::time::sleep(RECONCILE);
                    tokio::select! { _ = sleep => {}, _ = kv.wake.notified() => {} }
                } else {
                    let wake = kv.wake.clone();
                    drop(kv);
                    wake.notified().await;
                }
            }
        });
        kv
    }

    /// A policy that reads the prefix cache is serving: make sure sources are followed.
    pub fn want(&self) {
        if !self.wanted.swap(true, Ordering::AcqRel) {
            tracing::info!(
                "a policy reads the KV prefix cache: following vLLM KV events{}",
                if self.cfg.discover {
                    " (sources from --kv-event-source, else each worker's /kv_event_sources)"
                } else {
                    " (--kv-event-source only)"
                }
            );
            self.wake.notify_one();
        }
    }

    /// The sources each worker should have now.
    async fn desired(&self) -> HashMap<u32, SourceSpec> {
        let set = self.registry.snapshot();
        let mut out = HashMap::new();
        for w in &set.workers {
            let host = w.authority.host().to_string();
            let rank = w.dp_rank.unwrap_or(0);
            let flag = self.cfg.sources.iter().find(|(u, _)| *u == w.url);
            let (endpoint, replay) = match flag {
                Some((_, ep)) => {
                    let replay = self
                        .cfg
                        .replay
                        .iter()
                        .find(|(u, _)| *u == w.url)
                        .and_then(|(_, r)| rank_endpoint(r, rank, &host));
                    (rank_endpoint(ep, rank, &host), replay)
                }
                None if self.cfg.discover => match self.discover(w).await {
                    Some(ranks) => match ranks.get(&rank) {
                        Some((ep, r)) => (
                            rank_endpoint(ep, 0, &host),
                            r.as_deref().and_then(|r| rank_endpoint(r, 0, &host)),
                        ),
                        None => (None, None),
                    },
                    None => (None, None),
                },
                None => (None, None),
            };
            if let Some(endpoint) = endpoint {
                out.insert(
                    w.id,
                    SourceSpec {
                        worker: w.id,
                        name: w.name().to_string(),
                        endpoint,
                        replay,
                    },
                );
            }
        }
        out
    }

    /// A worker's `/kv_event_sources`, cached (a failure is retried after 30 s).
    async fn discover(&self, w: &Worker) -> Option<HashMap<u32, (String, Option<String>)>> {
        if let Some(d) = self.discovered.lock().get(&w.url) {
            if d.ranks.is_some() || d.at.elapsed() < REDISCOVER {
                return d.ranks.clone();
            }
        }
        let uri: http::Uri = format!("{}/kv_event_sources", w.url).parse().ok()?;
        let got = tokio::time::timeout(Duration::from_secs(2), async {
            let resp = crate::health::get(&self.probe, uri)
                .await
                .map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if !status.is_success() {
                return Err(format!("status {status}"));
            }
            parse_discovery(&body)
        })
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
        let ranks = match got {
            Ok(r) => {
                tracing::info!(worker = %w.url, ranks = r.len(), "KV event sources discovered");
                Some(r)
            }
            Err(why) => {
                let first = !self.discovered.lock().contains_key(&w.url);
                if first {
                    tracing::info!(worker = %w.url, "no KV event sources from GET /kv_event_sources ({why}); routing without KV events for it (vLLM needs --kv-events-config; or give --kv-event-source)");
                }
                None
            }
        };
        self.discovered.lock().insert(
            w.url.clone(),
            Discovered {
                at: Instant::now(),
                ranks: ranks.clone(),
            },
        );
        ranks
    }

    /// Start subscribers for new sources, stop those of workers that left or changed.
    async fn reconcile(&self) {
        let desired = self.desired().await;
        let mut running = self.running.lock();
        let stale: Vec<u32> = running
            .iter()
            .filter(|(id, (spec, _))| desired.get(id) != Some(spec))
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some((spec, task)) = running.remove(&id) {
                task.abort();
                self.index.remove_source(id);
                let _ = self
                    .metrics
                    .kv_source_state
                    .remove_label_values(&[&spec.name]);
                let _ = self
                    .metrics
                    .kv_index_blocks
                    .remove_label_values(&[&spec.name]);
                tracing::info!(worker = %spec.name, "stopped following KV events");
            }
        }
        for (id, spec) in desired {
            if running.contains_key(&id) {
                continue;
            }
            self.index.add_source(id);
            self.metrics.kv_state(&spec.name, SourceState::Fallback);
            let task = tokio::spawn(source::run(
                spec.clone(),
                self.index.clone(),
                self.metrics.clone(),
            ));
            running.insert(id, (spec, task));
        }
    }

    /// Whether [`KvEvents::prepare`] would do anything for `req`: not done yet (a retry,
    /// or the other PD stage) and some source has events.
    pub fn needs_prompt(&self, req: &RequestInfo) -> bool {
        req.kv.get().is_none() && self.index.has_sources()
    }

    /// Tokenize `req`'s prompt and attach its block keys, so the policy's
    /// `cached-prefix` can answer. Does nothing when no source has events, when the
    /// route has no prompt, or when it is already done (a retry). `worker`: whose
    /// `/tokenize` to ask. A failure or timeout leaves the request without a prompt:
    /// the policy sees 0 blocks and routes as without events.
    pub async fn prepare(&self, req: &Arc<RequestInfo>, worker: &Worker) {
        if !self.needs_prompt(req) {
            return;
        }
        let t0 = Instant::now();
        let tokens = match tokenize_body(req) {
            Tokenize::None => return,
            Tokenize::Tokens(t) => Ok(t),
            Tokenize::Ask(body) => {
                match tokio::time::timeout(
                    self.cfg.tokenize_timeout,
                    self.tokenize(req, worker, body),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err("timeout".to_string()),
                }
            }
        };
        let result = match &tokens {
            Ok(_) => "ok",
            Err(e) if e == "timeout" => "timeout",
            Err(_) => "error",
        };
        self.metrics
            .kv_tokenize_seconds
            .with_label_values(&[result])
            .observe(t0.elapsed().as_secs_f64());
        match tokens {
            Ok(t) => {
                let keys = index::prompt_keys(&t, self.index.block_size());
                let _ = req.kv.set(KvPrompt {
                    keys,
                    index: self.index.clone(),
                });
            }
            Err(why) => {
                tracing::debug!(request_id = %req.request_id, worker = %worker.name(), "tokenize failed ({why}); routing without KV prefix match")
            }
        }
    }

    async fn tokenize(
        &self,
        req: &RequestInfo,
        worker: &Worker,
        body: String,
    ) -> Result<Vec<u32>, String> {
        let uri = http::Uri::builder()
            .scheme(worker.scheme.clone())
            .authority(worker.authority.clone())
            .path_and_query("/tokenize")
            .build()
            .map_err(|e| e.to_string())?;
        let mut r = http::Request::post(uri)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        // The client's own key if it brought one for the workers, else --api-key.
        let auth = req
            .headers
            .get(http::header::AUTHORIZATION)
            .or(crate::health::worker_auth());
        if let Some(a) = auth {
            r.headers_mut()
                .insert(http::header::AUTHORIZATION, a.clone());
        }
        let resp = self.client.request(r).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("/tokenize answered {status}"));
        }
        #[derive(Deserialize)]
        struct Tokens {
            tokens: Vec<u32>,
        }
        serde_json::from_slice::<Tokens>(&body)
            .map(|t| t.tokens)
            .map_err(|e| format!("/tokenize answer has no token list: {e}"))
    }
}

/// What tokenizing a request takes.
#[derive(Debug, PartialEq)]
enum Tokenize {
    /// No prompt on this route.
    None,
    /// The prompt is already token ids (completions with `prompt: [ints]`).
    Tokens(Vec<u32>),
    /// Ask `/tokenize` with this body.
    Ask(String),
}

/// The `/tokenize` body for a request: chat → `model`, `messages` and the fields that
/// change the rendered template (`tools`, `chat_template`, `chat_template_kwargs`,
/// `add_generation_prompt` — vLLM's default for chat is true — `continue_final_message`);
/// completions → `model`, `prompt`, `add_special_tokens`. Values are copied as raw
/// JSON text, never re-serialised.
fn tokenize_body(req: &RequestInfo) -> Tokenize {
    let f = |name: &str| req.raw_field(name);
    let mut body = String::with_capacity(req.body.len() + 32);
    body.push('{');
    let mut push = |k: &str| {
        if let Some(v) = f(k) {
            if body.len() > 1 {
                body.push(',');
            }
            body.push('"');
            body.push_str(k);
            body.push_str("\":");
            body.push_str(v);
        }
    };
    push("model");
    if f("messages").is_some() {
        for k in [
            "messages",
            "tools",
            "chat_template",
            "chat_template_kwargs",
            "add_generation_prompt",
            "continue_final_message",
        ] {
            push(k);
        }
    } else if let Some(p) = f("prompt") {
        if let Ok(ids) = serde_json::from_str::<Vec<u32>>(p) {
            return Tokenize::Tokens(ids);
        }
        if !p.starts_with('"') {
            // A batch of prompts: no single prefix to match.
            return Tokenize::None;
        }
        push("prompt");
        push("add_special_tokens");
    } else {
        return Tokenize::None;
    }
    body.push('}');
    Tokenize::Ask(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: &str) -> RequestInfo {
        RequestInfo::from_json(
            http::Method::POST,
            "/v1/chat/completions".into(),
            "/v1/chat/completions".into(),
            http::HeaderMap::new(),
            Bytes::from(body.to_string()),
        )
        .unwrap()
    }

    #[test]
    fn tokenize_bodies_copy_the_template_fields_verbatim() {
        let r = req(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0.5,"tools":[{"type":"function"}],"stream":true}"#,
        );
        assert_eq!(
            tokenize_body(&r),
            Tokenize::Ask(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function"}]}"#.into())
        );
        let r = req(r#"{"model":"m","prompt":"once upon","max_tokens":3}"#);
        assert_eq!(
            tokenize_body(&r),
            Tokenize::Ask(r#"{"model":"m","prompt":"once upon"}"#.into())
        );
        let r = req(r#"{"model":"m","prompt":[1,2,3]}"#);
        assert_eq!(tokenize_body(&r), Tokenize::Tokens(vec![1, 2, 3]));
        assert_eq!(
            tokenize_body(&req(r#"{"model":"m","prompt":["a","b"]}"#)),
            Tokenize::None
        );
        assert_eq!(
            tokenize_body(&req(r#"{"model":"m","input":"x"}"#)),
            Tokenize::None
        );
    }

    #[test]
    fn source_flags_and_rank_endpoints() {
        assert_eq!(
            parse_source("http://10.0.0.1:8000/=tcp://10.0.0.1:5557").unwrap(),
            ("http://10.0.0.1:8000".into(), "tcp://10.0.0.1:5557".into())
        );
        assert!(
            parse_source("http://a:1")
                .unwrap_err()
                .contains("WORKER_URL=ENDPOINT")
        );
        assert!(parse_source("a:1=tcp://b:2").is_err());
        assert!(parse_source("http://a:1=udp://b:2").is_err());
        assert_eq!(
            rank_endpoint("tcp://*:5557", 2, "10.0.0.9").as_deref(),
            Some("tcp://10.0.0.9:5559")
        );
        assert_eq!(
            rank_endpoint("tcp://h:5557", 0, "x").as_deref(),
            Some("tcp://h:5557")
        );
        assert_eq!(rank_endpoint("ipc:///tmp/x", 0, "x"), None);
        assert_eq!(rank_endpoint("tcp://h:65535", 1, "x"), None);
    }

    #[test]
    fn discovery_answers_in_both_shapes() {
        let d = parse_discovery(br#"{"0":"tcp://*:5557","1":{"endpoint":"tcp://h:6000","replay_endpoint":"tcp://h:6001"}}"#).unwrap();
        assert_eq!(d[&0], ("tcp://*:5557".into(), None));
        assert_eq!(d[&1], ("tcp://h:6000".into(), Some("tcp://h:6001".into())));
        assert!(
            parse_discovery(br#"{"x":"tcp://h:1"}"#)
                .unwrap_err()
                .contains("rank")
        );
        assert!(parse_discovery(b"[]").is_err());
    }
}
