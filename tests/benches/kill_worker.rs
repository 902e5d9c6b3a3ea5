//! Worker failure under load: 3 simulated workers, 8 clients sending non-streaming chat
//! completions for 6 s; worker w1 is killed (SIGKILL) at 1.5 s and restarted on the same
//! port at 3.5 s. Prints requests sent / failed / retried and how long the router took
//! to route to w1 again.
//!
//! Run: `cargo build --release --workspace && cargo bench -p vllm-router-tests --bench kill_worker`.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vllm_router_tests::*;

fn sim_on(port: u16) -> std::process::Child {
    Command::new(bin("vllm-sim"))
        .args([
            "--port",
            &port.to_string(),
            "--worker-id",
            "w1",
            "--record",
            "false",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn vllm-sim")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let w0 = start_sim("w0", &["--record", "false", "--ttft-ms", "2"]);
    let w2 = start_sim("w2", &["--record", "false", "--ttft-ms", "2"]);
    let p1 = free_port();
    let mut w1 = sim_on(p1);
    std::thread::sleep(Duration::from_millis(300));
    let workers = vec![w0.url(), format!("http://127.0.0.1:{p1}"), w2.url()];
    let router = start_router(
        &workers,
        &[
            "--health-check-interval-secs",
            "1",
            "--policy",
            "round_robin",
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed, on_w1) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (stop, sent, failed, on_w1, url) = (
            stop.clone(),
            sent.clone(),
            failed.clone(),
            on_w1.clone(),
            router.url(),
        );
        tasks.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                let r = c
                    .post(format!("{url}/v1/chat/completions"))
                    .json(&chat_body("load", false))
                    .send()
                    .await;
                sent.fetch_add(1, Ordering::Relaxed);
                match r {
                    Ok(r) if r.status() == 200 => {
                        if r.headers()
                            .get("x-vllm-sim-worker")
                            .is_some_and(|v| v == "w1")
                        {
                            on_w1.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let t0 = Instant::now();
    let mut back_after = None;
    let mut killed = false;
    let mut restarted_at = None;
    let mut w1_at_restart = 0;
    while t0.elapsed() < Duration::from_secs(6) {
        let t = t0.elapsed();
        if !killed && t >= Duration::from_millis(1500) {
            let _ = w1.kill();
            let _ = w1.wait();
            killed = true;
            eprintln!(
                "[{:4.1}s] killed w1 ({} requests so far)",
                t.as_secs_f64(),
                sent.load(Ordering::Relaxed)
            );
        }
        if killed && restarted_at.is_none() && t >= Duration::from_millis(3500) {
            w1 = sim_on(p1);
            restarted_at = Some(Instant::now());
            w1_at_restart = on_w1.load(Ordering::Relaxed);
            eprintln!("[{:4.1}s] restarted w1", t.as_secs_f64());
        }
        if let (Some(r), None) = (restarted_at, back_after) {
            if on_w1.load(Ordering::Relaxed) > w1_at_restart {
                back_after = Some(r.elapsed());
                eprintln!("[{:4.1}s] w1 serving again", t.as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let m = router_metrics(&router).await;
    let retried = metric_sum(&m, "vllm_router_retries_total", &[]);
    let _ = w1.kill();
    let _ = w1.wait();
    println!(
        "\nkill/restart under load (8 clients, 6 s): sent {}, failed {}, retried {}, w1 back in rotation {} after restart",
        sent.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        retried,
        back_after
            .map(|d| format!("{:.2} s", d.as_secs_f64()))
            .unwrap_or_else(|| "never".into())
    );
}
