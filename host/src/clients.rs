//! Client authentication and per-key limits (`--client-api-keys-file`), and the
//! token bucket behind both the per-key and the global request rate
//! (`--rate-limit-tokens-per-second`).
//!
//! The keys file is TOML; keys are stored **hashed** (SHA-256, hex), never in clear:
//!
//! ```toml
//! [defaults]                 # optional, for every key without its own values
//! requests_per_second = 20   # token bucket refill; absent = no rate limit
//! burst = 40                 # bucket size (default: one second's worth, at least 1)
//! max_concurrent = 8         # requests in flight (a stream counts to its end)
//!
//! [[key]]
//! name = "team-search"       # shown in logs and metrics, never the key
//! sha256 = "9f86d081884c7d65…"
//! max_concurrent = 32        # overrides the default
//! ```
//!
//! `vllm-router keys new NAME --file keys.toml` makes a key, prints it once and adds its
//! hash. The file is re-read when it changes; a bad file is logged and counted, and the
//! previous keys stay. A key whose name and limits are unchanged keeps its bucket and its
//! in-flight count across reloads. Clients send `Authorization: Bearer KEY`; a missing or
//! unknown key gets 401, a key over its limits 429 with `Retry-After`. `/health`,
//! `/liveness` and `/readiness` stay open.

use arc_swap::ArcSwap;
use http::HeaderMap;
use parking_lot::Mutex;
use serde::Deserialize;
use sha2::Digest;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A token bucket: `rate` tokens per second, at most `burst`, one token per request.
/// Starts full. Uses Tokio's clock (paused in tests).
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// `rate` per second (> 0), bucket of `burst` (≥ 1).
    pub fn new(rate: f64, burst: f64) -> Self {
        let burst = burst.max(1.0);
        TokenBucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Take one token, or say how long until one is there.
    pub fn try_take(&self) -> Result<(), Duration> {
        let mut s = self.state.lock();
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
        s.0 = (s.0 + refill).min(self.burst);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - s.0) / self.rate))
        }
    }
}

/// `Retry-After` seconds for a wait (rounded up, at least 1).
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs_f64().ceil() as u64).max(1)
}

/// A key's limits, as written in the file (absent = unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimits {
    /// Requests per second (token bucket refill).
    pub requests_per_second: Option<f64>,
    /// Bucket size; default one second's worth (at least 1).
    pub burst: Option<f64>,
    /// Requests in flight at once.
    pub max_concurrent: Option<u32>,
}

impl KeyLimits {
    fn or(self, d: KeyLimits) -> KeyLimits {
        KeyLimits {
            requests_per_second: self.requests_per_second.or(d.requests_per_second),
            burst: self.burst.or(d.burst),
            max_concurrent: self.max_concurrent.or(d.max_concurrent),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    sha256: String,
    #[serde(flatten)]
    limits: KeyLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    defaults: KeyLimits,
    #[serde(default)]
    key: Vec<KeyEntry>,
}

/// One client key (by name) with its limiter state.
#[derive(Debug)]
pub struct ClientKey {
    /// The key's name (for logs and metrics; the key itself is never kept).
    pub name: String,
    limits: KeyLimits,
    bucket: Option<TokenBucket>,
    concurrency: Option<Arc<tokio::sync::Semaphore>>,
}

/// Why a key's request was refused, with the `Retry-After` wait.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refusal {
    /// Over `requests_per_second`.
    RateLimited(Duration),
    /// At `max_concurrent`.
    ConcurrencyLimited,
}

impl ClientKey {
    fn new(name: String, limits: KeyLimits) -> Self {
        let bucket = limits
            .requests_per_second
            .map(|r| TokenBucket::new(r, limits.burst.unwrap_or(r)));
        let concurrency = limits
            .max_concurrent
            .map(|n| Arc::new(tokio::sync::Semaphore::new(n as usize)));
        ClientKey {
            name,
            limits,
            bucket,
            concurrency,
        }
    }

    /// Take a rate token and, when the key has a concurrency limit, an in-flight permit
    /// (hold it until the response ends).
    pub fn admit(&self) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, Refusal> {
        if let Some(b) = &self.bucket {
            b.try_take().map_err(Refusal::RateLimited)?;
        }
        match &self.concurrency {
            None => Ok(None),
            Some(s) => s
                .clone()
                .try_acquire_owned()
                .map(Some)
                .map_err(|_| Refusal::ConcurrencyLimited),
        }
    }
}

/// Why authentication failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A key that is not in the file.
    Invalid,
}

type Table = HashMap<[u8; 32], Arc<ClientKey>>;

/// The loaded keys file.
pub struct ClientKeys {
    path: PathBuf,
    table: ArcSwap<Table>,
}

