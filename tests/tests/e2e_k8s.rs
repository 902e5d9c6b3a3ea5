//! End-to-end: Kubernetes service discovery against a fake API server (what kube-rs
//! sends: LIST with `labelSelector`, WATCH as newline-delimited JSON events, an `ERROR`
//! 410 `Expired`, a severed stream), with simulated vLLM workers as the pods (each pod
//! one simulator on 127.0.0.1, its port given by the `vllm.ai/worker-ports` annotation)
//! and the real router binary pointed at it through a kubeconfig.

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use vllm_router_tests::*;

/// The fake API server's state: pods by name, the resource version, open watches and
/// the label selectors it was asked for.
#[derive(Default)]
struct Api {
    pods: Mutex<HashMap<String, Value>>,
    rv: Mutex<u64>,
    watches: Mutex<Vec<mpsc::UnboundedSender<String>>>,
    selectors: Mutex<Vec<String>>,
    /// Answer the next WATCH with `ERROR 410 Expired` (forces a re-list).
    expire_next_watch: Mutex<bool>,
}

impl Api {
    fn bump(&self) -> String {
        let mut rv = self.rv.lock().unwrap();
        *rv += 1;
        rv.to_string()
    }

    fn event(&self, kind: &str, mut pod: Value) {
        pod["metadata"]["resourceVersion"] = self.bump().into();
        let line = json!({"type": kind, "object": pod}).to_string() + "\n";
        self.watches
            .lock()
            .unwrap()
            .retain(|tx| tx.send(line.clone()).is_ok());
    }

    /// Add or change a pod (ADDED / MODIFIED to the watches).
    fn apply(&self, pod: Value) {
        let name = pod["metadata"]["name"].as_str().unwrap().to_string();
        let existed = self
            .pods
            .lock()
            .unwrap()
            .insert(name, pod.clone())
            .is_some();
        self.event(if existed { "MODIFIED" } else { "ADDED" }, pod);
    }

    /// Force delete: the object goes with a single DELETED event.
    fn delete(&self, name: &str) {
        if let Some(p) = self.pods.lock().unwrap().remove(name) {
            self.event("DELETED", p);
        }
    }

    /// Remove a pod without telling anyone (as if the DELETED event was lost while the
    /// watch was down).
    fn remove_silently(&self, name: &str) {
        self.pods.lock().unwrap().remove(name);
        self.bump();
    }

    /// Close every open watch stream.
    fn sever(&self) {
        self.watches.lock().unwrap().clear();
    }
}

async fn pods(State(api): State<Arc<Api>>, Query(q): Query<HashMap<String, String>>) -> Response {
    if let Some(sel) = q.get("labelSelector") {
        api.selectors.lock().unwrap().push(sel.clone());
    }
    if q.get("watch").map(String::as_str) == Some("true") {
        let (tx, rx) = mpsc::unbounded_channel::<String>();
        if std::mem::take(&mut *api.expire_next_watch.lock().unwrap()) {
            let _ = tx.send(
                json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                    "status": "Failure", "reason": "Expired", "code": 410,
                    "message": "too old resource version"}})
                .to_string()
                    + "\n",
            );
            drop(tx);
        } else {
            api.watches.lock().unwrap().push(tx);
        }
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|l| (Ok::<_, std::io::Error>(bytes::Bytes::from(l)), rx))
        });
        return axum::body::Body::from_stream(stream).into_response();
    }
    let items: Vec<Value> = api.pods.lock().unwrap().values().cloned().collect();
    let rv = api.rv.lock().unwrap().to_string();
    axum::Json(json!({"apiVersion": "v1", "kind": "PodList",
        "metadata": {"resourceVersion": rv}, "items": items}))
    .into_response()
}

/// A pod served by the simulator on `port`.
fn pod(name: &str, uid: &str, port: u16, ready: bool, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": uid, "labels": labels,
            "annotations": {"vllm.ai/worker-ports": port.to_string()}},
        "status": {"phase": "Running", "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    })
}

struct Fake {
    api: Arc<Api>,
    kubeconfig: std::path::PathBuf,
    _dir: TempDir,
}

async fn fake_api_server() -> Fake {
    let api = Arc::new(Api::default());
    let app = axum::Router::new()
        .route("/api/v1/namespaces/default/pods", axum::routing::get(pods))
        .with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let dir = TempDir::new("k8s");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n"
        ),
    )
    .unwrap();
    Fake {
        api,
        kubeconfig,
        _dir: dir,
    }
}

