//! Soak: the real router for `SOAK_SECS` (default 600) under mixed streaming and
//! non-streaming traffic while everything around it changes:
//!
//! - every 10 s the policy file is replaced (round_robin, random, cache_aware,
//!   power_of_two, then a garbage file and a truncated component, which must be
//!   refused while the last good policy keeps serving);
//! - every 30 s worker w0 is killed (SIGKILL) and restarted 5 s later on its port;
//! - every 45 s worker w3 is removed through the admin API and added back 15 s later.
//!
//! Every response is checked: a stream must end with `data: [DONE]` (or with the
//! router's error event, which counts as a failed request); one that just stops is a
//! **silent truncation** and must never happen. Every 5 s it samples the router's RSS
//! and open file descriptors (from /proc) and its retry counter. At the end it prints a
//! summary, writes `target/bench/soak.json` and `target/bench/soak.png`, and exits
//! non-zero on any silent truncation, growth of anonymous memory (heap: what a leak
//! grows) of 5 % or more after warm-up (the first 20 % of the run), or file
//! descriptors growing after warm-up. RSS is reported too; it also counts the binary's
//! text pages, which step up once when a code path first runs.
//!
//! Run after `bash tests/run.sh` (it builds the router, the simulator and the policy
//! components): `SOAK_SECS=600 cargo bench -p vllm-router-tests --bench soak`.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vllm_router_tests::*;

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    truncated: AtomicU64,
    streams: AtomicU64,
}

/// A simulator on a fixed port (so it can be restarted there), killed when dropped
/// (also when the soak panics).
struct Sim(std::process::Child);

impl Sim {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.kill();
    }
}

