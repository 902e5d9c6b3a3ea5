//! Command-line flags. Names and defaults follow vllm-project/router where the feature is
//! the same, so switching routers means changing one binary.

mod slots;

use clap::Parser;
pub use slots::SlotDef;
use std::path::PathBuf;

/// vllm-router: an OpenAI-compatible router for vLLM workers whose load-balancing
/// policies are WebAssembly components (built-in or loaded from a file, hot-swappable).
#[derive(Parser, Debug, Clone)]
#[command(
    name = "vllm-router",
    version,
    about,
    long_about = None,
    max_term_width = 100,
    after_help = "Subcommands:\n  vllm-router serve MODEL ...        start vLLM engines and the router in one command (serve --help)\n  vllm-router policy check FILE      load and exercise a policy component offline (policy check --help)\n  vllm-router policy new NAME --lang rust|go|c|js|python   start a policy project\n  vllm-router keys new NAME --file F  make a client API key for --client-api-keys-file (keys --help)"
)]
pub struct Args {
    /// Address to listen on for client traffic.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on for client traffic.
    #[arg(long, default_value_t = 30000)]
    pub port: u16,

    /// vLLM worker base URLs (space-separated after one flag, e.g.
    /// `--worker-urls http://10.0.0.1:8000 http://10.0.0.2:8000`).
    #[arg(long, num_args = 1.., value_name = "URL")]
    pub worker_urls: Vec<String>,

    /// vLLM prefill/decode disaggregation: each generation request runs on a prefill
    /// worker (max_tokens 1, KV cache handed off) and then a decode worker, which
    /// streams the answer. Workers come from --prefill/--decode or ZMQ discovery.
    #[arg(long)]
    pub vllm_pd_disaggregation: bool,

    /// Prefill worker URL (repeat the flag for several), PD mode.
    #[arg(long, value_name = "URL", action = clap::ArgAction::Append)]
    pub prefill: Vec<String>,

    /// Decode worker URL (repeat the flag for several), PD mode.
    #[arg(long, value_name = "URL", action = clap::ArgAction::Append)]
    pub decode: Vec<String>,

    /// PD mode: built-in policy choosing the prefill worker (default: --policy).
    #[arg(long, value_name = "NAME")]
    pub prefill_policy: Option<String>,

    /// PD mode: built-in policy choosing the decode worker (default: --policy).
    #[arg(long, value_name = "NAME")]
    pub decode_policy: Option<String>,

    /// PD mode: prefill policy from a component file (watched, hot-swapped).
    #[arg(long, value_name = "PATH")]
    pub prefill_policy_wasm: Option<PathBuf>,

    /// PD mode: decode policy from a component file (watched, hot-swapped).
    #[arg(long, value_name = "PATH")]
    pub decode_policy_wasm: Option<PathBuf>,

    /// PD mode: bind a ZMQ ROUTER socket here (HOST:PORT) for vLLM P2P NCCL instances to
    /// register with (msgpack `{"type": "P"|"D", "http_address", "zmq_address"}`
    /// heartbeats); an instance silent for 5 s is dropped.
    #[arg(long, value_name = "HOST:PORT")]
    pub vllm_discovery_address: Option<String>,

    /// Find workers in Kubernetes: pods matching --selector (PD: --prefill-selector /
    /// --decode-selector) that are Running and Ready become workers; pods that stop
    /// qualifying are drained and removed. Needs get/list/watch on pods (docs:
    /// pd-and-discovery.md) and a kubeconfig or in-cluster service account.
    #[arg(long)]
    pub service_discovery: bool,

    /// Labels a worker pod carries, `KEY=VALUE` (several, or comma-separated); sent to
    /// the API server as the label selector.
    #[arg(long, num_args = 1.., value_name = "KEY=VALUE")]
    pub selector: Vec<String>,

    /// PD mode: labels of prefill pods.
    #[arg(long, num_args = 1.., value_name = "KEY=VALUE")]
    pub prefill_selector: Vec<String>,

    /// PD mode: labels of decode pods.
    #[arg(long, num_args = 1.., value_name = "KEY=VALUE")]
    pub decode_selector: Vec<String>,

    /// Namespace to watch (default: all namespaces).
    #[arg(long, value_name = "NAMESPACE")]
    pub service_discovery_namespace: Option<String>,

