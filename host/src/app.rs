//! The composition root: builds every part of the router from the validated flags, in
//! dependency order, and serves until SIGINT/SIGTERM. Nothing else wires parts together.
//!
//! Order: policy engine → worker registry (breaker settings) → metrics → feedback
//! thread (also pushes worker sets) → policy slots through the one [`SlotLoader`] →
//! health (startup probe, then the checker) → engine-load scrape → file watcher → admin →
//! the forwarding core → PD discovery → metrics listener → client listener.

use crate::admin::{self, Admin};
use crate::breaker::{BreakerConfig, BreakerShared};
use crate::config::Args;
use crate::forward::{Forwarder, RetryBudget, RetryConfig, upstream_client};
use crate::health::{self, HealthConfig};
use crate::metrics::{FleetGauges, Metrics};
use crate::pd::Pd;
use crate::policy::loader::SlotLoader;
use crate::policy::{PolicyEngine, PolicySlots, PolicySource, sync};
use crate::server::{AppState, app};
use crate::watch::PolicyWatcher;
use crate::workers::Registry;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vllm_router_runtime::Limits;
use vllm_router_runtime::feedback::{DEFAULT_CAPACITY, FeedbackQueue};
use vllm_router_sdk::Role;

/// SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutdown signal received: no new connections; finishing in-flight requests");
}

/// Circuit-breaker settings from the flags.
fn breaker(args: &Args) -> BreakerConfig {
    BreakerConfig {
        enabled: !args.disable_circuit_breaker,
        failure_threshold: args.cb_failure_threshold,
        success_threshold: args.cb_success_threshold,
        open_for: Duration::from_secs(args.cb_timeout_duration_secs),
        max_open_for: Duration::from_secs(args.cb_max_timeout_duration_secs),
        window: Duration::from_secs(args.cb_window_duration_secs),
        half_open_max: args.cb_half_open_max_requests,
    }
}

/// Health-check settings from the flags.
fn health_config(args: &Args) -> HealthConfig {
    HealthConfig {
        interval: Duration::from_secs(args.health_check_interval_secs.max(1)),
        timeout: Duration::from_secs(args.health_check_timeout_secs.max(1)),
        failure_threshold: args.health_failure_threshold,
        success_threshold: args.health_success_threshold,
        endpoint: args.health_check_endpoint.clone(),
    }
}

/// Wait for the first healthy worker (`--worker-startup-timeout-secs`).
async fn startup_wait(
    args: &Args,
    registry: &Registry,
    hcfg: &HealthConfig,
    urls: &[String],
) -> anyhow::Result<()> {
    // One parallel probe round: workers that do not answer start unhealthy and the
    // health checker brings them in when they do. Serving starts at once either way.
    let mut healthy = health::startup_probe(registry, hcfg).await;
    if healthy > 0 || args.worker_startup_timeout_secs == 0 || urls.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        "no worker answers {} yet; waiting up to {}s (--worker-startup-timeout-secs)",
        hcfg.endpoint,
        args.worker_startup_timeout_secs
    );
    let deadline = Instant::now() + Duration::from_secs(args.worker_startup_timeout_secs);
    while healthy == 0 {
        if Instant::now() >= deadline {
            anyhow::bail!(
                "no worker became healthy within {}s (--worker-startup-timeout-secs); checked {}",
                args.worker_startup_timeout_secs,
                urls.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_secs(args.worker_startup_check_interval)).await;
        healthy = health::startup_probe(registry, hcfg).await;
    }
    Ok(())
}

/// A built router, not yet listening: its client-facing routes (admin included) and the
/// parts a caller may want to look at. [`run`] serves it; tests serve it in-process.
pub struct App {
    /// Client listener settings (connection cap, timeouts, TLS).
    pub listener: crate::listener::ListenerConfig,
    /// File watches (TLS certificate, client keys) that live as long as the router.
    pub watches: Vec<crate::watch::FileWatch>,
    /// The client-facing routes (OpenAI API, health, fleet metrics, admin).
    pub router: axum::Router,
    /// What the client listener serves: `router`, with the generation routes taken
    /// straight to the forwarding core ([`crate::server::ClientService`]).
    pub service: crate::server::ClientService,
    /// The router's own metrics (served on `--prometheus-port` by [`run`]).
    pub metrics: Arc<Metrics>,
    /// The worker registry.
    pub registry: Arc<Registry>,
    /// The policy slots.
    pub slots: Arc<PolicySlots>,
    /// The flags it was built from.
    pub args: Arc<Args>,
    /// When building started.
    pub started: Instant,
}