fn parse(text: &str, old: &Table) -> Result<Table, String> {
    let file: KeysFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let by_name: HashMap<&str, &Arc<ClientKey>> =
        old.values().map(|k| (k.name.as_str(), k)).collect();
    let mut table = Table::new();
    let mut names = std::collections::HashSet::new();
    for e in file.key {
        if e.name.is_empty() || !names.insert(e.name.clone()) {
            return Err(format!("key name {:?} is empty or repeated", e.name));
        }
        let mut hash = [0u8; 32];
        hex::decode_to_slice(e.sha256.trim(), &mut hash).map_err(|_| {
            format!(
                "key {:?}: sha256 must be 64 hex digits (the SHA-256 of the key; see `vllm-router keys new`)",
                e.name
            )
        })?;
        let limits = e.limits.or(file.defaults);
        if limits
            .requests_per_second
            .is_some_and(|r| !(r > 0.0 && r.is_finite()))
            || limits.burst.is_some_and(|b| !(b >= 1.0 && b.is_finite()))
            || limits.max_concurrent == Some(0)
        {
            return Err(format!(
                "key {:?}: requests_per_second must be > 0, burst >= 1, max_concurrent >= 1",
                e.name
            ));
        }
        // Unchanged name and limits: keep the bucket and the in-flight count.
        let key = match by_name.get(e.name.as_str()) {
            Some(k) if k.limits == limits => Arc::clone(k),
            _ => Arc::new(ClientKey::new(e.name, limits)),
        };
        if table.insert(hash, key).is_some() {
            return Err("two keys have the same sha256".into());
        }
    }
    Ok(table)
}

/// Parse a keys file's text as [`ClientKeys::reload`] does; returns the number of keys.
/// Errors: as the file's load (for tools and the fuzz target).
pub fn parse_keys_file(text: &str) -> Result<usize, String> {
    parse(text, &Table::new()).map(|t| t.len())
}

impl ClientKeys {
    /// Load `path`. Errors: unreadable file, bad TOML, bad hash or limits (the message
    /// names the file and the key).
    pub fn load(path: &Path) -> Result<Arc<Self>, String> {
        let keys = ClientKeys {
            path: path.to_path_buf(),
            table: ArcSwap::from_pointee(Table::new()),
        };
        keys.reload()?;
        Ok(Arc::new(keys))
    }

    /// Re-read the file; on error the previous keys stay. Returns the number of keys.
    pub fn reload(&self) -> Result<usize, String> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("cannot read {}: {e}", self.path.display()))?;
        let table = parse(&text, &self.table.load())
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        let n = table.len();
        self.table.store(Arc::new(table));
        Ok(n)
    }

    /// The key named by `Authorization: Bearer KEY`. Keys are looked up by their
    /// SHA-256, so the comparison never touches the secret byte by byte.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<ClientKey>, AuthError> {
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Missing)?;
        let hash: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        self.table
            .load()
            .get(&hash)
            .cloned()
            .ok_or(AuthError::Invalid)
    }
}