    /// Worker port of a discovered pod without a `vllm.ai/worker-ports` annotation.
    #[arg(long, default_value_t = 80)]
    pub service_discovery_port: u16,

    /// Seconds a worker whose pod stopped qualifying keeps finishing its in-flight
    /// requests (getting no new ones) before it is removed.
    #[arg(long, default_value_t = 5)]
    pub drain_settle_secs: u64,

    /// Reconcile the discovered workers against the pod list at least this often
    /// (seconds), besides after every change.
    #[arg(long, default_value_t = 60)]
    pub service_discovery_resync_secs: u64,

    /// Data-parallel ranks per worker URL: each URL becomes N workers `URL@0..N-1` with
    /// their own load and breaker; the rank goes upstream as `X-data-parallel-rank`.
    #[arg(long, default_value_t = 1)]
    pub intra_node_data_parallel_size: u32,

    /// Built-in load-balancing policy, embedded in the binary as a WebAssembly component:
    /// round_robin, random, power_of_two (less loaded of two random workers),
    /// cache_aware (prefix-cache affinity, see --cache-threshold and below),
    /// kv_aware (exact prefix-cache affinity from vLLM KV events, see --kv-event-source;
    /// cache_aware while it has no events),
    /// consistent_hash (session key from x-session-id / x-user-id /
    /// ... headers or the body's user / session fields; `--policy-config
    /// '{"bounded_load":true,"load_factor":1.25}'` caps any worker's share).
    #[arg(long, default_value = "round_robin", value_name = "NAME")]
    pub policy: String,

    /// Load the policy from a WebAssembly component file instead of `--policy`
    /// (any component built against wit/policy.wit, world `policy`).
    #[arg(long, value_name = "PATH")]
    pub policy_wasm: Option<PathBuf>,

    /// JSON config passed to the policy's `init` (an object). Built-in policies also
    /// receive their tunables from the flags below.
    #[arg(long, default_value = "{}", value_name = "JSON")]
    pub policy_config: String,

    /// cache_aware: minimum prefix match ratio (matched / prompt characters) for cache
    /// affinity, in [0, 1].
    #[arg(long, default_value_t = 0.3)]
    pub cache_threshold: f64,

    /// cache_aware: load gap (requests) above which balance beats affinity (together
    /// with --balance-rel-threshold).
    #[arg(long, default_value_t = 64)]
    pub balance_abs_threshold: u64,

    /// cache_aware: load ratio (max / min, ≥ 1) above which balance beats affinity
    /// (together with --balance-abs-threshold).
    #[arg(long, default_value_t = 1.5)]
    pub balance_rel_threshold: f64,

    /// cache_aware: seconds between passes that drop prefix-tree entries of workers that
    /// left. Size limits are enforced on every insert, not by this timer.
    #[arg(long, visible_alias = "eviction-interval-secs", default_value_t = 120)]
    pub eviction_interval: u64,

    /// cache_aware: prefix-tree size limit per worker, in characters (bytes) of prompt.
    /// The whole tree is also capped at 24 MiB so it fits --policy-max-memory-mb 64.
    #[arg(long, default_value_t = 1 << 26)]
    pub max_tree_size: u64,

    /// KV events: a worker's vLLM KV-event publisher, as `WORKER_URL=tcp://HOST:PORT`
    /// (repeatable or comma-separated; vllm-project/router's flag). The rank-0 port; DP
    /// rank r is read at port + r; a `*` host means the worker's host. Workers without
    /// one are asked `GET /kv_event_sources` (see --kv-event-discovery). Used by policies
    /// that read the prefix cache (`kv_aware`); see docs/kv-events.md.
    #[arg(long, value_name = "URL=ENDPOINT", value_delimiter = ',', value_parser = crate::kv::parse_source)]
    pub kv_event_source: Vec<(String, String)>,

    /// KV events: a worker's replay socket (vLLM's `replay_endpoint`), as
    /// `WORKER_URL=tcp://HOST:PORT`; lost batches are re-read from it instead of
    /// resetting that worker's index entries.
    #[arg(long, value_name = "URL=ENDPOINT", value_delimiter = ',', value_parser = crate::kv::parse_source)]
    pub kv_event_replay_source: Vec<(String, String)>,

    /// KV events: tokens per KV block (vLLM's `--block-size`), used to cut prompts until
    /// the first event reports the engines' own.
    #[arg(long, default_value_t = 16)]
    pub kv_event_block_size: u32,