impl App {
    /// Build every part from `args`: load policies, probe workers once (waiting per
    /// `--worker-startup-timeout-secs`), start the health checker, engine scrape, file
    /// watcher and feedback thread. Must run inside a Tokio runtime. Nothing listens yet.
    pub async fn build(args: Args) -> anyhow::Result<App> {
        let t0 = Instant::now();
        // Before any probe: the workers' key goes on the router's own calls too.
        if let Some(key) = &args.api_key {
            crate::health::set_worker_api_key(key).map_err(|e| anyhow::anyhow!(e))?;
        }
        // Before any worker client is built: TLS to https:// workers.
        crate::tls::set_worker_tls(&crate::tls::WorkerTls {
            ca_file: args.worker_ca_file.clone(),
            client_cert: args.worker_client_cert_file.clone(),
            client_key: args.worker_client_key_file.clone(),
        })
        .map_err(|e| anyhow::anyhow!("worker TLS: {e}"))?;
        let mut limits = Limits::new(args.policy_timeout_ms, args.policy_max_memory_mb);
        limits.max_instances = args.policy_max_instances as usize;
        let engine = PolicyEngine::with_options(limits, args.policy_optimize)?;
        if let Some(dir) = policy_cache_dir(args.policy_cache_dir.as_deref(), args.no_policy_cache)
        {
            match engine.set_disk_cache(&dir) {
                Ok(()) => tracing::debug!("compiled policies cached in {}", dir.display()),
                Err(e) => tracing::warn!("not caching compiled policies: {e:#}"),
            }
        }
        engine.set_quarantine(
            args.policy_quarantine_faults,
            Duration::from_secs(args.policy_quarantine_window_secs),
        );
        let cb = Arc::new(BreakerShared {
            cfg: breaker(&args),
            on_transition: Default::default(),
        });
        let registry = Arc::new(Registry::with_breaker(cb.clone()));
        let dp = args.intra_node_data_parallel_size;
        let static_workers: Vec<(String, Role)> = if args.vllm_pd_disaggregation {
            let p = args.prefill.iter().map(|u| (u.clone(), Role::Prefill));
            p.chain(args.decode.iter().map(|u| (u.clone(), Role::Decode)))
                .collect()
        } else {
            args.worker_urls
                .iter()
                .map(|u| (u.clone(), Role::Regular))
                .collect()
        };
        for (url, role) in &static_workers {
            registry.add(url, *role, dp).map_err(anyhow::Error::msg)?;
        }
        let metrics = Arc::new(Metrics::new());
        let mut watches = Vec::new();
        let tls = match (&args.tls_cert_file, &args.tls_key_file) {
            (Some(c), Some(k)) => {
                let cert = crate::tls::ReloadingCert::load(c, k)
                    .map_err(|e| anyhow::anyhow!("--tls-cert-file/--tls-key-file: {e}"))?;
                let reload = cert.clone();
                watches.push(reload_on_change(
                    "TLS certificate",
                    &cert.files(),
                    metrics.tls_reloads.clone(),
                    "the previous certificate keeps serving",
                    move || {
                        reload.reload()?;
                        Ok("TLS certificate reloaded; new connections use it".into())
                    },
                )?);
                Some(cert)
            }
            _ => None,
        };
        let client_keys = match &args.client_api_keys_file {
            Some(path) => {
                let keys = crate::clients::ClientKeys::load(path)
                    .map_err(|e| anyhow::anyhow!("--client-api-keys-file: {e}"))?;
                let reload = keys.clone();
                watches.push(reload_on_change(
                    "client API keys",
                    &[path.clone()],
                    metrics.client_keys_reloads.clone(),
                    "the previous keys stay",
                    move || {
                        Ok(format!(
                            "client API keys reloaded: {} keys",
                            reload.reload()?
                        ))
                    },
                )?);
                Some(keys)
            }
            None => None,
        };
        {
            let m = metrics.clone();
            let _ = cb
                .on_transition
                .set(Box::new(move |worker: &str, (from, to)| {
                    m.cb_transitions
                        .with_label_values(&[worker, from.as_str(), to.as_str()])
                        .inc();
                }));
        }

        // Policies: one loader for startup, the watcher and the admin API.
        let loader = Arc::new(SlotLoader {
            engine: engine.clone(),
            registry: registry.clone(),
            metrics: metrics.clone(),
        });
        let (defs, sticky) = args.slot_defs().map_err(anyhow::Error::msg)?;
        let canonical = |mut spec: crate::policy::SlotSpec| {
            if let PolicySource::File(p) = &spec.source {
                spec.source = PolicySource::File(crate::watch::canonical_file(p));
            }
            spec
        };
        let mut arms = Vec::new();
        for d in defs {
            arms.push(loader.new_slot(
                &d.name,
                Role::Regular,
                canonical(d.spec),
                d.weight,
                d.shadow,
                None,
            )?);
        }
        let pd = if args.vllm_pd_disaggregation {
            let (pspec, dspec) = args.pd_specs();
            Some(Arc::new(Pd {
                prefill: loader.new_slot(
                    "prefill",
                    Role::Prefill,
                    canonical(pspec),
                    100,
                    false,
                    None,
                )?,
                decode: loader.new_slot(
                    "decode",
                    Role::Decode,
                    canonical(dspec),
                    100,
                    false,
                    None,
                )?,
                zmq_addresses: Default::default(),
            }))
        } else {
            None
        };
        let fixed = pd
            .iter()
            .flat_map(|p| [p.prefill.clone(), p.decode.clone()])
            .collect();
        let slots = Arc::new(PolicySlots::with_fixed(arms, fixed, sticky));
        // The feedback thread delivers on-complete and pushes worker sets to policies.
        let feedback = {
            let (m, r, s) = (metrics.clone(), registry.clone(), slots.clone());
            FeedbackQueue::start(
                DEFAULT_CAPACITY,
                move |v, fault| {
                    m.policy_failures
                        .with_label_values(&["feedback", &v.label, fault.kind()])
                        .inc();
                    tracing::warn!(policy = %v.label, "policy on-complete failed: {fault}");
                },
                move || sync::push_workers(&r, &s),
            )?
        };
        {
            let (f, m) = (feedback.clone(), metrics.clone());
            registry.on_publish(Box::new(move |set| {
                f.request_sync();
                m.retain_workers(set);
            }));
        }
        tracing::info!("policies ready in {:?}", t0.elapsed());

        let hcfg = health_config(&args);
        let urls: Vec<String> = static_workers.iter().map(|(u, _)| u.clone()).collect();
        startup_wait(&args, &registry, &hcfg, &urls).await?;
        tokio::spawn(health::run(registry.clone(), hcfg.clone(), metrics.clone()));
        if args.engine_metrics_interval_ms > 0 {
            tokio::spawn(crate::engine::run(
                registry.clone(),
                Duration::from_millis(args.engine_metrics_interval_ms),
            ));
        }

        let watcher = if args.no_watch {
            None
        } else {
            let w = PolicyWatcher::start(
                Duration::from_millis(args.watch_debounce_ms.max(1)),
                slots.clone(),
                loader.clone(),
            )?;
            for s in slots.every_slot() {
                if let Some(f) = s.file() {
                    w.watch(&f)?;
                }
            }
            Some(w)
        };
        let args = Arc::new(args);
        let admin = Arc::new(Admin {
            key: args.admin_api_key.clone(),
            slots: slots.clone(),
            loader,
            watcher,
            builtin_config: {
                let a = args.clone();
                Box::new(move |name, base| a.builtin_config_with(name, base))
            },
            health: hcfg,
        });
        if admin.key.is_some() {
            tracing::info!("admin API enabled (bearer token required)");
        }
        let kv = crate::kv::KvEvents::start(
            crate::kv::KvConfig {
                sources: args.kv_event_source.clone(),
                replay: args.kv_event_replay_source.clone(),
                block_size: args.kv_event_block_size,
                max_blocks_per_worker: args.kv_index_max_blocks,
                discover: args.kv_event_discovery,
                tokenize_timeout: Duration::from_millis(args.kv_tokenize_timeout_ms.max(1)),
            },
            registry.clone(),
            metrics.clone(),
        );
        if slots
            .every_slot()
            .iter()
            .any(|s| s.current().reads_prefix_cache())
        {
            kv.want();
        }
        let fwd = Arc::new(Forwarder {
            kv: Some(kv),
            registry: registry.clone(),
            slots,
            metrics: metrics.clone(),
            client: upstream_client(),
            retry: RetryConfig {
                attempts: args.attempts(),
                initial_backoff_ms: args.retry_initial_backoff_ms,
                max_backoff_ms: args.retry_max_backoff_ms,
                multiplier: args.retry_backoff_multiplier,
                jitter: args.retry_jitter_factor,
            },
            budget: RetryBudget::new(args.retry_budget_ratio, args.retry_budget_min_per_sec),
            request_timeout: Duration::from_secs(args.request_timeout_secs),
            feedback,
            default_role: if args.vllm_pd_disaggregation {
                Role::Decode
            } else {
                Role::Regular
            },
            trace: match &args.record_trace {
                Some(p) => {
                    tracing::info!("recording a policy trace to {}", p.display());
                    Some(Arc::new(crate::trace::TraceRecorder::start(
                        p.clone(),
                        args.record_trace_max_mb.max(1) << 20,
                        args.record_trace_text,
                    )?))
                }
                None => None,
            },
        });
        if let (Some(addr), Some(pd)) = (&args.vllm_discovery_address, &pd) {
            crate::discovery::start(addr, registry.clone(), pd.clone(), dp).await?;
        }
        let discovery_synced = if args.service_discovery {
            let synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let sel = |s: &[String]| crate::k8s::parse_selector(s).map_err(|e| anyhow::anyhow!(e));
            let cfg = crate::k8s::DiscoveryConfig {
                selector: sel(&args.selector)?,
                pd: if args.vllm_pd_disaggregation {
                    Some((sel(&args.prefill_selector)?, sel(&args.decode_selector)?))
                } else {
                    None
                },
                namespace: args.service_discovery_namespace.clone(),
                port: args.service_discovery_port,
                drain_settle: Duration::from_secs(args.drain_settle_secs),
                resync: Duration::from_secs(args.service_discovery_resync_secs.max(1)),
                dp_size: args.intra_node_data_parallel_size.max(1),
            };
            crate::k8s::start(cfg, registry.clone(), metrics.clone(), synced.clone()).await?;
            Some(synced)
        } else {
            None
        };
        let state = Arc::new(AppState {
            client_keys,
            rate_limit: args
                .rate_limit_tokens_per_second
                .map(|r| crate::clients::TokenBucket::new(r, args.rate_limit_burst.unwrap_or(r))),
            cors_allowed_origins: args.cors_allowed_origins.clone(),
            discovery_synced,
            fwd,
            pd,
            request_id_headers: args
                .request_id_headers
                .iter()
                .map(|h| http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()))
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("--request-id-headers: {e}"))?,
            max_payload: args.max_payload_size,
            admission: crate::server::Admission::new(
                args.max_concurrent_requests,
                args.queue_size,
                Duration::from_secs(args.queue_timeout_secs),
            ),
            probe: health::probe_client(Duration::from_secs(args.health_check_timeout_secs.max(1))),
        });
        {
            let st = state.clone();
            metrics.register_fleet(FleetGauges::new(
                registry.clone(),
                Box::new(move || {
                    (
                        st.admission.in_flight() as i64,
                        st.admission.waiting() as i64,
                    )
                }),
            ));
        }
        let slots = state.fwd.slots.clone();
        let router = app(state.clone()).merge(admin::routes(admin));
        Ok(App {
            listener: crate::listener::ListenerConfig {
                max_connections: args.max_client_connections,
                header_timeout: Duration::from_secs(args.client_header_timeout_secs),
                idle_timeout: Duration::from_secs(args.client_idle_timeout_secs),
                tls,
            },
            watches,
            service: crate::server::ClientService::new(router.clone(), state),
            router,
            metrics,
            registry,
            slots,
            args,
            started: t0,
        })
    }
}