/// `vllm-router keys new NAME [--file F]`: make a random key, add its hash to the file
/// (created with mode 0600), print the key once. `vllm-router keys hash`: SHA-256 of a
/// key read from stdin, for keys made elsewhere. Returns the exit code.
pub fn keys_command(argv: &[String]) -> i32 {
    const HELP: &str = "\
Usage: vllm-router keys new NAME [--file FILE] [--max-concurrent N] [--requests-per-second R]
       vllm-router keys hash < key.txt

Client API keys for --client-api-keys-file (stored as SHA-256, never in clear).
  new   make a random key, append `[[key]] name = NAME, sha256 = ...` (and the limits
        given) to FILE (default: client-keys.toml; created 0600), print the key once
  hash  print the SHA-256 hex of the key on stdin (for keys made elsewhere)
";
    let args = &argv[2.min(argv.len())..];
    match args.first().map(String::as_str) {
        Some("hash") => {
            let mut s = String::new();
            if std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).is_err() {
                eprintln!("error: cannot read the key from stdin");
                return 2;
            }
            println!("{}", hex::encode(sha2::Sha256::digest(s.trim().as_bytes())));
            0
        }
        Some("new") => {
            let mut name = None;
            let mut file = PathBuf::from("client-keys.toml");
            let mut extra = String::new();
            let mut i = 1;
            while i < args.len() {
                let a = args[i].as_str();
                let val = args.get(i + 1);
                match (a, val) {
                    ("--file", Some(v)) => file = PathBuf::from(v),
                    ("--max-concurrent", Some(v)) if v.parse::<u32>().is_ok_and(|n| n > 0) => {
                        extra.push_str(&format!("max_concurrent = {v}\n"))
                    }
                    ("--requests-per-second", Some(v))
                        if v.parse::<f64>().is_ok_and(|r| r > 0.0) =>
                    {
                        extra.push_str(&format!("requests_per_second = {v}\n"))
                    }
                    (n, _) if !n.starts_with('-') && name.is_none() => {
                        name = Some(n.to_string());
                        i += 1;
                        continue;
                    }
                    _ => {
                        eprintln!("error: unexpected or invalid argument {a:?}\n\n{HELP}");
                        return 2;
                    }
                }
                i += 2;
            }
            let Some(name) = name.filter(|n| {
                n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            }) else {
                eprintln!(
                    "error: keys new needs a NAME of letters, digits, '-', '_', '.'\n\n{HELP}"
                );
                return 2;
            };
            let key = format!("sk-vr-{}", hex::encode(rand::random::<[u8; 24]>()));
            let hash = hex::encode(sha2::Sha256::digest(key.as_bytes()));
            let entry = format!("\n[[key]]\nname = \"{name}\"\nsha256 = \"{hash}\"\n{extra}");
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let r = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&file)
                .and_then(|mut f| f.write_all(entry.as_bytes()));
            if let Err(e) = r {
                eprintln!("error: cannot write {}: {e}", file.display());
                return 1;
            }
            eprintln!(
                "added key {name:?} to {} (only its hash); the key, shown once:",
                file.display()
            );
            println!("{key}");
            0
        }
        Some("-h") | Some("--help") | None => {
            print!("{HELP}");
            0
        }
        Some(other) => {
            eprintln!("error: unknown keys command {other:?}\n\n{HELP}");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(k: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {k}").parse().unwrap(),
        );
        h
    }

    fn sha(k: &str) -> String {
        hex::encode(sha2::Sha256::digest(k.as_bytes()))
    }

    #[tokio::test(start_paused = true)]
    async fn token_bucket_refills_at_its_rate_up_to_its_burst() {
        let b = TokenBucket::new(2.0, 3.0);
        for _ in 0..3 {
            assert!(b.try_take().is_ok());
        }
        let wait = b.try_take().unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert_eq!(retry_after_secs(wait), 1);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(b.try_take().is_ok());
        assert!(b.try_take().is_err());
        // A long pause refills to the burst, not beyond.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            assert!(b.try_take().is_ok());
        }
        assert!(b.try_take().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn keys_authenticate_by_hash_and_enforce_their_limits() {
        let text = format!(
            "[defaults]\nmax_concurrent = 2\n\n[[key]]\nname = \"a\"\nsha256 = \"{}\"\nrequests_per_second = 1\nburst = 2\n\n[[key]]\nname = \"b\"\nsha256 = \"{}\"\n",
            sha("key-a"),
            sha("key-b")
        );
        let table = parse(&text, &Table::new()).unwrap();
        let keys = ClientKeys {
            path: PathBuf::new(),
            table: ArcSwap::from_pointee(table),
        };
        assert_eq!(
            keys.authenticate(&HeaderMap::new()).unwrap_err(),
            AuthError::Missing
        );
        assert_eq!(
            keys.authenticate(&bearer("nope")).unwrap_err(),
            AuthError::Invalid
        );
        let a = keys.authenticate(&bearer("key-a")).unwrap();
        assert_eq!(a.name, "a");
        // Burst of 2, then rate-limited for 1 s.
        let p1 = a.admit().unwrap();
        let p2 = a.admit().unwrap();
        assert!(matches!(a.admit(), Err(Refusal::RateLimited(_))));
        tokio::time::advance(Duration::from_secs(1)).await;
        // The default max_concurrent = 2 is held by p1, p2.
        assert_eq!(a.admit().unwrap_err(), Refusal::ConcurrencyLimited);
        drop(p1);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(a.admit().unwrap().is_some());
        drop(p2);
        // b: no rate limit, 2 in flight.
        let b = keys.authenticate(&bearer("key-b")).unwrap();
        let held: Vec<_> = (0..2).map(|_| b.admit().unwrap()).collect();
        assert_eq!(b.admit().unwrap_err(), Refusal::ConcurrencyLimited);
        drop(held);
        // A reload with the same limits keeps the state; changed limits start afresh.
        let kept = parse(&text, &keys.table.load()).unwrap();
        let a2 = kept.values().find(|k| k.name == "a").unwrap();
        assert!(Arc::ptr_eq(a2, &a));
        let changed = parse(&text.replace("burst = 2", "burst = 5"), &keys.table.load()).unwrap();
        assert!(!Arc::ptr_eq(
            changed.values().find(|k| k.name == "a").unwrap(),
            &a
        ));
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let e = parse("[[key]]\nname = \"a\"\nsha256 = \"xyz\"\n", &Table::new()).unwrap_err();
        assert!(e.contains("64 hex digits"), "{e}");
        let h = sha("k");
        let e = parse(
            &format!(
                "[[key]]\nname = \"a\"\nsha256 = \"{h}\"\n[[key]]\nname = \"a\"\nsha256 = \"{h}\"\n"
            ),
            &Table::new(),
        )
        .unwrap_err();
        assert!(e.contains("repeated"), "{e}");
        let e = parse(
            &format!("[[key]]\nname = \"a\"\nsha256 = \"{h}\"\nmax_concurrent = 0\n"),
            &Table::new(),
        )
        .unwrap_err();
        assert!(e.contains("max_concurrent"), "{e}");
        assert!(parse("[[key]]\nname = \"a\"\nkey = \"plain\"\n", &Table::new()).is_err());
    }
}
