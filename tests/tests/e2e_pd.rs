//! End-to-end prefill/decode disaggregation through the real binary with simulated
//! prefill and decode workers: the two-stage flow, the request id, retries, failures,
//! ZMQ discovery and data-parallel ranks.

use futures_util::StreamExt;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use vllm_router_tests::*;

fn header<'a>(rec: &'a Value, name: &str) -> Option<&'a str> {
    rec["headers"]
        .as_array()?
        .iter()
        .find(|h| h[0].as_str().is_some_and(|k| k.eq_ignore_ascii_case(name)))
        .and_then(|h| h[1].as_str())
}

fn is_pd_id(id: &str, p: &str, d: &str) -> bool {
    let Some((head, uuid)) = id.rsplit_once('_') else {
        return false;
    };
    head == format!("___prefill_addr_{p}___decode_addr_{d}")
        && uuid.len() == 32
        && uuid.chars().all(|c| c.is_ascii_hexdigit())
}

fn pd_router(prefills: &[Proc], decodes: &[Proc], extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec!["--vllm-pd-disaggregation".into()];
    for p in prefills {
        args.push("--prefill".into());
        args.push(p.url());
    }
    for d in decodes {
        args.push("--decode".into());
        args.push(d.url());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    start_router(&[], &refs)
}

fn authority(p: &Proc) -> String {
    format!("127.0.0.1:{}", p.port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stage_flow_shapes_both_requests_exactly() {
    let prefills = vec![
        start_sim("p0", &["--role", "prefill"]),
        start_sim("p1", &["--role", "prefill"]),
    ];
    let decodes = vec![
        start_sim("d0", &["--role", "decode"]),
        start_sim("d1", &["--role", "decode"]),
    ];
    let router = pd_router(&prefills, &decodes, &["--policy", "round_robin"]);
    let c = client();
    let body = json!({"model": "sim-model", "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 7, "max_completion_tokens": 7, "min_tokens": 3, "stream": false});
    let r = post_json(
        &c,
        &format!("{}/v1/chat/completions", router.url()),
        &[("authorization", "Bearer client-key")],
        &body,
    )
    .await;
    assert_eq!(r.status(), 200);
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let out: Value = r.json().await.unwrap();
    assert_eq!(out["object"], "chat.completion");
    // Exactly one prefill and one decode call.
    let mut p_recs = Vec::new();
    for p in &prefills {
        p_recs.extend(sim_requests(p).await.into_iter().map(|r| (authority(p), r)));
    }
    let mut d_recs = Vec::new();
    for d in &decodes {
        d_recs.extend(sim_requests(d).await.into_iter().map(|r| (authority(d), r)));
    }
    assert_eq!((p_recs.len(), d_recs.len()), (1, 1));
    let (p_addr, p) = &p_recs[0];
    let (d_addr, d) = &d_recs[0];
    // Prefill body: max_tokens 1, max_completion_tokens 1, min_tokens 1, no stream, hand-off request.
    assert_eq!(p["body"]["max_tokens"], 1);
    assert_eq!(p["body"]["max_completion_tokens"], 1);
    assert_eq!(p["body"]["min_tokens"], 1);
    assert_eq!(p["body"]["stream"], false);
    assert_eq!(p["body"]["messages"], body["messages"]);
    assert_eq!(
        p["body"]["kv_transfer_params"],
        json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
               "remote_block_ids": null, "remote_host": null, "remote_port": null})
    );
    // Decode body: the original plus the prefill's hand-off, verbatim.
    let mut expected = body.clone();
    expected["kv_transfer_params"] = json!({"do_remote_prefill": true, "do_remote_decode": false,
        "remote_engine_id": format!("engine-{}", if p_addr == &authority(&prefills[0]) { "p0" } else { "p1" }),
        "remote_block_ids": [1, 2, 3], "remote_host": "127.0.0.1",
        "remote_port": p_addr.rsplit(':').next().unwrap().parse::<u16>().unwrap(), "tp_size": 1});
    assert_eq!(d["body"], expected);
    // Same P2P NCCL id on both stages (HTTP addresses without discovery), echoed to the client.
    let pid = header(p, "x-request-id").unwrap();
    assert_eq!(pid, header(d, "x-request-id").unwrap());
    assert_eq!(pid, rid);
    assert!(is_pd_id(pid, p_addr, d_addr), "bad PD request id {pid}");
    // Client headers reach both stages.
    assert_eq!(header(p, "authorization"), Some("Bearer client-key"));
    assert_eq!(header(d, "authorization"), Some("Bearer client-key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_streams_to_the_client() {
    let prefills = vec![start_sim("p0", &["--role", "prefill"])];
    let decodes = vec![start_sim(
        "d0",
        &["--role", "decode", "--token-delay-ms", "20"],
    )];
    let router = pd_router(&prefills, &decodes, &[]);
    let c = client();
    let body = json!({"model": "sim-model", "prompt": "stream me", "max_tokens": 8, "stream": true,
        "stream_options": {"include_usage": true}});
    let r = post_json(&c, &format!("{}/v1/completions", router.url()), &[], &body).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut s = r.bytes_stream();
    let t0 = Instant::now();
    let first = s.next().await.unwrap().unwrap();
    let first_at = t0.elapsed();
    let mut all = first.to_vec();
    while let Some(ch) = s.next().await {
        all.extend_from_slice(&ch.unwrap());
    }
    let text = String::from_utf8(all).unwrap();
    assert_eq!(text.matches("\"text\":").count(), 8, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert!(
        first_at < Duration::from_millis(120),
        "first chunk only after {first_at:?}: buffered?"
    );
    let p = &sim_requests(&prefills[0]).await[0];
    assert_eq!(p["body"]["stream"], false);
    assert!(p["body"].get("stream_options").is_none());
    let d = &sim_requests(&decodes[0]).await[0];
    assert_eq!(d["body"]["stream"], true);
    assert_eq!(d["body"]["stream_options"]["include_usage"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_503_is_retried_and_a_final_failure_never_calls_decode() {
    let prefills = vec![
        start_sim("p0", &["--role", "prefill"]),
        start_sim("p1", &["--role", "prefill"]),
    ];
    let decodes = vec![start_sim("d0", &["--role", "decode"])];
    let router = pd_router(&prefills, &decodes, &["--policy", "round_robin"]);
    let c = client();
    let url = format!("{}/v1/completions", router.url());
    set_sim(&prefills[0], json!({"fail_status": 503})).await;
    for i in 0..4 {
        let r = post_json(
            &c,
            &url,
            &[],
            &json!({"model": "sim-model", "prompt": format!("x{i}"), "max_tokens": 2}),
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(sim_requests(&decodes[0]).await.len(), 4);
    assert_eq!(
        sim_requests(&prefills[1]).await.len(),
        4,
        "every request ended on the healthy prefill"
    );
    // Every prefill fails: JSON error, decode untouched.
    set_sim(&prefills[1], json!({"fail_status": 500})).await;
    let before = sim_requests(&decodes[0]).await.len();
    let r = post_json(
        &c,
        &url,
        &[],
        &json!({"model": "sim-model", "prompt": "doomed", "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "prefill_failed", "{v}");
    assert_eq!(
        sim_requests(&decodes[0]).await.len(),
        before,
        "decode called after a failed prefill"
    );
    // A client error from prefill is passed on, not retried.
    set_sim(&prefills[1], json!({"fail_status": 0})).await;
    set_sim(&prefills[0], json!({"fail_status": 0})).await;
    let r = post_json(&c, &url, &[], &json!({"prompt": "no model"})).await;
    assert_eq!(r.status(), 400);
    let m = router_metrics(&router).await;
    assert!(
        metric_sum(
            &m,
            "vllm_router_pd_stage_requests_total",
            &["stage=\"prefill\"", "status=\"503\""]
        ) >= 2.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "vllm_router_pd_stage_requests_total",
            &["stage=\"decode\"", "status=\"200\""]
        ),
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zmq_discovery_registers_routes_expires_and_ignores_garbage() {
    let disc = free_port();
    let router = start_router(
        &[],
        &[
            "--vllm-pd-disaggregation",
            "--vllm-discovery-address",
            &format!("127.0.0.1:{disc}"),
            "--policy",
            "round_robin",
        ],
    );
    let reg = format!("127.0.0.1:{disc}");
    let p = start_sim(
        "p0",
        &[
            "--role",
            "prefill",
            "--register",
            &reg,
            "--register-interval-ms",
            "200",
            "--zmq-address",
            "10.9.8.7:21001",
        ],
    );
    let d = start_sim(
        "d0",
        &[
            "--role",
            "decode",
            "--register",
            &reg,
            "--register-interval-ms",
            "200",
            "--zmq-address",
            "10.9.8.6:22001",
        ],
    );
    // Garbage on the discovery socket is dropped.
    {
        use zeromq::{Socket, SocketSend};
        let mut g = zeromq::DealerSocket::new();
        g.connect(&format!("tcp://{reg}")).await.unwrap();
        g.send(zeromq::ZmqMessage::from(b"not msgpack".to_vec()))
            .await
            .unwrap();
        g.send(zeromq::ZmqMessage::from(
            rmp_serde::to_vec_named(&json!({"type": "X"})).unwrap(),
        ))
        .await
        .unwrap();
    }
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let l: Value = get_json(&c, &format!("{}/list_workers", router.url())).await;
        if l["urls"].as_array().unwrap().len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "instances not registered: {l}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = post_json(
        &c,
        &format!("{}/v1/completions", router.url()),
        &[],
        &json!({"model": "sim-model", "prompt": "hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let rec = &sim_requests(&d).await[0];
    let id = header(rec, "x-request-id").unwrap();
    assert!(
        is_pd_id(id, "10.9.8.7:21001", "10.9.8.6:22001"),
        "id does not use ZMQ addresses: {id}"
    );
    // The decode instance goes silent: removed within ~5 s.
    set_sim(&d, json!({"register": ""})).await;
    let silent = Instant::now();
    loop {
        let l: Value = get_json(&c, &format!("{}/list_workers", router.url())).await;
        if l["urls"].as_array().unwrap().len() == 1 {
            break;
        }
        assert!(
            silent.elapsed() < Duration::from_secs(8),
            "silent instance not expired: {l}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        silent.elapsed() >= Duration::from_secs(4),
        "expired too early ({:?})",
        silent.elapsed()
    );
    let r = post_json(
        &c,
        &format!("{}/v1/completions", router.url()),
        &[],
        &json!({"model": "sim-model", "prompt": "hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status(), 503, "no decode instance left");
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_parallel_ranks_are_workers_with_their_own_header() {
    let sims = start_sims(1, &[]);
    let router = start_router(
        &urls(&sims),
        &[
            "--intra-node-data-parallel-size",
            "3",
            "--policy",
            "round_robin",
        ],
    );
    let c = client();
    for i in 0..6 {
        let r = post_json(
            &c,
            &format!("{}/v1/completions", router.url()),
            &[],
            &json!({"model": "sim-model", "prompt": format!("{i}"), "max_tokens": 1}),
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    let ranks: Vec<String> = sim_requests(&sims[0])
        .await
        .iter()
        .map(|r| {
            header(r, "x-data-parallel-rank")
                .unwrap_or("none")
                .to_string()
        })
        .collect();
    // Round robin over the three ranks; where the rotation starts is not fixed (a
    // version's first select is the router's load-time smoke test).
    let mut first: Vec<&str> = ranks[..3].iter().map(String::as_str).collect();
    first.sort_unstable();
    assert_eq!(first, ["0", "1", "2"], "{ranks:?}");
    assert_eq!(ranks[..3], ranks[3..], "{ranks:?}");
    let l: Value = get_json(&c, &format!("{}/list_workers", router.url())).await;
    assert_eq!(l["urls"].as_array().unwrap().len(), 3);
    assert!(l["urls"][2].as_str().unwrap().ends_with("@2"));
}