/// Run the router until SIGINT/SIGTERM (then drain for `--shutdown-grace-period-secs`).
/// Logs `vllm-router listening on http://ADDR` with the bound address (so `--port 0`
/// works: tests read the port from that line).
pub async fn run(args: Args) -> anyhow::Result<()> {
    run_until(args, shutdown_signal(), Box::new(|| {})).await
}

/// Like [`run`], stopping when `shutdown` completes (instead of on a signal).
/// `before_forced_exit` runs when the grace period ends with requests still in flight,
/// just before the process exits (`vllm-router serve` stops its engines there).
pub async fn run_until(
    args: Args,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    before_forced_exit: Box<dyn FnOnce() + Send>,
) -> anyhow::Result<()> {
    let App {
        service,
        metrics,
        registry,
        args,
        started: t0,
        listener: listener_cfg,
        watches: _watches,
        ..
    } = App::build(args).await?;
    if args.prometheus_port != 0 {
        let addr = format!("{}:{}", args.prometheus_host, args.prometheus_port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot bind metrics listener {addr}: {e}"))?;
        let m = metrics.clone();
        let metrics_app = axum::Router::new().fallback(move || {
            let m = m.clone();
            async move {
                (
                    [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    m.render(),
                )
            }
        });
        let bound = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, metrics_app).await });
        tracing::info!("metrics on http://{bound}/metrics");
    }

    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let set = registry.snapshot();
    let scheme = if listener_cfg.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(
        "vllm-router listening on {scheme}://{bound} with {} workers ({} healthy), ready in {:?}",
        set.workers.len(),
        set.workers.iter().filter(|w| w.is_healthy()).count(),
        t0.elapsed()
    );
    let grace = Duration::from_secs(args.shutdown_grace_period_secs);
    crate::listener::serve(listener, service, listener_cfg, metrics, async move {
        shutdown.await;
        // In-flight requests and streams get the grace period, then we exit anyway.
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            tracing::warn!("grace period ({grace:?}) over with requests still in flight; exiting");
            before_forced_exit();
            std::process::exit(0);
        });
    })
    .await;
    tracing::info!("stopped");
    Ok(())
}

