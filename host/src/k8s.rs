//! Kubernetes service discovery: pods matching a label selector become workers, and
//! leave (drained) when they stop qualifying. Flags compatible with vllm-project/router
//! (`--service-discovery`, `--selector`, `--service-discovery-namespace`,
//! `--service-discovery-port`, `--prefill-selector`, `--decode-selector`).
//!
//! Design (after SMG's, `model_gateway/src/service_discovery.rs`, and unlike
//! vllm-project/router's, which reacts to individual events and so keeps a pod deleted
//! while its watch was down forever — production-stack #1091):
//! - **Watch**: kube-rs `watcher` + `reflector` on pods, the label selector sent to the
//!   API server; a broken watch or a 410 `Expired` makes kube-rs re-list, and the store
//!   is replaced wholesale when the re-list completes (`InitDone`).
//! - **Reconcile, level-triggered**: after every change (coalesced) and every
//!   `--service-discovery-resync-secs`, the *desired* workers (from the store) are diffed
//!   against the workers discovery *owns* (labelled `source=kubernetes`, `pod-uid`,
//!   `pod-name`, `pod-namespace`). Workers added by hand are never touched.
//! - **Wanted** iff the pod matches, has a UID and a pod IP, is `Running` with condition
//!   `Ready=True`, and has no `deletionTimestamp`. URL `http://IP:PORT` (IPv6
//!   bracketed); one worker per port of the `vllm.ai/worker-ports` annotation
//!   (`smg.ai/worker-ports` accepted), else `--service-discovery-port`. A prefill pod's
//!   `vllm.ai/bootstrap-port` becomes the worker label `bootstrap-port`.
//! - **Drain**: a worker no longer wanted gets no new requests at once, its in-flight
//!   requests and streams finish, and it leaves the registry (and so the policies' worker
//!   set and every metric) once `--drain-settle-secs` have passed and nothing is in
//!   flight (at most 10 minutes after the drain began).

use crate::metrics::Metrics;
use crate::workers::Registry;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vllm_router_sdk::Role;

/// Annotation listing the ports of a multi-port pod (`"8000,8001"`): one worker each.
pub const PORTS_ANNOTATION: &str = "vllm.ai/worker-ports";
/// SMG's spelling of the same annotation, also accepted.
pub const SMG_PORTS_ANNOTATION: &str = "smg.ai/worker-ports";
/// Annotation carrying a prefill pod's bootstrap port (vllm-project/router's name).
pub const BOOTSTRAP_ANNOTATION: &str = "vllm.ai/bootstrap-port";
/// Longest a drain waits for in-flight requests before the worker is removed anyway.
const DRAIN_MAX: Duration = Duration::from_secs(600);

/// Discovery settings (from the flags).
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// `--selector`: labels every regular worker pod carries.
    pub selector: BTreeMap<String, String>,
    /// PD mode: `--prefill-selector` / `--decode-selector`.
    pub pd: Option<(BTreeMap<String, String>, BTreeMap<String, String>)>,
    /// `--service-discovery-namespace` (None = all namespaces).
    pub namespace: Option<String>,
    /// `--service-discovery-port`: the worker port when a pod has no ports annotation.
    pub port: u16,
    /// `--drain-settle-secs`.
    pub drain_settle: Duration,
    /// `--service-discovery-resync-secs`: reconcile at least this often.
    pub resync: Duration,
    /// `--intra-node-data-parallel-size`.
    pub dp_size: u32,
}

/// Parse `k=v` selector arguments. Errors name the malformed one.
pub fn parse_selector(items: &[String]) -> Result<BTreeMap<String, String>, String> {
    items
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.trim().is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(format!("selector '{kv}' is not KEY=VALUE")),
        })
        .collect()
}

