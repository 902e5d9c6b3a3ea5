//! Compiled components on disk, so a restart or a swap back to a version compiled before
//! is milliseconds instead of seconds (a Python policy takes ~6-10 s to compile here, a
//! JavaScript one ~9 s, Go ~1 s; deserialising any of them takes a few ms).
//!
//! Layout: one file per (component, engine) in a directory the router owns:
//! `<sha256 of the .wasm>-<engine compatibility hash, 16 hex>.cwasm`, holding the
//! SHA-256 of the serialised bytes (32 bytes) followed by those bytes. Written to a
//! temporary file and renamed (readers never see a partial file); at most
//! [`MAX_FILES`] files, the least recently written removed first.

use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Compiled components kept on disk (a Python component is ~30 MB compiled).
pub const MAX_FILES: usize = 16;

/// A directory of compiled components for one engine configuration.
#[derive(Debug, Clone)]
pub struct DiskCache {
    dir: PathBuf,
    engine_hash: String,
}

impl DiskCache {
    /// Use `dir` (created with mode 0700 when missing). Refused, with the reason, when
    /// it cannot be created or is writable by other users (the files in it are loaded as
    /// native code: only the router's user may write there).
    pub fn open(dir: &Path, engine: &Engine) -> anyhow::Result<DiskCache> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        let meta = std::fs::metadata(dir)?;
        // Ownership: the directory's owner must be the user a new file gets.
        let probe = dir.join(format!(".owner-probe-{}", std::process::id()));
        std::fs::write(&probe, b"")?;
        let me = std::fs::metadata(&probe)?.uid();
        let _ = std::fs::remove_file(&probe);
        if meta.uid() != me {
            anyhow::bail!("{} is not owned by the router's user", dir.display());
        }
        if meta.permissions().mode() & 0o022 != 0 {
            anyhow::bail!(
                "{} is writable by other users (mode {:o}); use a private directory",
                dir.display(),
                meta.permissions().mode() & 0o777
            );
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Ok(DiskCache {
            dir: dir.to_path_buf(),
            engine_hash: format!("{:016x}", h.finish()),
        })
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{sha256}-{}.cwasm", self.engine_hash))
    }

    /// Whether this cache holds a compiled component for the `.wasm` whose SHA-256 is
    /// `sha256`, for this engine (not checked for integrity: see [`DiskCache::get`]).
    pub fn contains(&self, sha256: &str) -> bool {
        self.path(sha256).is_file()
    }

    /// The compiled component for the `.wasm` whose SHA-256 is `sha256`, if this cache
    /// has an intact one for this engine. Any problem (missing, torn, corrupt, from
    /// another wasmtime) is `None`: the caller compiles.
    pub fn get(&self, engine: &Engine, sha256: &str) -> Option<Component> {
        let bytes = std::fs::read(self.path(sha256)).ok()?;
        if bytes.len() < 32 {
            return None;
        }
        let (digest, body) = bytes.split_at(32);
        if Sha256::digest(body).as_slice() != digest {
            tracing::warn!(sha256, "compiled-policy cache file is corrupt; recompiling");
            let _ = std::fs::remove_file(self.path(sha256));
            return None;
        }
        deserialize(engine, body).ok()
    }

    /// Store `component` (compiled from the `.wasm` with SHA-256 `sha256`). Errors are
    /// logged, never returned: the cache only saves time.
    pub fn put(&self, sha256: &str, component: &Component) {
        let r = (|| -> anyhow::Result<()> {
            let body = component.serialize()?;
            let mut bytes = Vec::with_capacity(32 + body.len());
            bytes.extend_from_slice(&Sha256::digest(&body));
            bytes.extend_from_slice(&body);
            let tmp = self
                .dir
                .join(format!(".tmp-{}-{sha256}", std::process::id()));
            std::fs::write(&tmp, &bytes)?;
            std::fs::rename(&tmp, self.path(sha256))?;
            self.evict();
            Ok(())
        })();
        if let Err(e) = r {
            tracing::warn!(sha256, "could not cache the compiled policy: {e:#}");
        }
    }

    /// Remove the oldest files beyond [`MAX_FILES`].
    fn evict(&self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = rd
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".cwasm"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if files.len() <= MAX_FILES {
            return;
        }
        files.sort();
        for (_, p) in &files[..files.len() - MAX_FILES] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The one `unsafe` call of the runtime: turning cached bytes back into native code.
///
/// Safety argument (wasmtime requires that the bytes come from `Component::serialize` of
/// a compatible engine, because they are executed as native code):
/// - the bytes come only from [`DiskCache::put`] (`Component::serialize`), in a
///   directory [`DiskCache::open`] checked is owned by the router's user and not
///   writable by others;
/// - the file is written to a temporary name and renamed, so it is never read half
///   written, and its SHA-256 (stored in front) is verified before this call, so a torn
///   or corrupted file is never deserialised;
/// - the file name carries the engine's compatibility hash, and wasmtime itself checks
///   its version and configuration in the serialised header and errors on a mismatch;
/// - the bytes are read into memory (no mmap), so a later change of the file cannot
///   change code already loaded.
#[allow(unsafe_code)]
fn deserialize(engine: &Engine, body: &[u8]) -> anyhow::Result<Component> {
    // SAFETY: see the function's documentation.
    Ok(unsafe { Component::deserialize(engine, body) }?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PolicyEngine;

    fn component_bytes() -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/policy-wasm/wasm32-wasip2/policy/test_policy_pick_first.wasm");
        std::fs::read(&p).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run tests/run.sh: it builds the test components)",
                p.display()
            )
        })
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vr-cache-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_stored_component_comes_back_and_a_corrupt_one_is_recompiled() {
        let e = PolicyEngine::new(5, 16).unwrap();
        let dir = tempdir("roundtrip");
        let cache = DiskCache::open(&dir, &e.engine).unwrap();
        let bytes = component_bytes();
        let sha = "ab".repeat(32);
        assert!(cache.get(&e.engine, &sha).is_none(), "empty cache");
        let c = Component::new(&e.engine, &bytes).unwrap();
        cache.put(&sha, &c);
        let back = cache.get(&e.engine, &sha).expect("cached component");
        assert_eq!(
            back.component_type().exports(&e.engine).count(),
            c.component_type().exports(&e.engine).count()
        );
        // Flip one byte of the serialised code: the digest check refuses it (and
        // removes the file) instead of handing it to `deserialize`.
        let path = cache.path(&sha);
        let mut raw = std::fs::read(&path).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 0xff;
        std::fs::write(&path, &raw).unwrap();
        assert!(cache.get(&e.engine, &sha).is_none());
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directory_others_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let e = PolicyEngine::new(5, 16).unwrap();
        let dir = tempdir("perm");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = DiskCache::open(&dir, &e.engine).unwrap_err().to_string();
        assert!(err.contains("writable by other users"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn at_most_max_files_are_kept() {
        let e = PolicyEngine::new(5, 16).unwrap();
        let dir = tempdir("evict");
        let cache = DiskCache::open(&dir, &e.engine).unwrap();
        let c = Component::new(&e.engine, component_bytes()).unwrap();
        for i in 0..MAX_FILES + 3 {
            cache.put(&format!("{i:064}"), &c);
        }
        let n = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(n, MAX_FILES);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
