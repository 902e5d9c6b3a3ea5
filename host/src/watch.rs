//! Hot swap on file change: watch the directories of file-backed policy slots (so both
//! in-place writes and atomic renames are seen), debounce, and reload the slots whose
//! file changed. A reload validates fully before publishing (see
//! [`crate::policy::loader::SlotLoader::reload`]); a half-written file fails validation,
//! keeps the last good version serving, and is retried on the next event for the file.
//!
//! Only events that can change a file's content count (create, modify, rename, remove,
//! close-after-write). Access events are ignored: the router reads the file on every
//! reload, and reacting to its own reads made it re-read the policy ~49 times a second
//! after the first swap.

use crate::policy::PolicySlots;
use crate::policy::loader::SlotLoader;
use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use parking_lot::Mutex;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

/// The running watcher; dropping it stops watching.
pub struct PolicyWatcher {
    watcher: Mutex<RecommendedWatcher>,
    dirs: Mutex<HashSet<PathBuf>>,
}

/// Whether a file event can mean new content.
pub fn changes_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
        EventKind::Any | EventKind::Other => true,
    }
}

fn canonical_dir(file: &Path) -> PathBuf {
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// The absolute form of a policy file path as the watcher reports it.
pub fn canonical_file(file: &Path) -> PathBuf {
    match file.file_name() {
        Some(name) => canonical_dir(file).join(name),
        None => file.to_path_buf(),
    }
}

/// The slots an event on `path` may concern: those loaded from it, or, for an event on a
/// `..`-prefixed name, every slot whose file is in the same directory. The second case is a Kubernetes
/// ConfigMap volume: kubelet updates it by swapping a `..data` symlink, so the events
/// name `..data`/`..data_tmp`, never the policy file (which is a symlink through
/// `..data`).
fn affected(slots: &PolicySlots, path: &Path) -> Vec<Arc<crate::policy::PolicySlot>> {
    let exact = slots.loaded_from(path);
    if !exact.is_empty() {
        return exact;
    }
    // Only kubelet's own names (`..data`, `..data_tmp`, `..2026_…` directories): other
    // files changing beside a policy (logs, temp files) must not make it re-read.
    let kubelet = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(".."));
    let (true, Some(dir)) = (kubelet, path.parent()) else {
        return exact;
    };
    slots
        .every_slot()
        .into_iter()
        .filter(|s| s.file().as_deref().and_then(Path::parent) == Some(dir))
        .collect()
}

impl PolicyWatcher {
    /// Start watching; file events are handled on a dedicated thread (compiling a
    /// component takes tens of milliseconds and must stay off the request path). Events
    /// for a path are debounced: the reload runs once no content event arrived for
    /// `debounce`.
    pub fn start(
        debounce: Duration,
        slots: Arc<PolicySlots>,
        loader: Arc<SlotLoader>,
    ) -> anyhow::Result<Arc<Self>> {
        let (tx, rx) = std::sync::mpsc::channel::<notify::Result<notify::Event>>();
        let watcher = notify::recommended_watcher(tx)?;
        std::thread::Builder::new()
            .name("policy-watch".into())
            .spawn(move || {
                let mut pending: HashSet<PathBuf> = HashSet::new();
                let mut last_event = Instant::now();
                loop {
                    let wait = if pending.is_empty() {
                        Duration::from_secs(3600)
                    } else {
                        debounce.saturating_sub(last_event.elapsed())
                    };
                    match rx.recv_timeout(wait) {
                        Ok(Ok(ev)) => {
                            if changes_content(&ev.kind) {
                                pending.extend(ev.paths);
                                last_event = Instant::now();
                            }
                        }
                        Ok(Err(e)) => tracing::warn!("policy file watch error: {e}"),
                        Err(RecvTimeoutError::Timeout) => {
                            if pending.is_empty() || last_event.elapsed() < debounce {
                                continue;
                            }
                            let mut due: Vec<Arc<crate::policy::PolicySlot>> = Vec::new();
                            for path in pending.drain() {
                                for slot in affected(&slots, &path) {
                                    if !due.iter().any(|d| Arc::ptr_eq(d, &slot)) {
                                        due.push(slot);
                                    }
                                }
                            }
                            for slot in due {
                                // Errors are logged, counted and recorded by `reload`;
                                // identical bytes are skipped there (hash only).
                                let _ = loader.reload(&slot, None, None);
                            }
                        }
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            })?;
        Ok(Arc::new(PolicyWatcher {
            watcher: Mutex::new(watcher),
            dirs: Mutex::new(HashSet::new()),
        }))
    }

    /// Watch the directory holding `file` (idempotent).
    pub fn watch(&self, file: &Path) -> anyhow::Result<()> {
        let dir = canonical_dir(file);
        if self.dirs.lock().insert(dir.clone()) {
            self.watcher
                .lock()
                .watch(&dir, RecursiveMode::NonRecursive)
                .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", dir.display()))?;
            tracing::info!("watching {} for policy changes", dir.display());
        }
        Ok(())
    }
}

/// A running watch of a few files (TLS certificate and key, the client keys file);
/// dropping it stops watching.
pub struct FileWatch {
    _watcher: RecommendedWatcher,
}

/// Call `on_change` (on a dedicated thread) once `debounce` passed without a new
/// content event on any of `files`, or on a kubelet `..data` swap in their
/// directories (Secret and ConfigMap volumes). `what` names the files in logs.
/// Errors: a directory that cannot be watched.
pub fn watch_files(
    what: &'static str,
    files: &[PathBuf],
    debounce: Duration,
    on_change: impl Fn() + Send + 'static,
) -> anyhow::Result<FileWatch> {
    let (tx, rx) = std::sync::mpsc::channel::<notify::Result<notify::Event>>();
    let mut watcher = notify::recommended_watcher(tx)?;
    let wanted: HashSet<PathBuf> = files.iter().map(|f| canonical_file(f)).collect();
    let dirs: HashSet<PathBuf> = files.iter().map(|f| canonical_dir(f)).collect();
    for d in &dirs {
        watcher
            .watch(d, RecursiveMode::NonRecursive)
            .map_err(|e| anyhow::anyhow!("cannot watch {} for {what} changes: {e}", d.display()))?;
    }
    std::thread::Builder::new()
        .name(format!("watch-{what}"))
        .spawn(move || {
            let mut pending = false;
            let mut last_event = Instant::now();
            loop {
                let wait = if pending {
                    debounce.saturating_sub(last_event.elapsed())
                } else {
                    Duration::from_secs(3600)
                };
                match rx.recv_timeout(wait) {
                    Ok(Ok(ev)) => {
                        let ours = ev.paths.iter().any(|p| {
                            wanted.contains(p)
                                || p.file_name()
                                    .and_then(|n| n.to_str())
                                    .is_some_and(|n| n.starts_with(".."))
                        });
                        if ours && changes_content(&ev.kind) {
                            pending = true;
                            last_event = Instant::now();
                        }
                    }
                    Ok(Err(e)) => tracing::warn!("{what} file watch error: {e}"),
                    Err(RecvTimeoutError::Timeout) => {
                        if pending && last_event.elapsed() >= debounce {
                            pending = false;
                            on_change();
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        })?;
    Ok(FileWatch { _watcher: watcher })
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind};

    #[test]
    fn reads_are_not_changes() {
        assert!(!changes_content(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!changes_content(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(!changes_content(&EventKind::Access(AccessKind::Read)));
        assert!(changes_content(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(changes_content(&EventKind::Modify(ModifyKind::Any)));
        assert!(changes_content(&EventKind::Create(CreateKind::File)));
    }
}
