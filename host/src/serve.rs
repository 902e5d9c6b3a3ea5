//! `vllm-router serve MODEL [arguments…]`: one command that serves a model with the
//! router as the API server (vLLM's "router as API server" mode, done from the router's
//! side). It starts `--engines N` engines (`vllm serve MODEL --host 127.0.0.1 --port P
//! …` on internal ports), waits for their `/health`, then serves the public
//! `--host`/`--port` with the chosen policy over them.
//!
//! Arguments: the serve flags below and every router flag (`--port`, `--policy`,
//! `--policy-wasm`, …) are the router's; **everything else goes to each engine
//! untouched**, in order (`--tensor-parallel-size 2`, `--max-model-len 8192`, …), as does
//! everything after `--`.
//!
//! Lifecycle: SIGTERM/SIGINT stop the router gracefully (in-flight streams finish), then
//! the engines (SIGTERM to each engine, SIGKILL after 30 s). An engine that
//! exits while serving is reported and the whole command **exits non-zero** after the same
//! orderly stop: a supervisor (systemd, Kubernetes) restarts it — the router does not
//! restart engines itself (a crashed engine usually needs a person or a fresh pod).

use crate::config::Args;
use clap::CommandFactory;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `serve` command's own settings.
#[derive(Debug, Clone)]
pub struct ServePlan {
    /// The model to serve (passed to each engine first).
    pub model: String,
    /// Engines to start (`--engines`, default 1).
    pub engines: u32,
    /// The engine command (`--engine-cmd`, default `vllm serve`), run through `sh -c`.
    pub engine_cmd: String,
    /// First engine port (`--engine-base-port`; 0 = free ports).
    pub engine_base_port: u16,
    /// Longest wait for every engine's `/health`, s (`--engine-startup-timeout-secs`).
    pub startup_timeout: Duration,
    /// Arguments passed to every engine, untouched.
    pub engine_args: Vec<String>,
    /// The router's flags (worker URLs are filled in once the engines are up).
    pub router: Args,
}

const SERVE_HELP: &str = "\
Usage: vllm-router serve MODEL [OPTIONS] [-- ENGINE ARGS...]

Start engines for MODEL and serve them through the router (one command).

Options of `serve` (everything that is neither these nor a vllm-router flag goes to the
engines untouched; see `vllm-router --help` for the router's flags):
  --engines N                       engines to start [default: 1]
  --engine-cmd CMD                  engine command, run with `sh -c` [default: vllm serve]
                                    it gets: MODEL --host 127.0.0.1 --port PORT ENGINE ARGS...
  --engine-base-port PORT           first engine port (then +1 each) [default: free ports]
  --engine-startup-timeout-secs S   wait this long for every engine's /health [default: 1800]

Stops: SIGTERM/SIGINT stop the router gracefully, then the engines. An engine that exits
while serving stops the whole command with a non-zero status (let a supervisor restart it).
";

/// Whether `argv` asks for `serve` (`vllm-router serve …`).
pub fn is_serve(argv: &[String]) -> bool {
    argv.get(1).map(String::as_str) == Some("serve")
}

/// Split `vllm-router serve …` into serve settings, router flags and engine arguments.
/// Errors say which argument is wrong; `Ok(None)` means help was printed.
pub fn parse(argv: &[String]) -> Result<Option<ServePlan>, String> {
    let prog = argv
        .first()
        .cloned()
        .unwrap_or_else(|| "vllm-router".into());
    let rest = &argv[2.min(argv.len())..];
    let cmd = Args::command();
    // Router flags by long name, and whether each takes values (and how many).
    let router_flag = |name: &str| {
        cmd.get_arguments()
            .find(|a| a.get_long() == Some(name))
            .map(|a| {
                let takes = a.get_action().takes_values();
                let many = a.get_num_args().is_some_and(|n| n.max_values() > 1);
                (takes, many)
            })
    };
    let mut model = None;
    let mut engines = 1u32;
    let mut engine_cmd = "vllm serve".to_string();
    let mut base_port = 0u16;
    let mut startup = 1800u64;
    let mut router: Vec<String> = vec![prog];
    let mut engine_args = Vec::new();
    let mut i = 0;
    let value = |i: usize, flag: &str| -> Result<String, String> {
        rest.get(i + 1)
            .cloned()
            .ok_or_else(|| format!("{flag} needs a value"))
    };
    while i < rest.len() {
        let a = &rest[i];
        if a == "--" {
            engine_args.extend(rest[i + 1..].iter().cloned());
            break;
        }
        if a == "-h" || a == "--help" {
            print!("{SERVE_HELP}");
            return Ok(None);
        }
        let (name, inline) = match a.strip_prefix("--") {
            Some(n) => match n.split_once('=') {
                Some((n, v)) => (Some(n), Some(v.to_string())),
                None => (Some(n), None),
            },
            None => (None, None),
        };
        let take = |i: &mut usize, flag: &str| -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => {
                    let v = value(*i, flag)?;
                    *i += 1;
                    Ok(v)
                }
            }
        };
        match name {
            None if model.is_none() => model = Some(a.clone()),
            Some("engines") => {
                engines = take(&mut i, a)?
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or("--engines takes a number >= 1")?
            }
            Some("engine-cmd") => engine_cmd = take(&mut i, a)?,
            Some("engine-base-port") => {
                base_port = take(&mut i, a)?
                    .parse()
                    .map_err(|_| "--engine-base-port takes a port number")?
            }
            Some("engine-startup-timeout-secs") => {
                startup = take(&mut i, a)?
                    .parse()
                    .map_err(|_| "--engine-startup-timeout-secs takes seconds")?
            }
            Some(n) if n != "worker-urls" && router_flag(n).is_some() => {
                let (takes, many) = router_flag(n).unwrap_or((false, false));
                router.push(a.clone());
                if takes && inline.is_none() {
                    // One value, or (list flags) every value up to the next flag.
                    loop {
                        match rest.get(i + 1) {
                            Some(v) if !v.starts_with("--") => {
                                router.push(v.clone());
                                i += 1;
                                if !many {
                                    break;
                                }
                            }
                            _ => break,
                        }
                    }
                }
            }
            // Anything else is the engine's, with its values, untouched.
            _ => engine_args.push(a.clone()),
        }
        i += 1;
    }
    let model = model.ok_or("serve needs a MODEL (vllm-router serve MODEL [...])")?;
    // Workers come from the engines; a placeholder satisfies validation until then.
    router.extend(["--worker-urls".into(), "http://127.0.0.1:1".into()]);
    let args = <Args as clap::Parser>::try_parse_from(&router).map_err(|e| e.to_string())?;
    args.validate()?;
    Ok(Some(ServePlan {
        model,
        engines,
        engine_cmd,
        engine_base_port: base_port,
        startup_timeout: Duration::from_secs(startup),
        engine_args,
        router: args,
    }))
}