/// What the API server is asked for: the selector (regular mode), or the pairs both PD
/// selectors share (PD mode; each pod is then classified client-side).
pub fn server_selector(cfg: &DiscoveryConfig) -> String {
    let pairs: Vec<(String, String)> = match &cfg.pd {
        None => cfg.selector.clone().into_iter().collect(),
        Some((p, d)) => p
            .iter()
            .filter(|(k, v)| d.get(*k) == Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// One worker discovery wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// The pod's UID (a re-created pod has a new one).
    pub uid: String,
    /// Role from the matching selector.
    pub role: Role,
    /// Labels given to the worker (source, pod name/namespace/uid, bootstrap port).
    pub labels: Vec<(String, String)>,
}

fn matches(labels: Option<&BTreeMap<String, String>>, sel: &BTreeMap<String, String>) -> bool {
    sel.iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The workers (URL → desired) the pods call for. Pure: unit-tested without a cluster.
pub fn desired(pods: &[Arc<Pod>], cfg: &DiscoveryConfig) -> BTreeMap<String, Desired> {
    let mut out = BTreeMap::new();
    for pod in pods {
        let meta = &pod.metadata;
        let labels = meta.labels.as_ref();
        let role = match &cfg.pd {
            None if matches(labels, &cfg.selector) => Role::Regular,
            None => continue,
            Some((p, _)) if matches(labels, p) => Role::Prefill,
            Some((_, d)) if matches(labels, d) => Role::Decode,
            Some(_) => continue,
        };
        let (Some(uid), Some(name)) = (&meta.uid, &meta.name) else {
            continue;
        };
        if meta.deletion_timestamp.is_some() {
            continue;
        }
        let Some(status) = &pod.status else { continue };
        let running = status.phase.as_deref() == Some("Running");
        let ready = status
            .conditions
            .as_ref()
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let Some(ip) = status.pod_ip.as_deref().filter(|ip| !ip.is_empty()) else {
            continue;
        };
        if !running || !ready {
            continue;
        }
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        let ann = meta.annotations.as_ref();
        let ports: Vec<u16> = ann
            .and_then(|a| {
                a.get(PORTS_ANNOTATION)
                    .or_else(|| a.get(SMG_PORTS_ANNOTATION))
            })
            .map(|v| {
                let mut seen = Vec::new();
                for p in v.split(',').filter_map(|p| p.trim().parse::<u16>().ok()) {
                    if p > 0 && !seen.contains(&p) {
                        seen.push(p);
                    }
                }
                seen
            })
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| vec![cfg.port]);
        let mut wl = vec![
            ("source".to_string(), "kubernetes".to_string()),
            ("pod-name".to_string(), name.clone()),
            (
                "pod-namespace".to_string(),
                meta.namespace.clone().unwrap_or_default(),
            ),
            ("pod-uid".to_string(), uid.clone()),
        ];
        if role == Role::Prefill {
            if let Some(b) = ann.and_then(|a| a.get(BOOTSTRAP_ANNOTATION)) {
                wl.push(("bootstrap-port".to_string(), b.clone()));
            }
        }
        for port in ports {
            out.insert(
                format!("http://{host}:{port}"),
                Desired {
                    uid: uid.clone(),
                    role,
                    labels: wl.clone(),
                },
            );
        }
    }
    out
}

/// A worker discovery registered.
#[derive(Debug, Clone)]
struct Owned {
    uid: String,
    role: Role,
    /// When its drain began (None: serving).
    draining_since: Option<Instant>,
    reason: &'static str,
}

/// Reconcile state and its counters.
pub struct Reconciler {
    cfg: DiscoveryConfig,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    owned: HashMap<String, Owned>,
}

impl Reconciler {
    /// A reconciler with nothing owned yet.
    pub fn new(cfg: DiscoveryConfig, registry: Arc<Registry>, metrics: Arc<Metrics>) -> Self {
        Reconciler {
            cfg,
            registry,
            metrics,
            owned: HashMap::new(),
        }
    }

    /// One pass: add wanted workers, drain unwanted ones, remove drained ones whose
    /// settle time passed and that have nothing in flight. Returns whether a drain is
    /// still in progress (the caller then passes again soon).
    pub fn pass(&mut self, pods: &[Arc<Pod>], now: Instant) -> bool {
        let want = desired(pods, &self.cfg);
        let snapshot = self.registry.snapshot();
        // Drain what is no longer wanted (or now belongs to another pod or role).
        for (url, o) in self.owned.iter_mut() {
            let reason = match want.get(url) {
                None => Some(
                    if pods
                        .iter()
                        .any(|p| p.metadata.uid.as_deref() == Some(&o.uid))
                    {
                        "pod_not_ready"
                    } else {
                        "pod_gone"
                    },
                ),
                Some(d) if d.uid != o.uid => Some("pod_replaced"),
                Some(d) if d.role != o.role => Some("role_changed"),
                Some(_) => None,
            };
            match (reason, o.draining_since) {
                (Some(r), None) => {
                    o.draining_since = Some(now);
                    o.reason = r;
                    self.registry.set_draining(url, true);
                    tracing::info!(worker = %url, reason = r, "discovery: draining worker");
                }
                (None, Some(_)) => {
                    o.draining_since = None;
                    self.registry.set_draining(url, false);
                    tracing::info!(worker = %url, "discovery: worker wanted again; drain cancelled");
                }
                _ => {}
            }
        }
        // Remove drained workers.
        let in_flight = |url: &str| -> u32 {
            snapshot
                .workers
                .iter()
                .filter(|w| w.url == url)
                .map(|w| w.in_flight())
                .sum()
        };
        let done: Vec<String> = self
            .owned
            .iter()
            .filter_map(|(url, o)| {
                let since = o.draining_since?;
                let settled = now.duration_since(since) >= self.cfg.drain_settle;
                let forced = now.duration_since(since) >= self.cfg.drain_settle + DRAIN_MAX;
                ((settled && in_flight(url) == 0) || forced).then(|| url.clone())
            })
            .collect();
        for url in done {
            let o = self.owned.remove(&url).expect("owned");
            self.registry.remove(&url);
            self.metrics
                .discovery_deregistrations
                .with_label_values(&[o.reason])
                .inc();
            tracing::info!(worker = %url, reason = o.reason, "discovery: worker removed");
        }
        // Add what is wanted and not there (a URL added by hand is left alone).
        let snapshot = self.registry.snapshot();
        for (url, d) in &want {
            if self.owned.contains_key(url) {
                continue;
            }
            if snapshot.workers.iter().any(|w| w.url == *url) {
                tracing::debug!(worker = %url, "discovery: URL already registered by hand; left alone");
                continue;
            }
            match self
                .registry
                .add_labeled(url, d.role, self.cfg.dp_size, d.labels.clone())
            {
                Ok(_) => {
                    self.owned.insert(
                        url.clone(),
                        Owned {
                            uid: d.uid.clone(),
                            role: d.role,
                            draining_since: None,
                            reason: "",
                        },
                    );
                    self.metrics
                        .discovery_registrations
                        .with_label_values(&["pod_ready"])
                        .inc();
                    tracing::info!(worker = %url, role = ?d.role, "discovery: worker added");
                }
                Err(e) => tracing::warn!(worker = %url, "discovery: cannot add worker: {e}"),
            }
        }
        let draining = self
            .owned
            .values()
            .filter(|o| o.draining_since.is_some())
            .count();
        self.metrics
            .discovery_workers
            .with_label_values(&["serving"])
            .set((self.owned.len() - draining) as i64);
        self.metrics
            .discovery_workers
            .with_label_values(&["draining"])
            .set(draining as i64);
        draining > 0
    }
}

/// Start discovery: the watch and the reconcile loop (both Tokio tasks). `synced` turns
/// true after the first complete list has been reconciled (`/readiness` waits for it).
/// Errors: no Kubernetes configuration found (in-cluster or kubeconfig).
pub async fn start(
    cfg: DiscoveryConfig,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    synced: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let client = Client::try_default().await.map_err(|e| {
        anyhow::anyhow!(
            "--service-discovery: no Kubernetes configuration (in-cluster service account or kubeconfig): {e}"
        )
    })?;
    let api: Api<Pod> = match &cfg.namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let selector = server_selector(&cfg);
    let mut wcfg = watcher::Config::default();
    if !selector.is_empty() {
        wcfg = wcfg.labels(&selector);
    }
    tracing::info!(
        selector = %selector,
        namespace = cfg.namespace.as_deref().unwrap_or("(all)"),
        "Kubernetes discovery: watching pods"
    );
    let (store, writer) = reflector::store::<Pod>();
    let changed = Arc::new(tokio::sync::Notify::new());
    let stream = watcher(api, wcfg).default_backoff().reflect(writer);
    {
        let changed = changed.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Init) => {
                        tracing::debug!("Kubernetes discovery: (re-)listing pods");
                    }
                    Ok(watcher::Event::InitApply(_)) => {}
                    Ok(_) => changed.notify_one(),
                    Err(e) => {
                        metrics.discovery_watch_restarts.inc();
                        tracing::warn!(
                            "Kubernetes discovery: watch error (retrying with backoff): {e}"
                        );
                    }
                }
            }
        });
    }
    let resync = cfg.resync;
    let mut rec = Reconciler::new(cfg, registry, metrics.clone());
    tokio::spawn(async move {
        reconcile_loop(&mut rec, store, changed, resync, metrics, synced).await;
    });
    Ok(())
}