    /// KV events: ask workers without --kv-event-source for `GET /kv_event_sources` (vLLM
    /// with --kv-events-config) once a policy that reads the prefix cache is loaded.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub kv_event_discovery: bool,

    /// KV events: most blocks remembered per worker (≈ 100 bytes each; the oldest stored
    /// are forgotten first past it). 262144 blocks = 4 Mi tokens at block size 16.
    #[arg(long, default_value_t = crate::kv::index::DEFAULT_MAX_BLOCKS_PER_WORKER)]
    pub kv_index_max_blocks: usize,

    /// KV events: time allowed for a worker's `/tokenize` before `select`, ms; past it the
    /// request is routed without a KV prefix match.
    #[arg(long, default_value_t = 200)]
    pub kv_tokenize_timeout_ms: u64,

    /// Scrape each worker's vLLM `/metrics` (num_requests_running/waiting, KV-cache use)
    /// every this many milliseconds and show it to policies as engine load (0 = off).
    #[arg(long, default_value_t = 1000)]
    pub engine_metrics_interval_ms: u64,

    /// A/B test: a second policy (built-in name) serving `--ab-percent` of requests in
    /// slot `b` (the main policy is slot `default`).
    #[arg(long, value_name = "NAME", conflicts_with = "ab_policy_wasm")]
    pub ab_policy: Option<String>,

    /// A/B test: the second policy from a component file (watched like `--policy-wasm`).
    #[arg(long, value_name = "PATH")]
    pub ab_policy_wasm: Option<PathBuf>,

    /// JSON config for the A/B policy's `init`.
    #[arg(long, default_value = "{}", value_name = "JSON")]
    pub ab_policy_config: String,

    /// Percentage of requests the A/B policy serves (0..=100).
    #[arg(long, default_value_t = 10)]
    pub ab_percent: u32,

    /// Assign A/B arms by session key (x-session-id, x-user-id, ... headers, or the body's
    /// user / session fields) so a conversation stays on one arm; requests without a key
    /// are split at random.
    #[arg(long)]
    pub ab_sticky: bool,

    /// Shadow policy (built-in name), slot `shadow`: decides on every request but is never
    /// acted on; agreement with the serving arm is counted in
    /// vllm_router_shadow_decisions_total.
    #[arg(long, value_name = "NAME", conflicts_with = "shadow_policy_wasm")]
    pub shadow_policy: Option<String>,

    /// Shadow policy from a component file.
    #[arg(long, value_name = "PATH")]
    pub shadow_policy_wasm: Option<PathBuf>,

    /// JSON config for the shadow policy's `init`.
    #[arg(long, default_value = "{}", value_name = "JSON")]
    pub shadow_policy_config: String,

    /// TOML file of policy slots, replacing --policy/--ab-*/--shadow-*: `sticky = bool`
    /// and `[[slot]]` tables with `name`, `builtin` or `path` (relative to the file),
    /// `config` (table or JSON string), `weight` (default 1), `shadow` (default false).
    #[arg(long, value_name = "PATH")]
    pub policy_slots_file: Option<PathBuf>,

    /// Do not watch policy files; reload only through the admin API.
    #[arg(long)]
    pub no_watch: bool,

    /// Quiet time after a change to a policy file before it is reloaded, in ms. A file
    /// caught half-written fails validation and is retried on its next change, so this
    /// only saves wasted compiles.
    #[arg(long, default_value_t = 20)]
    pub watch_debounce_ms: u64,

    /// Enables the admin API (`/admin/...`: policy slots, weights, reloads; and
    /// `/add_worker`, `/remove_worker`) for callers sending `Authorization: Bearer KEY`.
    /// Without a key the admin API is off.
    #[arg(
        long,
        env = "VLLM_ROUTER_ADMIN_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub admin_api_key: Option<String>,

    /// API key the workers (vLLM `--api-key`) expect: sent as `Authorization: Bearer KEY`
    /// on health probes, metrics scrapes, and client requests that carry no
    /// `Authorization` of their own (both PD stages too). Never logged.
    #[arg(
        long,
        env = "VLLM_ROUTER_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,

