//! Helpers for end-to-end tests and benches: start the real `vllm-router` binary and
//! simulated vLLM workers (`vllm-sim`) on free 127.0.0.1 ports, and stop them (by PID,
//! on drop) whatever happens in the test.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Directory holding the workspace's built binaries (`target/<profile>`), found from the
/// running test executable (`target/<profile>/deps/<test>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir.parent().unwrap().to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Path of a built binary (`vllm-router`, `vllm-sim`); panics with a hint if missing.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built; run `cargo build --release --workspace` first",
        p.display()
    );
    p
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process stopped (SIGKILL by PID, then reaped) when dropped.
pub struct Proc {
    child: Option<Child>,
    /// Port it serves on.
    pub port: u16,
    /// Extra port (the router's metrics port), 0 if none.
    pub metrics_port: u16,
    /// The router's log lines so far (empty for simulators).
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Proc {
    /// Base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    /// Log lines containing `needle`.
    pub fn log_matching(&self, needle: &str) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }
    /// OS process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
    /// Stop it now (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    /// The exit status if the process has exited (reaps it), else `None`.
    pub fn try_exit_status(&mut self) -> Option<std::process::ExitStatus> {
        let s = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(s)
    }
    /// Send SIGTERM and wait up to `timeout` for exit; returns whether it exited.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(c) = self.child.as_mut() else {
            return true;
        };
        let _ = Command::new("kill")
            .args(["-s", "TERM", "--", &c.id().to_string()])
            .status();
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(_)) = c.try_wait() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Start a simulated worker with extra flags; returns once it listens.
pub fn start_sim(worker_id: &str, extra: &[&str]) -> Proc {
    let mut child = Command::new(bin("vllm-sim"))
        .args(["--port", "0", "--worker-id", worker_id])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn vllm-sim");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("sim stdout");
    let port = line
        .trim()
        .strip_prefix("LISTENING ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected sim output {line:?}"));
    Proc {
        child: Some(child),
        port,
        metrics_port: 0,
        log: Default::default(),
    }
}

/// Start `n` simulated workers named `w0..w{n-1}`.
pub fn start_sims(n: usize, extra: &[&str]) -> Vec<Proc> {
    (0..n).map(|i| start_sim(&format!("w{i}"), extra)).collect()
}

/// Start the router over `workers` with extra flags on `--port 0`; returns once it
/// logged the address it bound (`vllm-router listening on http://ADDR`), so there is no
/// bind-then-release race for the serving port. (The metrics port, where `0` means
/// "off", is still a free port found by binding.) The router's log (stdout) is kept in
/// [`Proc::log`]; lines above INFO are echoed to this process's stderr.
pub fn start_router(workers: &[String], extra: &[&str]) -> Proc {
    let mut cmd = Command::new(bin("vllm-router"));
    let with_metrics = !extra.windows(2).any(|w| w[0] == "--prometheus-port");
    cmd.args(["--port", "0"]);
    if !extra.contains(&"--log-level") {
        cmd.args(["--log-level", "warn,vllm_router::app=info"]);
    }
    if with_metrics {
        cmd.args(["--prometheus-port", &free_port().to_string()]);
    }
    if !workers.is_empty() {
        cmd.arg("--worker-urls").args(workers);
    }
    cmd.args(extra);
    spawn_router(cmd)
}

/// Spawn a prepared router command (`vllm-router …` or `vllm-router serve …`) with its
/// stdout captured; returns once it logged `vllm-router listening on http://ADDR` (30 s).
pub fn spawn_router(mut cmd: Command) -> Proc {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn vllm-router");
    let stderr = child.stdout.take().expect("router stdout");
    let (tx, rx) = std::sync::mpsc::channel::<(u16, u16)>();
    let log: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let log2 = log.clone();
    std::thread::spawn(move || {
        let mut metrics_port = 0u16;
        let mut sent = false;
        let port_after = |line: &str, marker: &str| -> Option<u16> {
            let rest = &line[line.find(marker)? + marker.len()..];
            let addr: String = rest
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '/')
                .collect();
            addr.rsplit(':').next()?.parse().ok()
        };
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if !sent {
                if let Some(p) = port_after(&line, "metrics on http://") {
                    metrics_port = p;
                }
                if let Some(p) = port_after(&line, "vllm-router listening on http://")
                    .or_else(|| port_after(&line, "vllm-router listening on https://"))
                {
                    let _ = tx.send((p, metrics_port));
                    sent = true;
                }
            }
            if !line.contains(" INFO ") {
                eprintln!("{line}");
            }
            let mut l = log2.lock().unwrap();
            if l.len() < 100_000 {
                l.push(line);
            }
        }
    });
    let mut p = Proc {
        child: Some(child),
        port: 0,
        metrics_port: 0,
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((port, metrics_port)) = rx.recv_timeout(Duration::from_millis(20)) {
            p.port = port;
            p.metrics_port = metrics_port;
            return p;
        }
        if let Some(c) = p.child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                panic!("vllm-router exited at startup: {status}");
            }
        }
        assert!(
            Instant::now() < deadline,
            "router did not start within 30 s"
        );
    }
}