async fn reconcile_loop(
    rec: &mut Reconciler,
    store: Store<Pod>,
    changed: Arc<tokio::sync::Notify>,
    resync: Duration,
    metrics: Arc<Metrics>,
    synced: Arc<AtomicBool>,
) {
    if store.wait_until_ready().await.is_err() {
        tracing::error!("Kubernetes discovery: the pod store was dropped before its first list");
        return;
    }
    loop {
        let draining = rec.pass(&store.state(), Instant::now());
        metrics.discovery_last_sync.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        );
        if !synced.swap(true, Ordering::Relaxed) {
            tracing::info!("Kubernetes discovery: first sync done");
        }
        // While a drain runs, pass every 250 ms to remove it on time; else wait for a
        // change (coalesced over 100 ms) or the resync interval.
        let wait = if draining {
            Duration::from_millis(250)
        } else {
            resync
        };
        if tokio::time::timeout(wait, changed.notified()).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn cfg() -> DiscoveryConfig {
        DiscoveryConfig {
            selector: parse_selector(&["app=vllm".into()]).unwrap(),
            pd: None,
            namespace: Some("default".into()),
            port: 8000,
            drain_settle: Duration::from_secs(5),
            resync: Duration::from_secs(60),
            dp_size: 1,
        }
    }

    fn pod(name: &str, ip: &str, ready: bool) -> Arc<Pod> {
        Arc::new(Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                uid: Some(format!("uid-{name}")),
                labels: Some([("app".to_string(), "vllm".to_string())].into()),
                ..Default::default()
            },
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(ip.into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[test]
    fn only_matching_running_ready_pods_with_an_ip_are_wanted() {
        let mut other = (*pod("x", "10.0.0.9", true)).clone();
        other.metadata.labels = Some([("app".to_string(), "other".to_string())].into());
        let mut terminating = (*pod("t", "10.0.0.8", true)).clone();
        terminating.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let mut no_ip = (*pod("n", "", true)).clone();
        no_ip.status.as_mut().unwrap().pod_ip = None;
        let pods = vec![
            pod("a", "10.0.0.1", true),
            pod("b", "10.0.0.2", false),
            Arc::new(other),
            Arc::new(terminating),
            Arc::new(no_ip),
            pod("v6", "fd00::1", true),
        ];
        let d = desired(&pods, &cfg());
        let urls: Vec<&str> = d.keys().map(String::as_str).collect();
        assert_eq!(urls, ["http://10.0.0.1:8000", "http://[fd00::1]:8000"]);
        assert!(
            d["http://10.0.0.1:8000"]
                .labels
                .contains(&("pod-uid".into(), "uid-a".into()))
        );
    }

    #[test]
    fn a_ports_annotation_gives_one_worker_per_port() {
        let mut p = (*pod("m", "10.0.0.3", true)).clone();
        p.metadata.annotations = Some(
            [(
                PORTS_ANNOTATION.to_string(),
                "8001, 8002,8001,x".to_string(),
            )]
            .into(),
        );
        let d = desired(&[Arc::new(p)], &cfg());
        let urls: Vec<&str> = d.keys().map(String::as_str).collect();
        assert_eq!(urls, ["http://10.0.0.3:8001", "http://10.0.0.3:8002"]);
    }

    #[test]
    fn pd_pods_get_their_role_and_the_server_sees_the_shared_selector() {
        let mut c = cfg();
        c.pd = Some((
            parse_selector(&["app=vllm,role=prefill".into()]).unwrap(),
            parse_selector(&["app=vllm".into(), "role=decode".into()]).unwrap(),
        ));
        assert_eq!(server_selector(&c), "app=vllm");
        let mut p = (*pod("p", "10.0.0.4", true)).clone();
        p.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("role".into(), "prefill".into());
        p.metadata.annotations =
            Some([(BOOTSTRAP_ANNOTATION.to_string(), "8998".to_string())].into());
        let mut d = (*pod("d", "10.0.0.5", true)).clone();
        d.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("role".into(), "decode".into());
        let want = desired(&[Arc::new(p), Arc::new(d)], &c);
        assert_eq!(want["http://10.0.0.4:8000"].role, Role::Prefill);
        assert!(
            want["http://10.0.0.4:8000"]
                .labels
                .contains(&("bootstrap-port".into(), "8998".into()))
        );
        assert_eq!(want["http://10.0.0.5:8000"].role, Role::Decode);
        assert!(parse_selector(&["novalue".into()]).is_err());
    }

    #[test]
    fn reconcile_adds_drains_then_removes_and_never_touches_manual_workers() {
        let registry = Arc::new(Registry::default());
        registry
            .add("http://10.0.0.100:8000", Role::Regular, 1)
            .unwrap();
        let mut r = Reconciler::new(cfg(), registry.clone(), Arc::new(Metrics::new()));
        let t0 = Instant::now();
        r.pass(
            &[pod("a", "10.0.0.1", true), pod("b", "10.0.0.2", true)],
            t0,
        );
        let urls = |r: &Registry| -> Vec<String> {
            r.snapshot().workers.iter().map(|w| w.url.clone()).collect()
        };
        assert_eq!(urls(&registry).len(), 3);
        // b disappears (force delete, or deleted while the watch was down): drained...
        let draining = r.pass(&[pod("a", "10.0.0.1", true)], t0);
        assert!(draining);
        let b = registry.snapshot();
        let bw = b
            .workers
            .iter()
            .find(|w| w.url == "http://10.0.0.2:8000")
            .unwrap();
        assert!(bw.is_draining(), "no new requests during the drain");
        // ...still there before the settle time, gone after it.
        r.pass(&[pod("a", "10.0.0.1", true)], t0 + Duration::from_secs(4));
        assert_eq!(urls(&registry).len(), 3);
        r.pass(&[pod("a", "10.0.0.1", true)], t0 + Duration::from_secs(6));
        let left = urls(&registry);
        assert_eq!(left.len(), 2);
        assert!(
            left.contains(&"http://10.0.0.100:8000".to_string()),
            "manual worker kept"
        );
        // A re-created pod with the same IP and a new UID replaces the old worker.
        let mut again = (*pod("a", "10.0.0.1", true)).clone();
        again.metadata.uid = Some("uid-a-2".into());
        r.pass(&[Arc::new(again.clone())], t0 + Duration::from_secs(7));
        r.pass(&[Arc::new(again)], t0 + Duration::from_secs(13));
        let s = registry.snapshot();
        let a: Vec<_> = s
            .workers
            .iter()
            .filter(|w| w.url == "http://10.0.0.1:8000")
            .collect();
        assert_eq!(a.len(), 1);
        assert!(a[0].labels.contains(&("pod-uid".into(), "uid-a-2".into())));
    }
}