    /// Client API keys file (TOML: named keys stored as SHA-256, per-key
    /// requests_per_second/burst/max_concurrent; see docs/operations.md). With it every
    /// route but /health, /liveness and /readiness needs `Authorization: Bearer KEY`
    /// (401 otherwise; 429 with Retry-After over a key's limits). Re-read on change.
    /// Make keys with `vllm-router keys new NAME --file FILE`.
    #[arg(long, value_name = "FILE")]
    pub client_api_keys_file: Option<std::path::PathBuf>,

    /// Global request rate limit: requests per second admitted over all clients (token
    /// bucket; over it: 429 with Retry-After). Unset: no rate limit. (vllm-project/router's
    /// flag; its tokens are requests, not LLM tokens.)
    #[arg(long, value_name = "N")]
    pub rate_limit_tokens_per_second: Option<f64>,

    /// Bucket size of --rate-limit-tokens-per-second: requests allowed in a burst
    /// [default: one second's worth].
    #[arg(long, value_name = "N")]
    pub rate_limit_burst: Option<f64>,

    /// Serve clients over TLS with this certificate chain (PEM, leaf first); needs
    /// --tls-key-file. Both files are re-read when they change (new handshakes get the
    /// new certificate; open connections are kept).
    #[arg(long, value_name = "FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<std::path::PathBuf>,

    /// Private key (PEM) of --tls-cert-file.
    #[arg(long, value_name = "FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<std::path::PathBuf>,

    /// Extra CA certificates (PEM) trusted for https:// workers, besides the system roots.
    #[arg(long, value_name = "FILE")]
    pub worker_ca_file: Option<std::path::PathBuf>,

    /// Client certificate (PEM) presented to https:// workers (mTLS); needs
    /// --worker-client-key-file.
    #[arg(long, value_name = "FILE", requires = "worker_client_key_file")]
    pub worker_client_cert_file: Option<std::path::PathBuf>,

    /// Private key (PEM) of --worker-client-cert-file.
    #[arg(long, value_name = "FILE", requires = "worker_client_cert_file")]
    pub worker_client_key_file: Option<std::path::PathBuf>,

    /// Most client connections open at once; at the cap new connections wait in the
    /// kernel's backlog until one closes.
    #[arg(long, default_value_t = 10000)]
    pub max_client_connections: usize,

    /// Seconds a client has for the TLS handshake plus its first request head after
    /// connecting, and for a later request head from its first byte; then the
    /// connection is closed (slowloris defence).
    #[arg(long, default_value_t = 10)]
    pub client_header_timeout_secs: u64,

    /// Seconds a keep-alive client connection may sit idle between requests before the
    /// router closes it (a request in progress, stream included, is never cut).
    #[arg(long, default_value_t = 75)]
    pub client_idle_timeout_secs: u64,

    /// Origins browsers may call the router from (CORS), e.g.
    /// `https://chat.example.com`; `*` for any. Unset: no CORS headers.
    #[arg(long, num_args = 1.., value_name = "ORIGIN")]
    pub cors_allowed_origins: Vec<String>,

    /// Per-call time limit of a policy, in milliseconds. A call that runs longer is
    /// interrupted (between one and two limits after it started, never before one) and
    /// the request is routed by the fallback (least in-flight).
    #[arg(long, default_value_t = 5)]
    pub policy_timeout_ms: u64,

    /// Let Cranelift optimise policy code when compiling it. Off by default: components
    /// come optimised by their own compiler, decisions measured no faster with it, and
    /// loading (start, hot swap) is ~25 % faster without.
    #[arg(long)]
    pub policy_optimize: bool,

    /// Linear-memory limit of a policy instance, in MiB.
    #[arg(long, default_value_t = 64)]
    pub policy_max_memory_mb: u64,

    /// Core instances a policy component may create (bounded so a component cannot
    /// multiply itself). Rust and C policies use 1-4, Go (SDK adapter) 2, JavaScript
    /// (jco QuickJS) 11, Python (componentize-py) 14.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub policy_max_instances: u64,

    /// Directory for compiled policy components, so a restart or a swap back to a version
    /// seen before skips compilation (Python/JavaScript policies compile for seconds,
    /// load from here in milliseconds). Created with mode 0700; refused (with a
    /// warning, the router then compiles every time) if others may write to it.
    /// Default: `$XDG_CACHE_HOME/vllm-router/compiled-policies` or
    /// `~/.cache/vllm-router/compiled-policies`.
    #[arg(long, value_name = "DIR", env = "VLLM_ROUTER_POLICY_CACHE_DIR")]
    pub policy_cache_dir: Option<std::path::PathBuf>,

