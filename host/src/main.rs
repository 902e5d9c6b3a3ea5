//! `vllm-router` binary: parse flags, load the policy, start health checks, metrics and
//! the HTTP server; shut down gracefully on SIGINT/SIGTERM.

use axum::serve::ListenerExt;
use clap::Parser;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vllm_router::admin::{self, Admin};
use vllm_router::breaker::{BreakerConfig, BreakerShared};
use vllm_router::config::Args;
use vllm_router::health::{self, HealthConfig};
use vllm_router::metrics::Metrics;
use vllm_router::pd::Pd;
use vllm_router::policy::slots::build_version;
use vllm_router::policy::{PolicyEngine, PolicySlot, PolicySlots, PolicySource, SlotSpec, builtin};
use vllm_router::proxy::{Proxy, RetryConfig, upstream_client};
use vllm_router::server::{AppState, app};
use vllm_router::watch::PolicyWatcher;
use vllm_router::workers::Registry;
use vllm_router_sdk::Role;

/// mimalloc instead of glibc malloc: under load glibc's malloc/free/consolidate were
/// ~8 % of the router's CPU (perf), with per-request allocations freed on other threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc reads its options from the environment once, before `main`. Eager arena
/// commit (its default) left ~45 MiB resident after startup; off, RSS stays ~25 MiB
/// with the same throughput. So the router re-executes itself once with the option set
/// (same PID; `exec` returns only on failure, and then we simply run as we are).
fn tune_allocator() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_some() {
        return;
    }
    if let Ok(exe) = std::env::current_exe() {
        let err = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("MIMALLOC_ARENA_EAGER_COMMIT", "0")
            .exec();
        eprintln!("note: running without MIMALLOC_ARENA_EAGER_COMMIT=0 (re-exec failed: {err})");
    }
}

fn export_policy(spec: &str) -> anyhow::Result<()> {
    let (name, path) = spec.split_once('=').ok_or_else(|| {
        anyhow::anyhow!("--export-policy takes NAME=PATH, e.g. round_robin=./round_robin.wasm")
    })?;
    let b = builtin::find(name).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown policy '{name}'; built-in policies: {}",
            builtin::names()
        )
    })?;
    std::fs::write(path, b.wasm)?;
    println!("wrote {} ({} bytes) to {path}", b.name, b.wasm.len());
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutdown signal received: no new connections; finishing in-flight requests");
}