fn sim_on(port: u16, id: &str) -> Sim {
    Sim(Command::new(bin("vllm-sim"))
        .args([
            "--port",
            &port.to_string(),
            "--worker-id",
            id,
            "--record",
            "false",
        ])
        .args(["--token-delay-ms", "4", "--ttft-ms", "5"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vllm-sim"))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// `(anonymous KiB, threads)`: where RSS growth lives (heap vs mapped files) and whether
/// new threads (each with its own allocator heap) came with it.
fn anon_and_threads(pid: u32) -> (u64, u64) {
    let field = |text: &str, key: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    (field(&rollup, "Anonymous:"), field(&status, "Threads:"))
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// One request; classifies the outcome.
async fn one(c: &reqwest::Client, url: &str, i: u64, counts: &Counts) {
    let stream = i % 2 == 0;
    let body = serde_json::json!({
        "model": "sim-model",
        "messages": [{"role": "user", "content": format!("soak conversation {} turn {}", i % 50, i)}],
        "max_tokens": 8,
        "stream": stream,
    });
    let r = match c
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(_) => {
            counts.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let status = r.status();
    let bytes = match r.bytes().await {
        Ok(b) => b,
        Err(_) => {
            // The connection broke mid-body: the router must never do that silently.
            if status.is_success() && stream {
                counts.truncated.fetch_add(1, Ordering::Relaxed);
            } else {
                counts.failed.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
    };
    if !status.is_success() {
        counts.failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let text = String::from_utf8_lossy(&bytes);
    if stream {
        counts.streams.fetch_add(1, Ordering::Relaxed);
        let t = text.trim_end();
        if t.ends_with("data: [DONE]") {
            counts.ok.fetch_add(1, Ordering::Relaxed);
        } else if t.contains("\"error\"") {
            counts.failed.fetch_add(1, Ordering::Relaxed);
        } else {
            counts.truncated.fetch_add(1, Ordering::Relaxed);
            eprintln!("silent truncation: {t:?}");
        }
    } else if serde_json::from_slice::<serde_json::Value>(&bytes).is_ok() {
        counts.ok.fetch_add(1, Ordering::Relaxed);
    } else {
        counts.truncated.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let dir = TempDir::new("soak");
    let policy = dir.join("policy.wasm");
    let good = [
        "policy_round_robin",
        "policy_random",
        "policy_cache_aware",
        "policy_power_of_two",
    ];
    std::fs::copy(policy_wasm("policy_round_robin"), &policy).unwrap();

    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let mut sims: Vec<Sim> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| sim_on(*p, &format!("w{i}")))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let workers: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let admin_key = "soak-admin-key-0123456789";
    let router = start_router(
        &workers,
        &[
            "--policy-wasm",
            policy.to_str().unwrap(),
            "--admin-api-key",
            admin_key,
            "--health-check-interval-secs",
            "1",
            "--watch-debounce-ms",
            "100",
        ],
    );
    let pid = router.pid();
    let url = router.url();
    println!(
        "soak: {secs} s, 4 workers, 8 clients (half streaming); policy swap /10 s, worker kill /30 s, worker-set change /45 s"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let seq = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (stop, counts, seq, url) = (stop.clone(), counts.clone(), seq.clone(), url.clone());
        clients.push(tokio::spawn(async move {
            let c = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                let i = seq.fetch_add(1, Ordering::Relaxed);
                one(&c, &url, i, &counts).await;
            }
        }));
    }

    let admin = reqwest::Client::new();
    let t0 = Instant::now();
    let warmup = Duration::from_secs(secs / 5);
    let (mut xs, mut rss, mut fds, mut rps, mut fails) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut anon, mut threads) = (vec![], vec![]);
    let (mut last_ok, mut last_failed) = (0u64, 0u64);
    let mut swaps = 0u64;
    let mut kills = 0u64;
    let mut set_changes = 0u64;
    let mut tick = 0u64;
    let mut killed_at: Option<Instant> = None;
    let mut removed_at: Option<Instant> = None;
    while t0.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tick += 1;
        if tick % 10 == 0 {
            // Policy swap: four good ones, then a garbage file and a truncated component.
            let k = (tick / 10) as usize % 6;
            let tmp = dir.join("policy.wasm.tmp");
            match k {
                0..=3 => {
                    std::fs::copy(policy_wasm(good[k]), &tmp).unwrap();
                }
                4 => std::fs::write(&tmp, b"this is not a component").unwrap(),
                _ => {
                    let bytes = std::fs::read(policy_wasm("policy_cache_aware")).unwrap();
                    std::fs::write(&tmp, &bytes[..bytes.len() / 2]).unwrap();
                }
            }
            std::fs::rename(&tmp, &policy).unwrap();
            swaps += 1;
        }
        if tick % 30 == 0 {
            sims[0].kill();
            killed_at = Some(Instant::now());
            kills += 1;
        }
        if killed_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(5)) {
            sims[0] = sim_on(ports[0], "w0");
            killed_at = None;
        }
        if tick % 45 == 0 {
            let _ = admin
                .post(format!("{url}/remove_worker?url={}", workers[3]))
                .bearer_auth(admin_key)
                .send()
                .await;
            removed_at = Some(Instant::now());
            set_changes += 1;
        }
        if removed_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(15)) {
            let _ = admin
                .post(format!("{url}/add_worker?url={}", workers[3]))
                .bearer_auth(admin_key)
                .send()
                .await;
            removed_at = None;
            set_changes += 1;
        }
        if tick % 5 == 0 {
            let t = t0.elapsed().as_secs_f64();
            let (ok, failed) = (
                counts.ok.load(Ordering::Relaxed),
                counts.failed.load(Ordering::Relaxed),
            );
            xs.push(t);
            rss.push(rss_kib(pid) as f64 / 1024.0);
            fds.push(open_fds(pid) as f64);
            let (a, th) = anon_and_threads(pid);
            anon.push(a as f64 / 1024.0);
            threads.push(th as f64);
            rps.push((ok - last_ok) as f64 / 5.0);
            fails.push((failed - last_failed) as f64);
            (last_ok, last_failed) = (ok, failed);
            println!(
                "[{:>4.0}s/{secs}s] ok {ok} failed {failed} truncated {} | rss {:.1} MiB (anon {:.1}) fds {} threads {} | {:.0} req/s",
                t,
                counts.truncated.load(Ordering::Relaxed),
                rss.last().unwrap(),
                anon.last().unwrap(),
                fds.last().unwrap(),
                threads.last().unwrap(),
                rps.last().unwrap()
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    let m = router_metrics(&router).await;
    let retries = metric_sum(&m, "vllm_router_retries_total", &[]);
    let refused = 0.0
        + metric_sum(
            &m,
            "vllm_router_policy_reloads_total",
            &["result=\"error\""],
        );
    let reloaded = 0.0
        + metric_sum(
            &m,
            "vllm_router_policy_reloads_total",
            &["result=\"loaded\""],
        );
    drop(sims);

    // After warm-up: RSS growth and fd range.
    let after: Vec<usize> = xs
        .iter()
        .enumerate()
        .filter(|(_, x)| **x >= warmup.as_secs_f64())
        .map(|(i, _)| i)
        .collect();
    let (rss0, rss1) = match (after.first(), after.last()) {
        (Some(a), Some(b)) => (rss[*a], rss[*b]),
        _ => (0.0, 0.0),
    };
    let rss_max = after.iter().map(|i| rss[*i]).fold(0.0, f64::max);
    // Anonymous memory (heap, stacks, policy instances, compiled policy code) is what a
    // leak grows; RSS also counts the binary's own text pages, which grow once when a
    // code path runs for the first time (compiling a policy pages in Cranelift).
    let (anon0, anon1) = match (after.first(), after.last()) {
        (Some(a), Some(b)) => (anon[*a], anon[*b]),
        _ => (0.0, 0.0),
    };
    let anon_growth = if anon0 > 0.0 {
        (anon1 - anon0) / anon0 * 100.0
    } else {
        0.0
    };
    let growth = if rss0 > 0.0 {
        (rss1 - rss0) / rss0 * 100.0
    } else {
        0.0
    };
    let fd_min = after.iter().map(|i| fds[*i]).fold(f64::MAX, f64::min);
    let fd_max = after.iter().map(|i| fds[*i]).fold(0.0, f64::max);
    let fd_end = after.last().map(|i| fds[*i]).unwrap_or(0.0);
    let fd_start = after.first().map(|i| fds[*i]).unwrap_or(0.0);
    // "Flat": the second half after warm-up never needs more descriptors than the first
    // half did (plus slack for the connection pool's churn); a leak grows without bound.
    let half = after.len() / 2;
    let fd_max_first = after[..half].iter().map(|i| fds[*i]).fold(0.0, f64::max);
    let fd_max_second = after[half..].iter().map(|i| fds[*i]).fold(0.0, f64::max);
    let (ok, failed, truncated, streams) = (
        counts.ok.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
        counts.truncated.load(Ordering::Relaxed),
        counts.streams.load(Ordering::Relaxed),
    );
    let total = ok + failed + truncated;
    println!("\n== soak summary ({secs} s)");
    println!(
        "requests            {total} ({streams} streams), {:.0} req/s",
        total as f64 / secs as f64
    );
    println!(
        "failed              {failed} ({:.3} %; clear errors: worker killed mid-stream, etc.)",
        failed as f64 * 100.0 / total.max(1) as f64
    );
    println!("silent truncations  {truncated} (must be 0)");
    println!("retries             {retries}");
    println!("policy swaps        {swaps} ({reloaded} loaded, {refused} broken files refused)");
    println!("worker kills        {kills}; worker-set changes {set_changes}");
    println!(
        "RSS after warm-up   {rss0:.1} -> {rss1:.1} MiB ({growth:+.1} %), max {rss_max:.1} MiB"
    );
    println!(
        "anonymous memory    {anon0:.1} -> {anon1:.1} MiB ({anon_growth:+.1} %) (the leak criterion: < 5 %)"
    );
    println!(
        "open fds after warm-up: start {fd_start}, end {fd_end}, range {fd_min}-{fd_max}; max first half {fd_max_first}, second half {fd_max_second}"
    );
    let out = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    let summary = serde_json::json!({
        "seconds": secs, "requests": total, "streams": streams, "failed": failed,
        "silent_truncations": truncated, "retries": retries, "policy_swaps": swaps,
        "policy_loaded": reloaded, "policy_refused": refused, "worker_kills": kills,
        "worker_set_changes": set_changes, "rss_mib_after_warmup": [rss0, rss1],
        "rss_growth_percent": growth,
        "anon_mib_after_warmup": [anon0, anon1], "anon_growth_percent": anon_growth, "fds_after_warmup": [fd_start, fd_end, fd_min, fd_max],
        "samples": {"t": xs, "rss_mib": rss, "anon_mib": anon, "threads": threads, "fds": fds, "ok_per_s": rps, "failed_per_5s": fails},
    });
    std::fs::write(
        out.join("soak.json"),
        serde_json::to_vec_pretty(&summary).unwrap(),
    )
    .unwrap();
    let s = &summary["samples"];
    let col = |k: &str| -> Vec<f64> {
        s[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap_or(0.0))
            .collect()
    };
    let png = vllm_router::chart::line_chart(
        &format!("vllm-router soak, {secs} s"),
        &[
            vllm_router::chart::LinePanel {
                title: "router RSS (MiB)",
                x: &xs,
                lines: vec![("rss", col("rss_mib"))],
            },
            vllm_router::chart::LinePanel {
                title: "open file descriptors",
                x: &xs,
                lines: vec![("fds", col("fds"))],
            },
            vllm_router::chart::LinePanel {
                title: "requests: ok per s, failed per 5 s (x: seconds)",
                x: &xs,
                lines: vec![("ok/s", col("ok_per_s")), ("failed", col("failed_per_5s"))],
            },
        ],
    );
    std::fs::write(out.join("soak.png"), png).unwrap();
    println!("wrote {} and soak.png", out.join("soak.json").display());
    let fds_grew = fd_max_second > fd_max_first + 8.0;
    let bad = truncated > 0 || anon_growth >= 5.0 || fds_grew;
    if bad {
        println!(
            "SOAK FAILED: truncations {truncated}, anonymous memory growth {anon_growth:.1} %, fds max {fd_max_first} -> {fd_max_second}"
        );
        std::process::exit(1);
    }
    println!("soak passed");
}