    /// Do not keep compiled policy components on disk.
    #[arg(long)]
    pub no_policy_cache: bool,

    /// Record one JSON line per routed request stage (what a policy saw and what was
    /// decided) to this file, for `vllm-router policy replay`. Prompts are recorded as
    /// prefix-block hashes and session keys as hashes, so a trace is safe to share.
    #[arg(long, value_name = "PATH")]
    pub record_trace: Option<std::path::PathBuf>,

    /// Rotate the trace file at this size (MiB); the previous one becomes PATH.1.
    #[arg(long, default_value_t = 256)]
    pub record_trace_max_mb: u64,

    /// Also record the raw routing text (the prompt) in the trace. Off by default:
    /// prompts are user data.
    #[arg(long)]
    pub record_trace_text: bool,

    /// Write an embedded policy component to a file and exit, e.g.
    /// `--export-policy round_robin=./round_robin.wasm`.
    #[arg(long, value_name = "NAME=PATH")]
    pub export_policy: Option<String>,

    /// Headers to take the client's request id from, first present wins; otherwise the
    /// router generates one. The id is sent upstream and echoed as `x-request-id`.
    #[arg(long, num_args = 1.., value_name = "HEADER",
          default_values_t = ["x-request-id".to_string(), "x-correlation-id".to_string(),
                              "x-trace-id".to_string(), "request-id".to_string()])]
    pub request_id_headers: Vec<String>,

    /// Largest accepted request body, in bytes; larger bodies get 413.
    #[arg(long, default_value_t = 512 * 1024 * 1024)]
    pub max_payload_size: usize,

    /// Upper bound on a whole upstream exchange, streamed body included, in seconds.
    #[arg(long, default_value_t = 1800)]
    pub request_timeout_secs: u64,

    /// Total attempts per request, first try included (retries go to another worker).
    #[arg(long, default_value_t = 5)]
    pub retry_max_retries: u32,

    /// Backoff before the first retry, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub retry_initial_backoff_ms: u64,

    /// Upper bound on one backoff, in milliseconds.
    #[arg(long, default_value_t = 30000)]
    pub retry_max_backoff_ms: u64,

    /// Growth factor of the backoff between retries.
    #[arg(long, default_value_t = 1.5)]
    pub retry_backoff_multiplier: f64,

    /// Random jitter applied to each backoff, as a fraction (0.2 = ±20 %).
    #[arg(long, default_value_t = 0.2)]
    pub retry_jitter_factor: f64,

    /// Send every request once, never retry.
    #[arg(long)]
    pub disable_retries: bool,

    /// Retry budget: retries allowed as a fraction of the requests of the last 10 s
    /// (0.2 = at most one retry per five requests, plus the floor below), so an outage
    /// does not multiply the fleet's load by --retry-max-retries. Negative = no budget.
    /// Refused retries are counted in vllm_router_retries_refused_total.
    #[arg(long, default_value_t = 0.2, allow_hyphen_values = true)]
    pub retry_budget_ratio: f64,

    /// Retry budget floor: retries per second always allowed (a quiet router can still
    /// retry).
    #[arg(long, default_value_t = 10)]
    pub retry_budget_min_per_sec: u32,

    /// Circuit breaker: consecutive failures (5xx, connection error, timeout, broken
    /// stream) that open a worker's breaker (no traffic for --cb-timeout-duration-secs).
    #[arg(long, default_value_t = 10)]
    pub cb_failure_threshold: u32,

    /// Circuit breaker: successful half-open probes that close it again.
    #[arg(long, default_value_t = 3)]
    pub cb_success_threshold: u32,

    /// Circuit breaker: seconds a breaker stays open before probing (half-open).
    #[arg(long, default_value_t = 60)]
    pub cb_timeout_duration_secs: u64,

    /// Circuit breaker: cap of the open time, seconds. Each time a breaker re-opens
    /// without staying closed for this long, its open time grows by
    /// --cb-timeout-duration-secs (Envoy's outlier-detection ejection), up to this cap.
    #[arg(long, default_value_t = 300)]
    pub cb_max_timeout_duration_secs: u64,

    /// Circuit breaker: a failure streak spanning longer than this many seconds starts
    /// over.
    #[arg(long, default_value_t = 120)]
    pub cb_window_duration_secs: u64,

    /// Circuit breaker: concurrent probe requests let through while half-open (the rest
    /// go to other workers).
    #[arg(long, default_value_t = 1)]
    pub cb_half_open_max_requests: u32,

    /// Turn circuit breakers off.
    #[arg(long)]
    pub disable_circuit_breaker: bool,

    /// Most generation requests in flight at once (a stream counts until its end).
    #[arg(long, default_value_t = 32768)]
    pub max_concurrent_requests: usize,

    /// Requests that may wait for a free slot beyond --max-concurrent-requests
    /// (0 = answer 429 at once).
    #[arg(long, default_value_t = 100)]
    pub queue_size: usize,

    /// Longest wait in the admission queue, in seconds, before 429.
    #[arg(long, default_value_t = 60)]
    pub queue_timeout_secs: u64,

    /// At startup, wait up to this many seconds for at least one worker to answer its
    /// health check before serving (0 = don't wait); exit with an error if none does.
    #[arg(long, default_value_t = 600)]
    pub worker_startup_timeout_secs: u64,

    /// Seconds between health checks while waiting for workers at startup.
    #[arg(long, default_value_t = 1)]
    pub worker_startup_check_interval: u64,

    /// On SIGTERM/SIGINT: stop accepting, let in-flight requests (streams included)
    /// finish for up to this many seconds, then exit.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace_period_secs: u64,

    /// Quarantine a policy version after this many faults within
    /// --policy-quarantine-window-secs: the fallback decides until a new version loads
    /// (0 = never).
    #[arg(long, default_value_t = 5)]
    pub policy_quarantine_faults: u32,

    /// Window for --policy-quarantine-faults, in seconds.
    #[arg(long, default_value_t = 10)]
    pub policy_quarantine_window_secs: u64,

    /// Seconds between active `GET /health` probes of healthy workers (all in parallel).
    /// Unhealthy workers are probed every second so they come back quickly.
    #[arg(long, default_value_t = 60)]
    pub health_check_interval_secs: u64,

    /// Timeout of one health probe, in seconds.
    #[arg(long, default_value_t = 5)]
    pub health_check_timeout_secs: u64,

    /// Consecutive failed probes that mark a worker unhealthy.
    #[arg(long, default_value_t = 3)]
    pub health_failure_threshold: u32,

    /// Consecutive successful probes that mark an unhealthy worker healthy again.
    #[arg(long, default_value_t = 2)]
    pub health_success_threshold: u32,

    /// Path probed on each worker.
    #[arg(long, default_value = "/health")]
    pub health_check_endpoint: String,

    /// Log level: trace, debug, info, warn, error (or a tracing filter directive).
    #[arg(long, default_value = "info")]
    pub log_level: String,

    /// Address of the Prometheus metrics listener.
    #[arg(long, default_value = "127.0.0.1")]
    pub prometheus_host: String,

    /// Port of the Prometheus metrics listener (0 disables it).
    #[arg(long, default_value_t = 29000)]
    pub prometheus_port: u16,
}