/// Watch `files` and run `reload` 200 ms after they stop changing: its message is
/// logged at info and counted `result="ok"` in `counter`; an error is logged with
/// `kept` (what stays in force) and counted `result="error"`.
fn reload_on_change(
    what: &'static str,
    files: &[std::path::PathBuf],
    counter: prometheus::IntCounterVec,
    kept: &'static str,
    reload: impl Fn() -> Result<String, String> + Send + 'static,
) -> anyhow::Result<crate::watch::FileWatch> {
    crate::watch::watch_files(
        what,
        files,
        Duration::from_millis(200),
        move || match reload() {
            Ok(msg) => {
                counter.with_label_values(&["ok"]).inc();
                tracing::info!("{msg}");
            }
            Err(e) => {
                counter.with_label_values(&["error"]).inc();
                tracing::error!("{what} not reloaded ({kept}): {e}");
            }
        },
    )
}

/// Where compiled policies are kept: `dir` (`--policy-cache-dir`), else the user's
/// cache directory; `None` when `off` (`--no-policy-cache`) or no home is known.
pub(crate) fn policy_cache_dir(
    dir: Option<&std::path::Path>,
    off: bool,
) -> Option<std::path::PathBuf> {
    if off {
        return None;
    }
    if let Some(d) = dir {
        return Some(d.to_path_buf());
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))?;
    Some(base.join("vllm-router/compiled-policies"))
}