fn main() -> anyhow::Result<()> {
    tune_allocator();
    vllm_router::util::mark_start();
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .map_err(|e| anyhow::anyhow!("--log-level '{}': {e}", args.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Some(spec) = &args.export_policy {
        return export_policy(spec);
    }
    if let Err(e) = args.validate() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args));
    if let Err(e) = result {
        // One readable line (with causes) rather than a debug dump with a backtrace.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let engine = PolicyEngine::with_options(
        args.policy_timeout_ms,
        args.policy_max_memory_mb,
        args.policy_optimize,
    )?;
    let cb = Arc::new(BreakerShared {
        cfg: BreakerConfig {
            enabled: !args.disable_circuit_breaker,
            failure_threshold: args.cb_failure_threshold,
            success_threshold: args.cb_success_threshold,
            open_for: Duration::from_secs(args.cb_timeout_duration_secs),
            window: Duration::from_secs(args.cb_window_duration_secs),
            half_open_max: args.cb_half_open_max_requests,
        },
        on_transition: Default::default(),
    });
    let registry = Arc::new(Registry::with_breaker(cb.clone()));
    let dp = args.intra_node_data_parallel_size;
    let static_workers: Vec<(&String, Role)> = if args.vllm_pd_disaggregation {
        let p = args.prefill.iter().map(|u| (u, Role::Prefill));
        p.chain(args.decode.iter().map(|u| (u, Role::Decode)))
            .collect()
    } else {
        args.worker_urls
            .iter()
            .map(|u| (u, Role::Regular))
            .collect()
    };
    for (url, role) in &static_workers {
        registry.add(url, *role, dp).map_err(anyhow::Error::msg)?;
    }
    let metrics = Arc::new(Metrics::new());
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
    engine.set_quarantine(
        args.policy_quarantine_faults,
        Duration::from_secs(args.policy_quarantine_window_secs),
    );
    let (defs, sticky) = args.slot_defs().map_err(anyhow::Error::msg)?;
    let load_slot = |name: &str, role: Role, mut spec: SlotSpec, weight: u32, shadow: bool| {
        if let PolicySource::File(p) = &spec.source {
            spec.source = PolicySource::File(vllm_router::watch::canonical_file(p));
        }
        let v = build_version(&engine, &spec, None, role, &registry.snapshot())
            .map_err(|e| anyhow::anyhow!("policy slot '{name}' ({}): {e:#}", spec.source))?;
        tracing::info!(slot = %name, policy = %v.label, source = %v.source, weight, shadow, "policy loaded");
        metrics.set_policy_info(name, None, &v);
        if !shadow {
            metrics
                .slot_weight
                .with_label_values(&[name])
                .set(weight as i64);
        }
        anyhow::Ok(Arc::new(PolicySlot::new(
            name, role, spec, v, weight, shadow,
        )))
    };
    let mut slot_list = Vec::new();
    for d in defs {
        slot_list.push(load_slot(
            &d.name,
            Role::Regular,
            d.spec,
            d.weight,
            d.shadow,
        )?);
    }
    let slots = Arc::new(PolicySlots::new(slot_list, sticky));
    let pd = if args.vllm_pd_disaggregation {
        let (pspec, dspec) = args.pd_specs();
        Some(Arc::new(Pd {
            prefill: load_slot("prefill", Role::Prefill, pspec, 100, false)?,
            decode: load_slot("decode", Role::Decode, dspec, 100, false)?,
            zmq_addresses: Default::default(),
        }))
    } else {
        None
    };
    tracing::info!("policies ready in {:?}", t0.elapsed());
    let hcfg = HealthConfig {
        interval: Duration::from_secs(args.health_check_interval_secs.max(1)),
        timeout: Duration::from_secs(args.health_check_timeout_secs.max(1)),
        failure_threshold: args.health_failure_threshold,
        success_threshold: args.health_success_threshold,
        endpoint: args.health_check_endpoint.clone(),
    };
    // One parallel probe round: workers that do not answer start unhealthy and the
    // health checker brings them in when they do. Serving starts at once either way.
    let mut healthy = health::startup_probe(&registry, &hcfg).await;
    if healthy == 0 && args.worker_startup_timeout_secs > 0 && !static_workers.is_empty() {
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
                    static_workers
                        .iter()
                        .map(|(u, _)| u.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            tokio::time::sleep(Duration::from_secs(args.worker_startup_check_interval)).await;
            healthy = health::startup_probe(&registry, &hcfg).await;
        }
    }
    tokio::spawn(health::run(registry.clone(), hcfg, metrics.clone()));
    if args.engine_metrics_interval_ms > 0 {
        tokio::spawn(vllm_router::engine::run(
            registry.clone(),
            Duration::from_millis(args.engine_metrics_interval_ms),
        ));
    }

    let watcher = if args.no_watch {
        None
    } else {
        let s2 = slots.clone();
        let pd2 = pd.clone();
        let lookup: vllm_router::watch::SlotLookup = Arc::new(move |path: &std::path::Path| {
            let mut found = s2.loaded_from(path);
            if let Some(pd) = &pd2 {
                for s in [&pd.prefill, &pd.decode] {
                    if s.file().as_deref() == Some(path) {
                        found.push(s.clone());
                    }
                }
            }
            found
        });
        let w = PolicyWatcher::start(
            Duration::from_millis(args.watch_debounce_ms.max(1)),
            lookup,
            engine.clone(),
            registry.clone(),
            metrics.clone(),
        )?;
        let pd_slots = pd
            .iter()
            .flat_map(|pd| [pd.prefill.clone(), pd.decode.clone()]);
        for s in slots.all().iter().cloned().chain(pd_slots) {
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
        engine: engine.clone(),
        registry: registry.clone(),
        metrics: metrics.clone(),
        watcher,
        args: args.clone(),
    });
    if admin.key.is_some() {
        tracing::info!("admin API enabled (bearer token required)");
    }
    let proxy = Arc::new(Proxy {
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
        request_timeout: Duration::from_secs(args.request_timeout_secs),
        failure_threshold: args.health_failure_threshold,
        pd: pd.clone(),
        default_role: if args.vllm_pd_disaggregation {
            Role::Decode
        } else {
            Role::Regular
        },
    });
    if let (Some(addr), Some(pd)) = (&args.vllm_discovery_address, &pd) {
        vllm_router::discovery::start(addr, registry.clone(), pd.clone(), dp).await?;
    }
    let state = Arc::new(AppState {
        proxy,
        request_id_headers: args
            .request_id_headers
            .iter()
            .map(|h| http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("--request-id-headers: {e}"))?,
        max_payload: args.max_payload_size,
        admission: vllm_router::server::Admission::new(
            args.max_concurrent_requests,
            args.queue_size,
            Duration::from_secs(args.queue_timeout_secs),
        ),
    });

    if args.prometheus_port != 0 {
        let addr = format!("{}:{}", args.prometheus_host, args.prometheus_port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot bind metrics listener {addr}: {e}"))?;
        let m = metrics.clone();
        let reg = registry.clone();
        let st = state.clone();
        let metrics_app = axum::Router::new().fallback(move || {
            let m = m.clone();
            let reg = reg.clone();
            let st = st.clone();
            async move {
                m.admission
                    .with_label_values(&["in_flight"])
                    .set(st.admission.in_flight() as i64);
                m.admission
                    .with_label_values(&["queued"])
                    .set(st.admission.waiting() as i64);
                for w in &reg.snapshot().workers {
                    m.cb_state
                        .with_label_values(&[&w.name()])
                        .set(w.breaker_state() as i64);
                    m.worker_in_flight
                        .with_label_values(&[&w.name()])
                        .set(w.in_flight() as i64);
                    m.worker_health
                        .with_label_values(&[&w.name()])
                        .set(w.is_healthy() as i64);
                }
                (
                    [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    m.render(),
                )
            }
        });
        tokio::spawn(async move { axum::serve(listener, metrics_app).await });
        tracing::info!("metrics on http://{addr}/metrics");
    }

    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind {addr}: {e}"))?
        .tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
    tracing::info!(
        "vllm-router listening on http://{addr} with {} workers ({} healthy), ready in {:?}",
        registry.snapshot().workers.len(),
        vllm_router::server::healthy_count(&state, Role::Regular),
        t0.elapsed()
    );
    let grace = Duration::from_secs(args.shutdown_grace_period_secs);
    axum::serve(listener, app(state).merge(admin::routes(admin)))
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            // In-flight requests and streams get the grace period, then we exit anyway.
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                tracing::warn!(
                    "grace period ({grace:?}) over with requests still in flight; exiting"
                );
                std::process::exit(0);
            });
        })
        .await?;
    tracing::info!("stopped");
    Ok(())
}