impl Args {
    /// Check cross-flag constraints; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.service_discovery {
            let pd_sel = !self.prefill_selector.is_empty() || !self.decode_selector.is_empty();
            if self.vllm_pd_disaggregation
                && (self.prefill_selector.is_empty() || self.decode_selector.is_empty())
            {
                return Err("--service-discovery with --vllm-pd-disaggregation needs --prefill-selector and --decode-selector".into());
            }
            if !self.vllm_pd_disaggregation && pd_sel {
                return Err(
                    "--prefill-selector/--decode-selector need --vllm-pd-disaggregation".into(),
                );
            }
            if !self.vllm_pd_disaggregation && self.selector.is_empty() {
                return Err(
                    "--service-discovery needs --selector KEY=VALUE (the labels of worker pods)"
                        .into(),
                );
            }
            for s in [
                &self.selector,
                &self.prefill_selector,
                &self.decode_selector,
            ] {
                crate::k8s::parse_selector(s)?;
            }
            if self.vllm_pd_disaggregation {
                // PD workers come from the selectors: no --prefill/--decode needed.
                return Ok(());
            }
        }
        if self.vllm_pd_disaggregation {
            if self.vllm_discovery_address.is_none()
                && (self.prefill.is_empty() || self.decode.is_empty())
            {
                return Err("--vllm-pd-disaggregation needs --prefill and --decode URLs, or --vllm-discovery-address".into());
            }
        } else if !self.prefill.is_empty() || !self.decode.is_empty() {
            return Err("--prefill/--decode need --vllm-pd-disaggregation".into());
        } else if self.worker_urls.is_empty()
            && self.export_policy.is_none()
            && !self.service_discovery
        {
            return Err("no workers: give at least one --worker-urls URL".into());
        }
        if self.intra_node_data_parallel_size == 0 {
            return Err("--intra-node-data-parallel-size must be at least 1".into());
        }
        for u in self
            .worker_urls
            .iter()
            .chain(&self.prefill)
            .chain(&self.decode)
        {
            let uri: http::Uri = u
                .parse()
                .map_err(|e| format!("worker URL '{u}' is not a URL: {e}"))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
                return Err(format!(
                    "worker URL '{u}' must look like http://host:port or https://host:port"
                ));
            }
        }
        if self.retry_max_retries == 0 {
            return Err("--retry-max-retries must be at least 1 (it counts the first try)".into());
        }
        if self.retry_backoff_multiplier < 1.0 {
            return Err("--retry-backoff-multiplier must be >= 1.0".into());
        }
        if !(0.0..=1.0).contains(&self.retry_jitter_factor) {
            return Err("--retry-jitter-factor must be within [0, 1]".into());
        }
        if self.retry_max_backoff_ms < self.retry_initial_backoff_ms {
            return Err("--retry-max-backoff-ms must be >= --retry-initial-backoff-ms".into());
        }
        if self.cb_failure_threshold == 0 || self.cb_success_threshold == 0 {
            return Err(
                "--cb-failure-threshold and --cb-success-threshold must be at least 1".into(),
            );
        }
        if self.max_concurrent_requests == 0 {
            return Err("--max-concurrent-requests must be at least 1".into());
        }
        if self
            .rate_limit_tokens_per_second
            .is_some_and(|r| !(r > 0.0 && r.is_finite()))
        {
            return Err("--rate-limit-tokens-per-second must be > 0".into());
        }
        if self
            .rate_limit_burst
            .is_some_and(|b| !(b >= 1.0 && b.is_finite()))
        {
            return Err("--rate-limit-burst must be >= 1".into());
        }
        if self.max_client_connections == 0
            || self.client_header_timeout_secs == 0
            || self.client_idle_timeout_secs == 0
        {
            return Err("--max-client-connections, --client-header-timeout-secs and --client-idle-timeout-secs must be at least 1".into());
        }
        if self.worker_startup_check_interval == 0 {
            return Err("--worker-startup-check-interval must be at least 1".into());
        }
        if self.health_failure_threshold == 0 || self.health_success_threshold == 0 {
            return Err("--health-*-threshold must be at least 1".into());
        }
        if self.policy_timeout_ms == 0 {
            return Err("--policy-timeout-ms must be at least 1".into());
        }
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&self.policy_config)
            .map_err(|e| format!("--policy-config must be a JSON object: {e}"))?;
        if !(0.0..=1.0).contains(&self.cache_threshold) {
            return Err("--cache-threshold must be within [0, 1]".into());
        }
        if self.balance_rel_threshold < 1.0 {
            return Err("--balance-rel-threshold must be >= 1.0".into());
        }
        if self.ab_percent > 100 {
            return Err("--ab-percent must be within 0..=100".into());
        }
        for (flag, v) in [
            ("--ab-policy-config", &self.ab_policy_config),
            ("--shadow-policy-config", &self.shadow_policy_config),
        ] {
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(v)
                .map_err(|e| format!("{flag} must be a JSON object: {e}"))?;
        }
        for o in &self.cors_allowed_origins {
            if o != "*" && o.parse::<http::HeaderValue>().is_err() {
                return Err(format!(
                    "--cors-allowed-origins: '{o}' is not a valid origin"
                ));
            }
        }
        if self.admin_api_key.as_deref().is_some_and(|k| k.len() < 16) {
            return Err("--admin-api-key must be at least 16 characters".into());
        }
        if self.eviction_interval == 0 || self.max_tree_size == 0 {
            return Err("--eviction-interval and --max-tree-size must be > 0".into());
        }
        Ok(())
    }

    /// Attempts per request after `--disable-retries`.
    pub fn attempts(&self) -> u32 {
        if self.disable_retries {
            1
        } else {
            self.retry_max_retries
        }
    }
}