fn discovery_router(fake: &Fake, manual: &[String], extra: &[&str]) -> Proc {
    let mut cmd = Command::new(bin("vllm-router"));
    cmd.env("KUBECONFIG", &fake.kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .args(["--port", "0", "--prometheus-port", &free_port().to_string()])
        .args([
            "--service-discovery",
            "--selector",
            "app=vllm",
            "--service-discovery-namespace",
            "default",
            "--drain-settle-secs",
            "1",
            "--health-check-interval-secs",
            "1",
            "--log-level",
            "warn,vllm_router::app=info,vllm_router::k8s=info",
        ])
        .args(extra);
    if !manual.is_empty() {
        cmd.arg("--worker-urls").args(manual);
    }
    spawn_router(cmd)
}

async fn workers(router: &Proc) -> Vec<String> {
    let v = get_json(&client(), &format!("{}/list_workers", router.url())).await;
    let mut urls: Vec<String> = v["urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_string())
        .collect();
    urls.sort();
    urls
}

/// Poll until the router's workers are exactly `want` (15 s), else fail with both.
async fn wait_workers(router: &Proc, want: &[String], what: &str) -> Duration {
    let mut want = want.to_vec();
    want.sort();
    let t0 = Instant::now();
    loop {
        let have = workers(router).await;
        if have == want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{what}: workers {have:?}, expected {want:?}\n{}",
            router.log_matching("discovery").join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn url(p: &Proc) -> String {
    format!("http://127.0.0.1:{}", p.port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_follows_pods_and_never_keeps_a_zombie() {
    let fake = fake_api_server().await;
    let sims = start_sims(5, &[]);
    let manual = start_sim("manual", &[]);
    let labels = json!({"app": "vllm"});
    fake.api
        .apply(pod("a", "uid-a", sims[0].port, true, labels.clone()));
    fake.api
        .apply(pod("b", "uid-b", sims[1].port, true, labels.clone()));
    fake.api
        .apply(pod("c", "uid-c", sims[2].port, false, labels.clone()));
    fake.api.apply(pod(
        "other",
        "uid-o",
        sims[3].port,
        true,
        json!({"app": "else"}),
    ));
    let router = discovery_router(&fake, &[url(&manual)], &[]);

    // Only the Ready, matching pods (and the manual worker) serve.
    let t = wait_workers(
        &router,
        &[url(&sims[0]), url(&sims[1]), url(&manual)],
        "first sync",
    )
    .await;
    eprintln!("first sync: {t:?}");
    assert!(
        fake.api
            .selectors
            .lock()
            .unwrap()
            .iter()
            .all(|s| s == "app=vllm"),
        "the selector is sent to the API server: {:?}",
        fake.api.selectors.lock().unwrap()
    );
    let ready = get_json(&client(), &format!("{}/readiness", router.url())).await;
    assert_eq!(ready["status"], "ready", "{ready}");

    // Traffic keeps flowing through every change below.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = {
        let (stop, failures, sent, base) =
            (stop.clone(), failures.clone(), sent.clone(), router.url());
        tokio::spawn(async move {
            let c = client();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = c
                    .post(format!("{base}/v1/completions"))
                    .json(&json!({"model": "sim-model", "prompt": "hi", "max_tokens": 1}))
                    .send()
                    .await;
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if !r.is_ok_and(|r| r.status() == 200) {
                    failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // A pod turning Ready is added.
    fake.api
        .apply(pod("c", "uid-c", sims[2].port, true, labels.clone()));
    let t = wait_workers(
        &router,
        &[url(&sims[0]), url(&sims[1]), url(&sims[2]), url(&manual)],
        "c ready",
    )
    .await;
    eprintln!("pod Ready -> worker added: {t:?}");

    // NotReady: no new traffic (drained, removed); Ready again: back.
    fake.api
        .apply(pod("c", "uid-c", sims[2].port, false, labels.clone()));
    let t = wait_workers(
        &router,
        &[url(&sims[0]), url(&sims[1]), url(&manual)],
        "c not ready",
    )
    .await;
    eprintln!("pod NotReady -> worker drained and removed: {t:?}");
    fake.api
        .apply(pod("c", "uid-c", sims[2].port, true, labels.clone()));
    wait_workers(
        &router,
        &[url(&sims[0]), url(&sims[1]), url(&sims[2]), url(&manual)],
        "c ready again",
    )
    .await;

    // Force delete (a single DELETED event): drained, then removed after the settle time.
    fake.api.delete("a");
    let t = wait_workers(
        &router,
        &[url(&sims[1]), url(&sims[2]), url(&manual)],
        "force delete",
    )
    .await;
    eprintln!("force delete -> worker removed (settle 1 s): {t:?}");

    // The watch breaks, a pod goes while nobody listens, and the next watch is told its
    // resource version expired (410): the re-list must remove the zombie.
    *fake.api.expire_next_watch.lock().unwrap() = true;
    fake.api.remove_silently("b");
    fake.api.sever();
    let t = wait_workers(&router, &[url(&sims[2]), url(&manual)], "410 re-list").await;
    eprintln!("pod removed while the watch was down -> gone after re-list: {t:?}");

    // A pod re-created under the same name with a new address: the new one serves, the
    // old one goes.
    fake.api
        .apply(pod("c", "uid-c2", sims[4].port, true, labels.clone()));
    let t = wait_workers(&router, &[url(&sims[4]), url(&manual)], "re-created pod").await;
    eprintln!("re-created pod -> new address serves, old removed: {t:?}");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    let (n, failed) = (
        sent.load(std::sync::atomic::Ordering::Relaxed),
        failures.load(std::sync::atomic::Ordering::Relaxed),
    );
    eprintln!("{n} requests during the changes, {failed} failed");
    assert!(n > 50, "too little traffic to tell: {n}");
    assert_eq!(failed, 0, "client requests failed during discovery changes");
    let m = router_metrics(&router).await;
    assert!(
        metric_sum(&m, "vllm_router_discovery_deregistrations_total", &[]) >= 3.0,
        "{m}"
    );
    // No stale series for workers that left.
    assert!(
        !m.contains(&format!("worker=\"{}\"", url(&sims[0]))),
        "stale series of a removed worker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_pod_drains_its_stream_and_gets_no_new_requests() {
    let fake = fake_api_server().await;
    let slow = start_sim("slow", &["--token-delay-ms", "100"]);
    let other = start_sim("other", &[]);
    let labels = json!({"app": "vllm"});
    fake.api
        .apply(pod("slow", "uid-s", slow.port, true, labels.clone()));
    let router = discovery_router(&fake, &[], &["--policy", "round_robin"]);
    wait_workers(&router, &[url(&slow)], "first sync").await;

    // A stream of 20 tokens at 100 ms each starts on the only worker...
    let c = client();
    let stream = c
        .post(format!("{}/v1/completions", router.url()))
        .json(&json!({"model": "sim-model", "prompt": "long", "max_tokens": 20, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    // ...then a second pod appears and the first is deleted gracefully
    // (deletionTimestamp set, the object still there).
    fake.api
        .apply(pod("other", "uid-t", other.port, true, labels.clone()));
    wait_workers(&router, &[url(&slow), url(&other)], "second pod").await;
    let mut terminating = pod("slow", "uid-s", slow.port, true, labels.clone());
    terminating["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z".into();
    fake.api.apply(terminating);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // No new request reaches the draining worker.
    for i in 0..10 {
        let r = post_completion(&c, &router, &format!("after drain {i}")).await;
        assert_eq!(
            worker_of(&r),
            "other",
            "a draining worker got a new request"
        );
    }
    // The stream in flight completes: every token and the [DONE] line.
    let body = stream.text().await.unwrap();
    assert!(body.contains("[DONE]"), "stream cut by the drain: {body}");
    // Then the worker leaves.
    wait_workers(&router, &[url(&other)], "drained worker removed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_port_pod_gives_one_worker_per_port() {
    let fake = fake_api_server().await;
    let sims = start_sims(2, &[]);
    let mut p = pod("multi", "uid-m", sims[0].port, true, json!({"app": "vllm"}));
    p["metadata"]["annotations"]["vllm.ai/worker-ports"] =
        format!("{},{}", sims[0].port, sims[1].port).into();
    fake.api.apply(p);
    let router = discovery_router(&fake, &[], &["--policy", "round_robin"]);
    wait_workers(&router, &[url(&sims[0]), url(&sims[1])], "multi-port pod").await;
    let c = client();
    let mut seen = std::collections::HashSet::new();
    for i in 0..4 {
        seen.insert(worker_of(
            &post_completion(&c, &router, &format!("m {i}")).await,
        ));
    }
    assert_eq!(seen.len(), 2, "both ports serve: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pd_pods_are_found_by_role_and_serve_the_two_stage_flow() {
    let fake = fake_api_server().await;
    let prefill = start_sim("p0", &["--role", "prefill"]);
    let decode = start_sim("d0", &["--role", "decode"]);
    fake.api.apply(pod(
        "p0",
        "uid-p",
        prefill.port,
        true,
        json!({"app": "vllm", "role": "prefill"}),
    ));
    fake.api.apply(pod(
        "d0",
        "uid-d",
        decode.port,
        true,
        json!({"app": "vllm", "role": "decode"}),
    ));
    let router = discovery_router(
        &fake,
        &[],
        &[
            "--vllm-pd-disaggregation",
            "--prefill-selector",
            "app=vllm,role=prefill",
            "--decode-selector",
            "app=vllm,role=decode",
        ],
    );
    wait_workers(&router, &[url(&prefill), url(&decode)], "pd pods").await;
    // The server was asked for the labels both roles share.
    assert!(
        fake.api
            .selectors
            .lock()
            .unwrap()
            .iter()
            .all(|s| s == "app=vllm")
    );
    let r = post_json(
        &client(),
        &format!("{}/v1/chat/completions", router.url()),
        &[],
        &json!({"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(worker_of(&r), "d0", "decode answers");
    assert_eq!(sim_requests(&prefill).await.len(), 1, "one prefill call");
    assert_eq!(sim_requests(&decode).await.len(), 1, "one decode call");
}
