//! `vllm-router` binary: parse flags, set up logging, and run the router
//! ([`vllm_router::app::run`], the composition root).

use clap::Parser;
use vllm_router::config::Args;
use vllm_router::policy::builtin;

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

fn init_logging(level: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| anyhow::anyhow!("--log-level '{level}': {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Ok(())
}

fn finish(result: anyhow::Result<()>) -> anyhow::Result<()> {
    if let Err(e) = result {
        // One readable line (with causes) rather than a debug dump with a backtrace.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    tune_allocator();
    vllm_router::util::mark_start();
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("policy") {
        init_logging("warn,vllm_router_runtime=info")?;
        std::process::exit(vllm_router::policy_tool::main(&argv[2..]));
    }
    if argv.get(1).map(String::as_str) == Some("keys") {
        std::process::exit(vllm_router::clients::keys_command(&argv));
    }
    if vllm_router::serve::is_serve(&argv) {
        let plan = match vllm_router::serve::parse(&argv) {
            Ok(Some(plan)) => plan,
            Ok(None) => return Ok(()),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        };
        init_logging(&plan.router.log_level)?;
        return finish(runtime()?.block_on(vllm_router::serve::run(plan)));
    }
    let args = Args::parse();
    init_logging(&args.log_level)?;
    if let Some(spec) = &args.export_policy {
        return export_policy(spec);
    }
    if let Err(e) = args.validate() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    finish(runtime()?.block_on(vllm_router::app::run(args)))
}
