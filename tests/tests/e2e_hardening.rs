//! End-to-end hardening through the real binary: TLS both ways (https:// workers with
//! mTLS, a TLS listener whose certificate is swapped on file change), client API keys
//! with per-key and global limits, and hostile clients (idle and slowloris connections
//! beyond the connection cap). Certificates are made at test time (rcgen); the workers
//! are simulators behind a TLS terminator that demands a client certificate.

use serde_json::json;
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use vllm_router_tests::tls::{Ca, TlsFront};
use vllm_router_tests::*;

fn write(dir: &TempDir, name: &str, text: &str) -> String {
    let p = dir.join(name);
    // Atomic replace (what cert-manager and kubelet do), so a reload never reads half.
    let tmp = dir.join(&format!("{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
    p.to_string_lossy().into_owned()
}

fn der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// The leaf certificate (DER) a TLS server presented to this response's connection.
fn peer_cert(r: &reqwest::Response) -> Vec<u8> {
    r.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .expect("TLS info")
        .to_vec()
}

async fn read_stream(r: reqwest::Response) -> String {
    String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_both_ways_mtls_to_workers_and_the_listener_certificate_swaps_without_dropping() {
    let ca = Ca::new("vllm-router test CA");
    let dir = TempDir::new("tls");
    let worker_cert = ca.leaf("worker");
    let router_id = ca.leaf("router-client");
    let v1 = ca.leaf("router-v1");
    let ca_file = write(&dir, "ca.pem", &ca.cert_pem);
    let id_cert = write(&dir, "client.pem", &router_id.cert_pem);
    let id_key = write(&dir, "client.key", &router_id.key_pem);
    let cert = write(&dir, "server.pem", &v1.cert_pem);
    let key = write(&dir, "server.key", &v1.key_pem);

    // Two simulators, each behind a TLS front that only lets clients with a
    // certificate from our CA through.
    let sims = start_sims(2, &["--token-delay-ms", "100"]);
    let mut fronts = Vec::new();
    for s in &sims {
        fronts.push(TlsFront::start(s.port, &worker_cert, Some(&ca.cert_pem)).await);
    }
    let workers: Vec<String> = fronts
        .iter()
        .map(|f| format!("https://127.0.0.1:{}", f.port))
        .collect();
    let router = start_router(
        &workers,
        &[
            "--worker-ca-file",
            &ca_file,
            "--worker-client-cert-file",
            &id_cert,
            "--worker-client-key-file",
            &id_key,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--worker-startup-timeout-secs",
            "10",
            "--log-level",
            "warn,vllm_router::app=info,vllm_router=info",
        ],
    );
    let base = format!("https://127.0.0.1:{}", router.port);
    let c = vllm_router_tests::tls::client(&ca.cert_pem, None);

    // Health probes go over mTLS: both workers healthy.
    let h = get_json(&c, &format!("{base}/health")).await;
    assert_eq!(h["healthy_workers"], 2, "{h}");
    // Requests reach both workers through TLS, non-streaming and streaming.
    for i in 0..10 {
        let r = post_json(
            &c,
            &format!("{base}/v1/completions"),
            &[],
            &json!({"model": "sim-model", "prompt": format!("p{i}"), "max_tokens": 1}),
        )
        .await;
        assert_eq!(r.status(), 200);
        assert_eq!(peer_cert(&r), der(&v1.cert_pem));
    }
    for s in &sims {
        assert!(!sim_requests(s).await.is_empty(), "a worker got nothing");
    }
    assert!(
        fronts
            .iter()
            .all(|f| f.handshakes.load(std::sync::atomic::Ordering::SeqCst) > 0)
    );

    // A 3 s stream is in flight while the certificate is replaced.
    let stream = {
        let c = c.clone();
        let url = format!("{base}/v1/chat/completions");
        tokio::spawn(async move {
            let mut body = chat_body("long stream", true);
            body["max_tokens"] = json!(30);
            let r = c.post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let first = peer_cert(&r);
            (first, read_stream(r).await)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v2 = ca.leaf("router-v2");
    write(&dir, "server.key", &v2.key_pem);
    write(&dir, "server.pem", &v2.cert_pem);
    wait_log(
        &router,
        "TLS certificate reloaded",
        1,
        Duration::from_secs(10),
    )
    .await;
    let r = c.get(format!("{base}/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        peer_cert(&r),
        der(&v2.cert_pem),
        "new connections get the new certificate"
    );
    let (first, text) = stream.await.unwrap();
    assert_eq!(first, der(&v1.cert_pem));
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "the stream across the swap was cut: {text}"
    );

    // A broken file is refused; the current certificate keeps serving.
    write(&dir, "server.pem", "not a certificate\n");
    wait_log(
        &router,
        "TLS certificate not reloaded",
        1,
        Duration::from_secs(10),
    )
    .await;
    let r = c.get(format!("{base}/v1/models")).send().await.unwrap();
    assert_eq!(peer_cert(&r), der(&v2.cert_pem));
    let m = router_metrics(&router).await;
    assert!(
        metric_sum(
            &m,
            "vllm_router_tls_certificate_reloads_total",
            &["result=\"ok\""]
        ) >= 1.0
    );
    assert!(
        metric_sum(
            &m,
            "vllm_router_tls_certificate_reloads_total",
            &["result=\"error\""]
        ) >= 1.0
    );

    // Plain HTTP to the TLS listener gets no answer.
    let plain = client()
        .get(format!("http://127.0.0.1:{}/health", router.port))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP answered on the TLS listener");

    // Without the client certificate, the workers refuse the router: none healthy.
    let no_id = start_router(
        &workers,
        &[
            "--worker-ca-file",
            &ca_file,
            "--worker-startup-timeout-secs",
            "0",
        ],
    );
    let r = client()
        .get(format!("{}/health", no_id.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        503,
        "workers demanding mTLS must not look healthy without it"
    );
    // And without our CA, the workers' certificates are not trusted.
    let no_ca = start_router(
        &workers,
        &[
            "--worker-client-cert-file",
            &id_cert,
            "--worker-client-key-file",
            &id_key,
            "--worker-startup-timeout-secs",
            "0",
        ],
    );
    let r = client()
        .get(format!("{}/health", no_ca.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

fn new_key(file: &str, name: &str, extra: &[&str]) -> String {
    let out = std::process::Command::new(bin("vllm-router"))
        .args(["keys", "new", name, "--file", file])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_keys_authenticate_limit_per_key_and_reload() {
    let dir = TempDir::new("keys");
    let file = dir.join("keys.toml").to_string_lossy().into_owned();
    let a = new_key(&file, "team-a", &["--max-concurrent", "1"]);
    let b = new_key(&file, "team-b", &["--requests-per-second", "0.5"]);
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains(&a) && !text.contains(&b),
        "keys must be stored hashed"
    );
    let worker_key = "worker-secret";
    let sims = start_sims(1, &["--api-key", worker_key, "--token-delay-ms", "100"]);
    let router = start_router(
        &urls(&sims),
        &[
            "--client-api-keys-file",
            &file,
            "--api-key",
            worker_key,
            "--log-level",
            "debug",
        ],
    );
    let c = client();
    let url = format!("{}/v1/completions", router.url());
    let body = json!({"model": "sim-model", "prompt": "x", "max_tokens": 1});
    let bearer = |k: &str| format!("Bearer {k}");

    // Health and readiness stay open.
    assert_eq!(
        c.get(format!("{}/health", router.url()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(format!("{}/readiness", router.url()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // No key, a wrong key: 401 in OpenAI's shape.
    let r = post_json(&c, &url, &[], &body).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_api_key", "{e}");
    let r = post_json(&c, &url, &[("authorization", "Bearer sk-vr-wrong")], &body).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        c.get(format!("{}/list_workers", router.url()))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );

    // team-a gets in; the worker sees the router's worker key, never the client's.
    let r = post_json(&c, &url, &[("authorization", &bearer(&a))], &body).await;
    assert_eq!(r.status(), 200);
    let rec = sim_requests(&sims[0]).await;
    let auth: Vec<String> = rec.last().unwrap()["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == "authorization")
        .map(|h| h[1].as_str().unwrap().to_string())
        .collect();
    assert_eq!(auth, vec![format!("Bearer {worker_key}")]);

    // team-a: one request in flight at most (a 2 s stream holds it).
    let held = {
        let (c, url, k) = (
            c.clone(),
            format!("{}/v1/chat/completions", router.url()),
            bearer(&a),
        );
        tokio::spawn(async move {
            let mut body = chat_body("hold", true);
            body["max_tokens"] = json!(20);
            let r = c
                .post(url)
                .header("authorization", k)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            read_stream(r).await
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = post_json(&c, &url, &[("authorization", &bearer(&a))], &body).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "concurrency_limited", "{e}");
    // Another key is not affected.
    assert_eq!(
        post_json(&c, &url, &[("authorization", &bearer(&b))], &body)
            .await
            .status(),
        200
    );
    assert!(held.await.unwrap().trim_end().ends_with("data: [DONE]"));
    assert_eq!(
        post_json(&c, &url, &[("authorization", &bearer(&a))], &body)
            .await
            .status(),
        200
    );

    // team-b: 0.5 requests/s, burst 1 (its one token went above): 429 with Retry-After 2.
    let r = post_json(&c, &url, &[("authorization", &bearer(&b))], &body).await;
    assert_eq!(r.status(), 429);
    let after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&after), "Retry-After {after}");
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "rate_limited");

    // A key added to the file works without a restart.
    let c3 = new_key(&file, "team-c", &[]);
    let t = Instant::now();
    loop {
        let s = post_json(&c, &url, &[("authorization", &bearer(&c3))], &body)
            .await
            .status();
        if s == 200 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "new key not accepted: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Metrics and logs carry key names, never keys.
    let m = router_metrics(&router).await;
    assert!(
        metric_sum(
            &m,
            "vllm_router_client_key_requests_total",
            &["key=\"team-a\"", "outcome=\"admitted\""]
        ) >= 2.0
    );
    assert!(
        metric_sum(
            &m,
            "vllm_router_client_key_requests_total",
            &["key=\"team-a\"", "outcome=\"concurrency_limited\""]
        ) >= 1.0
    );
    assert!(
        metric_sum(
            &m,
            "vllm_router_client_key_requests_total",
            &["key=\"team-b\"", "outcome=\"rate_limited\""]
        ) >= 1.0
    );
    assert!(
        metric_sum(
            &m,
            "vllm_router_client_auth_failures_total",
            &["reason=\"missing\""]
        ) >= 1.0
    );
    assert!(
        metric_sum(
            &m,
            "vllm_router_client_auth_failures_total",
            &["reason=\"invalid\""]
        ) >= 1.0
    );
    for k in [&a, &b, &c3] {
        assert!(!m.contains(k.as_str()), "a key is in the metrics");
        assert!(router.log_matching(k).is_empty(), "a key is in the log");
    }
    assert!(router.log_matching(worker_key).is_empty());

    // The global rate limit (vllm-project/router's flag).
    let limited = start_router(
        &urls(&sims),
        &[
            "--api-key",
            worker_key,
            "--rate-limit-tokens-per-second",
            "1",
            "--rate-limit-burst",
            "2",
        ],
    );
    let url = format!("{}/v1/completions", limited.url());
    let codes: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(post_json(&c, &url, &[], &body).await.status().as_u16());
        }
        v
    };
    assert_eq!(codes, vec![200, 200, 429]);
    let m = router_metrics(&limited).await;
    assert_eq!(
        metric_sum(
            &m,
            "vllm_router_admission_rejections_total",
            &["reason=\"rate_limited\""]
        ),
        1.0
    );
}

/// A raw TCP connection to the router.
fn connect(port: u16) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Whether the router closed `s` (EOF or reset on read).
fn closed(s: &mut std::net::TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return true,
            Ok(_) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slowloris_connections_beyond_the_cap_do_not_stop_normal_clients() {
    let sims = start_sims(1, &["--token-delay-ms", "100"]);
    let router = start_router(
        &urls(&sims),
        &[
            "--max-client-connections",
            "300",
            "--client-header-timeout-secs",
            "2",
            "--client-idle-timeout-secs",
            "3",
        ],
    );
    let port = router.port;
    // 250 idle connections and 250 slowloris ones (a header line every 500 ms): 500
    // against a cap of 300.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut idle = Vec::new();
    for _ in 0..250 {
        idle.push(connect(port));
    }
    let slow = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut conns: Vec<Option<std::net::TcpStream>> = (0..250)
                .map(|_| {
                    let mut s = connect(port);
                    s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
                        .unwrap();
                    Some(s)
                })
                .collect();
            let mut cut = 0;
            let t = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::SeqCst)
                && t.elapsed() < Duration::from_secs(30)
            {
                for c in conns.iter_mut() {
                    if let Some(s) = c {
                        if s.write_all(b"X-Slow: 1\r\n").is_err() {
                            *c = None;
                            cut += 1;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            cut
        })
    };

    // Meanwhile, normal clients on fresh connections are served.
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let t = Instant::now();
        let r = post_json(
            &c,
            &format!("{}/v1/completions", router.url()),
            &[],
            &json!({"model": "sim-model", "prompt": format!("n{i}"), "max_tokens": 1}),
        )
        .await;
        assert_eq!(r.status(), 200);
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // At worst a normal client waited behind the first batch of stalled connections
    // (the header timeout), never indefinitely.
    assert!(
        worst < Duration::from_secs(6),
        "a normal request took {worst:?}"
    );
    eprintln!("normal requests beside 500 hostile connections: worst {worst:?}");

    // Every idle connection was closed by the router.
    let idle_closed =
        tokio::task::spawn_blocking(move || idle.iter_mut().map(closed).filter(|c| *c).count())
            .await
            .unwrap();
    assert_eq!(idle_closed, 250);
    // Slowloris connections are cut after the header timeout.
    let t = Instant::now();
    loop {
        let m = router_metrics(&router).await;
        let n = metric_sum(
            &m,
            "vllm_router_client_connections_closed_total",
            &["reason=\"header_timeout\""],
        );
        if n >= 500.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "only {n} stalled connections closed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let cut = tokio::task::spawn_blocking(move || slow.join().unwrap())
        .await
        .unwrap();
    assert!(cut >= 240, "slowloris writers cut: {cut}");

    // A kept-alive connection idle after its request is closed after the idle timeout,
    // not the header timeout.
    let (idle_after, _) = tokio::task::spawn_blocking(move || {
        let mut s = connect(port);
        let body = r#"{"model":"sim-model","prompt":"k","max_tokens":1}"#;
        write!(s, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut buf = [0u8; 8192];
        let n = s.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        let t = Instant::now();
        let c = closed(&mut s);
        (t.elapsed(), c)
    })
    .await
    .unwrap();
    assert!(
        idle_after >= Duration::from_millis(2500) && idle_after < Duration::from_secs(8),
        "idle keep-alive closed after {idle_after:?}"
    );

    // A stream longer than both timeouts is never cut.
    let mut body = chat_body("long", true);
    body["max_tokens"] = json!(50); // 5 s at 100 ms per token
    let r = post_json(
        &c,
        &format!("{}/v1/chat/completions", router.url()),
        &[],
        &body,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(read_stream(r).await.trim_end().ends_with("data: [DONE]"));
    let m = router_metrics(&router).await;
    assert!(
        metric_sum(
            &m,
            "vllm_router_client_connections_closed_total",
            &["reason=\"idle_timeout\""]
        ) >= 1.0
    );
}