/// Path of a component built by the test command (`tests/run.sh`) with `--profile
/// policy` into `target/policy-wasm`: `least_inflight_policy`, `test_policy_pick_first`,
/// `test_policy_pick_last`, `test_policy_hostile`, `other_world`, or a built-in
/// `policy_*`.
pub fn policy_wasm(stem: &str) -> PathBuf {
    let p = workspace_root().join(format!(
        "target/policy-wasm/wasm32-wasip2/policy/{stem}.wasm"
    ));
    assert!(
        p.exists(),
        "{} missing: build it with tests/run.sh (cargo build --target wasm32-wasip2 --profile policy --target-dir target/policy-wasm -p ...)",
        p.display()
    );
    p
}

/// Path of a committed test fixture under `tests/fixtures/` (e.g. a component built from
/// an older contract's sources). Panics when it is missing.
pub fn fixture(rel: &str) -> PathBuf {
    let p = workspace_root().join("tests/fixtures").join(rel);
    assert!(p.exists(), "fixture {} missing", p.display());
    p
}

/// Path of the example `least_inflight` policy component.
pub fn example_policy_wasm() -> PathBuf {
    policy_wasm("least_inflight_policy")
}

/// A fresh temporary directory (removed when dropped).
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Create `$TMPDIR/vllm-router-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("vllm-router-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The router's Prometheus text (`/metrics` on its metrics port).
pub async fn router_metrics(router: &Proc) -> String {
    metrics_text(&format!("http://127.0.0.1:{}/metrics", router.metrics_port)).await
}

/// Sum of the samples of metric `name` whose label set contains every `labels` pair
/// (`k="v"` strings).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|kv| l.contains(kv)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Base URLs of simulated workers.
pub fn urls(sims: &[Proc]) -> Vec<String> {
    sims.iter().map(Proc::url).collect()
}

/// HTTP client for tests (30 s timeout).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A chat-completion body with one user message and `max_tokens: 4`.
pub fn chat_body(text: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({"model": "sim-model", "messages": [{"role": "user", "content": text}], "max_tokens": 4, "stream": stream})
}

/// POST a JSON body with extra headers.
pub async fn post_json(
    c: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> reqwest::Response {
    let mut rb = c.post(url).json(body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    rb.send().await.unwrap()
}

/// POST a small completion (`prompt`, `max_tokens: 1`) to `router` and assert 200;
/// returns the response (body unread).
pub async fn post_completion(
    c: &reqwest::Client,
    router: &Proc,
    prompt: &str,
) -> reqwest::Response {
    let r = post_json(
        c,
        &format!("{}/v1/completions", router.url()),
        &[],
        &serde_json::json!({"model": "sim-model", "prompt": prompt, "max_tokens": 1}),
    )
    .await;
    assert_eq!(r.status(), 200, "completion through {}", router.url());
    r
}

/// Requests a simulated worker recorded (`GET /sim/requests`).
/// The text of a Prometheus exposition at `url` (a router's or simulator's `/metrics`).
pub async fn metrics_text(url: &str) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Poll until `p` logged at least `n` lines containing `needle` (or `within` passed),
/// then return the matching lines.
pub async fn wait_log(p: &Proc, needle: &str, n: usize, within: Duration) -> Vec<String> {
    let end = Instant::now() + within;
    loop {
        let l = p.log_matching(needle);
        if l.len() >= n || Instant::now() > end {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn sim_requests(sim: &Proc) -> Vec<serde_json::Value> {
    client()
        .get(format!("{}/sim/requests", sim.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The simulated worker that answered (`x-vllm-sim-worker`); panics if the header is
/// missing (the response did not come from a simulated worker).
pub fn worker_of(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-vllm-sim-worker")
        .and_then(|v| v.to_str().ok())
        .expect("response has no x-vllm-sim-worker header")
        .to_string()
}

/// GET `url` and parse the JSON answer.
pub async fn get_json(c: &reqwest::Client, url: &str) -> serde_json::Value {
    c.get(url).send().await.unwrap().json().await.unwrap()
}

/// Change a simulated worker's knobs at run time (`POST /sim/config`).
pub async fn set_sim(sim: &Proc, cfg: serde_json::Value) {
    let r = client()
        .post(format!("{}/sim/config", sim.url()))
        .json(&cfg)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "POST /sim/config {cfg}");
}

/// Certificates made at test time (rcgen) and a TLS front for simulated workers.
pub mod tls {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    use std::sync::Arc;

    /// A certificate authority that signs test certificates.
    pub struct Ca {
        /// The CA certificate, PEM.
        pub cert_pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    /// A certificate and its key, PEM.
    pub struct Cert {
        /// Certificate, PEM.
        pub cert_pem: String,
        /// Private key, PEM.
        pub key_pem: String,
    }

    impl Ca {
        /// A new self-signed CA named `name`.
        pub fn new(name: &str) -> Ca {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let cert = p.self_signed(&key).unwrap();
            Ca {
                cert_pem: cert.pem(),
                issuer: Issuer::new(p, key),
            }
        }

        /// A leaf for `127.0.0.1` and `localhost` with common name `cn` (server or
        /// client use).
        pub fn leaf(&self, cn: &str) -> Cert {
            let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            p.subject_alt_names
                .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
            p.distinguished_name.push(DnType::CommonName, cn);
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &self.issuer).unwrap();
            Cert {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            }
        }
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn certs(pem: &str) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn key(pem: &str) -> rustls_pki_types::PrivateKeyDer<'static> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    /// A TLS terminator on a free 127.0.0.1 port in front of `backend_port` (plain
    /// TCP), serving `cert`; with `client_ca`, only clients with a certificate signed by
    /// it get through (mTLS). Counts completed handshakes. Stops when dropped.
    pub struct TlsFront {
        /// The TLS port.
        pub port: u16,
        /// Handshakes completed.
        pub handshakes: Arc<std::sync::atomic::AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for TlsFront {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl TlsFront {
        /// Start it (inside a Tokio runtime).
        pub async fn start(backend_port: u16, cert: &Cert, client_ca: Option<&str>) -> TlsFront {
            let b = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap();
            let b = match client_ca {
                Some(ca) => {
                    let mut roots = rustls::RootCertStore::empty();
                    for c in certs(ca) {
                        roots.add(c).unwrap();
                    }
                    let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                        Arc::new(roots),
                        provider(),
                    )
                    .build()
                    .unwrap();
                    b.with_client_cert_verifier(v)
                }
                None => b.with_no_client_auth(),
            };
            let cfg = b
                .with_single_cert(certs(&cert.cert_pem), key(&cert.key_pem))
                .unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let handshakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let hs = handshakes.clone();
            let task = tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let (acceptor, hs) = (acceptor.clone(), hs.clone());
                    tokio::spawn(async move {
                        let Ok(mut tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        hs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Ok(mut back) =
                            tokio::net::TcpStream::connect(("127.0.0.1", backend_port)).await
                        else {
                            return;
                        };
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut back).await;
                    });
                }
            });
            TlsFront {
                port,
                handshakes,
                task,
            }
        }
    }

    /// A reqwest client trusting only `ca_pem` (rustls), optionally presenting
    /// `identity`; a new connection per request, with the server's certificate in each
    /// response's `reqwest::tls::TlsInfo`.
    pub fn client(ca_pem: &str, identity: Option<&Cert>) -> reqwest::Client {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
            .tls_info(true)
            .pool_max_idle_per_host(0)
            .timeout(std::time::Duration::from_secs(30));
        if let Some(id) = identity {
            let pem = format!("{}{}", id.key_pem, id.cert_pem);
            b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
        }
        b.build().unwrap()
    }
}