/// A started engine.
struct Engine {
    child: Child,
    url: String,
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn_engine(plan: &ServePlan, i: u32) -> anyhow::Result<Engine> {
    use std::os::unix::process::CommandExt;
    let port = if plan.engine_base_port == 0 {
        free_port()?
    } else {
        plan.engine_base_port
            .checked_add(i as u16)
            .ok_or_else(|| anyhow::anyhow!("engine port overflow"))?
    };
    // `"$@"` passes the model, the port and the engine arguments untouched (no shell
    // re-splitting); the command itself may be several words (`vllm serve`).
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("exec {} \"$@\"", plan.engine_cmd))
        .arg("sh")
        .arg(&plan.model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(&plan.engine_args)
        .stdin(Stdio::null())
        // Its own process group: a Ctrl-C in the terminal reaches the router, which then
        // stops the engines in order, instead of killing everything at once.
        .process_group(0)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start engine {i} ({}): {e}", plan.engine_cmd))?;
    tracing::info!(
        engine = i,
        pid = child.id(),
        port,
        "engine started: {} {} ...",
        plan.engine_cmd,
        plan.model
    );
    Ok(Engine {
        child,
        url: format!("http://127.0.0.1:{port}"),
    })
}

/// Send SIGTERM to a process by pid (`kill -s TERM -- PID`; never a process group or a
/// negative number: procps-ng 4.0.2's `kill` misreads those).
fn sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-s", "TERM", "--", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// SIGTERM each engine (it was `exec`ed, so the pid is the engine; vLLM stops its own
/// engine-core processes on SIGTERM), wait up to `grace`, then SIGKILL.
fn stop_engines(engines: &mut [Engine], grace: Duration) {
    for e in engines.iter_mut() {
        if matches!(e.child.try_wait(), Ok(None)) {
            sigterm(e.child.id());
        }
    }
    let end = Instant::now() + grace;
    for e in engines.iter_mut() {
        while Instant::now() < end {
            if let Ok(Some(_)) = e.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(e.child.try_wait(), Ok(None)) {
            let _ = e.child.kill();
            let _ = e.child.wait();
        }
    }
    tracing::info!("engines stopped");
}

/// Run `serve` to the end. Returns an error (non-zero exit) when an engine failed to
/// start or died while serving.
pub async fn run(plan: ServePlan) -> anyhow::Result<()> {
    // The router's worker TLS options before the first worker client (the engine probes):
    // the configuration is process-wide and set once.
    crate::tls::set_worker_tls(&crate::tls::WorkerTls {
        ca_file: plan.router.worker_ca_file.clone(),
        client_cert: plan.router.worker_client_cert_file.clone(),
        client_key: plan.router.worker_client_key_file.clone(),
    })
    .map_err(|e| anyhow::anyhow!("worker TLS: {e}"))?;
    let mut engines = Vec::new();
    for i in 0..plan.engines {
        match spawn_engine(&plan, i) {
            Ok(e) => engines.push(e),
            Err(e) => {
                stop_engines(&mut engines, Duration::from_secs(30));
                return Err(e);
            }
        }
    }
    // Wait for every engine's /health (an engine that exits meanwhile is an error).
    let client = crate::health::probe_client(Duration::from_secs(2));
    let deadline = Instant::now() + plan.startup_timeout;
    for (i, e) in engines.iter_mut().enumerate() {
        loop {
            if crate::health::probe_url(
                &client,
                &format!("{}/health", e.url),
                Duration::from_secs(2),
            )
            .await
            {
                tracing::info!(engine = i, url = %e.url, "engine healthy");
                break;
            }
            if let Ok(Some(status)) = e.child.try_wait() {
                let err = anyhow::anyhow!("engine {i} exited during startup ({status})");
                stop_engines(&mut engines, Duration::from_secs(30));
                return Err(err);
            }
            if Instant::now() >= deadline {
                let err = anyhow::anyhow!(
                    "engine {i} did not answer {}/health within {:?} (--engine-startup-timeout-secs)",
                    e.url,
                    plan.startup_timeout
                );
                stop_engines(&mut engines, Duration::from_secs(30));
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let mut args = plan.router.clone();
    args.worker_urls = engines.iter().map(|e| e.url.clone()).collect();
    // Watch the engines: one that exits stops the router (orderly) and the command fails.
    let engines = std::sync::Arc::new(parking_lot::Mutex::new(engines));
    let died = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = {
        let (engines, died) = (engines.clone(), died.clone());
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let mut list = engines.lock();
                for (i, e) in list.iter_mut().enumerate() {
                    if let Ok(Some(status)) = e.child.try_wait() {
                        tracing::error!(engine = i, url = %e.url, "engine exited while serving ({status}); stopping the router and the other engines");
                        died.store(true, std::sync::atomic::Ordering::SeqCst);
                        return;
                    }
                }
            }
        }
    };
    let shutdown = async move {
        tokio::select! {
            _ = crate::app::shutdown_signal() => {}
            _ = watch => {}
        }
    };
    let forced = {
        let engines = engines.clone();
        Box::new(move || {
            // The grace period ran out: the process exits right after this.
            for e in engines.lock().iter_mut() {
                let _ = e.child.kill();
            }
        }) as Box<dyn FnOnce() + Send>
    };
    let served = crate::app::run_until(args, shutdown, forced).await;
    let mut list = engines.lock();
    stop_engines(&mut list, Duration::from_secs(30));
    served?;
    if died.load(std::sync::atomic::Ordering::SeqCst) {
        anyhow::bail!("an engine exited while serving (see the log)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn router_flags_serve_flags_and_engine_arguments_are_told_apart() {
        let p = parse(&argv(
            "vllm-router serve meta/Llama --engines 2 --tensor-parallel-size 2 --port 8000 --policy cache_aware --max-model-len 8192 --enforce-eager --engine-cmd=vllm-sim -- --port 1",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(p.model, "meta/Llama");
        assert_eq!(p.engines, 2);
        assert_eq!(p.engine_cmd, "vllm-sim");
        assert_eq!(p.router.port, 8000);
        assert_eq!(p.router.policy, "cache_aware");
        assert_eq!(
            p.engine_args,
            argv("--tensor-parallel-size 2 --max-model-len 8192 --enforce-eager --port 1")
        );
    }

    #[test]
    fn bad_serve_arguments_say_what_is_wrong() {
        assert!(
            parse(&argv("vllm-router serve"))
                .unwrap_err()
                .contains("MODEL")
        );
        assert!(
            parse(&argv("vllm-router serve m --engines 0"))
                .unwrap_err()
                .contains("--engines")
        );
        assert!(parse(&argv("vllm-router serve m --port notaport")).is_err());
        assert!(is_serve(&argv("vllm-router serve m")));
        assert!(!is_serve(&argv("vllm-router --worker-urls http://a:1")));
    }
}
