//! End-to-end: `vllm-router serve MODEL …` with the simulator standing in for vLLM
//! (`--engine-cmd vllm-sim`): engines start on internal ports, arguments meant for the
//! engine pass through untouched, OpenAI traffic flows through the router, SIGTERM stops
//! the router and then the engines, and an engine that dies stops the command non-zero.

use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};
use vllm_router_tests::*;

fn serve(engines: u32) -> Proc {
    let mut cmd = Command::new(bin("vllm-router"));
    cmd.args(["serve", "served-model", "--engines", &engines.to_string()])
        .args(["--engine-cmd", bin("vllm-sim").to_str().unwrap()])
        .args([
            "--port",
            "0",
            "--prometheus-port",
            "0",
            "--policy",
            "round_robin",
        ])
        .args([
            "--log-level",
            "warn,vllm_router::app=info,vllm_router::serve=info",
        ])
        // Not router flags: these go to every engine untouched.
        .args(["--output-tokens", "3", "--worker-id", "engine"]);
    spawn_router(cmd)
}

fn engine_pids(p: &Proc) -> Vec<u32> {
    p.log_matching("engine started")
        .iter()
        .filter_map(|l| {
            let rest = &l[l.find("pid=")? + 4..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_engines_routes_over_them_and_stops_them_on_sigterm() {
    let mut router = serve(2);
    let pids = engine_pids(&router);
    assert_eq!(pids.len(), 2, "{:?}", router.log_matching("engine"));
    let c = client();
    let workers = get_json(&c, &format!("{}/list_workers", router.url())).await;
    assert_eq!(workers["urls"].as_array().unwrap().len(), 2, "{workers}");
    for i in 0..4 {
        let r = post_json(
            &c,
            &format!("{}/v1/completions", router.url()),
            &[],
            &json!({"model": "served-model", "prompt": format!("{i}")}),
        )
        .await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["x-vllm-sim-worker"],
            "engine",
            "--worker-id reached the engine"
        );
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["model"], "served-model", "the MODEL went to the engine");
        assert_eq!(
            v["usage"]["completion_tokens"], 3,
            "--output-tokens reached the engine: {v}"
        );
    }
    assert!(
        router.terminate(Duration::from_secs(40)),
        "serve did not stop on SIGTERM"
    );
    let end = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < end,
            "engines still running after serve stopped"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_dies_stops_serve_with_a_failure() {
    let mut router = serve(2);
    let pids = engine_pids(&router);
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|p| *p > 1), "{pids:?}");
    Command::new("kill")
        .args(["-s", "KILL", "--", &pids[0].to_string()])
        .status()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = router.try_exit_status() {
            break s;
        }
        assert!(
            Instant::now() < end,
            "serve kept running without its engine"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "an engine's death must fail the command");
    assert!(
        !router
            .log_matching("engine exited while serving")
            .is_empty()
    );
    assert!(!alive(pids[1]), "the other engine was left running");
}
