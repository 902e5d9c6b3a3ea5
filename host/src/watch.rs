//! Hot swap on file change: watch the directories of file-backed policy slots (so both
//! in-place writes and atomic renames are seen), debounce, and reload the slots whose
//! file changed. A reload validates fully before publishing (see
//! [`crate::policy::PolicySlot::reload`]); a half-written file fails validation, keeps the
//! last good version serving, and is retried on the next event for the file.

use crate::metrics::Metrics;
use crate::policy::{PolicyEngine, PolicySlot};
use crate::workers::Registry;
use notify::RecursiveMode;
use notify_debouncer_mini::{DebounceEventResult, new_debouncer};
use parking_lot::Mutex;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Finds the slots loaded from a path (slots may be added at run time by the admin API).
pub type SlotLookup = Arc<dyn Fn(&Path) -> Vec<Arc<PolicySlot>> + Send + Sync>;

/// The running watcher; dropping it stops watching.
pub struct PolicyWatcher {
    debouncer: Mutex<notify_debouncer_mini::Debouncer<notify::RecommendedWatcher>>,
    dirs: Mutex<HashSet<PathBuf>>,
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

impl PolicyWatcher {
    /// Start watching; file events are handled on a dedicated thread (compiling a
    /// component takes tens of milliseconds and must stay off the request path).
    pub fn start(
        debounce: Duration,
        lookup: SlotLookup,
        engine: Arc<PolicyEngine>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        let (tx, rx) = std::sync::mpsc::channel::<DebounceEventResult>();
        let debouncer = new_debouncer(debounce, tx)?;
        std::thread::Builder::new()
            .name("policy-watch".into())
            .spawn(move || {
                for res in rx {
                    let events = match res {
                        Ok(ev) => ev,
                        Err(e) => {
                            tracing::warn!("policy file watch error: {e}");
                            continue;
                        }
                    };
                    let paths: HashSet<PathBuf> = events.into_iter().map(|e| e.path).collect();
                    for path in paths {
                        for slot in lookup(&path) {
                            // Errors are logged, counted and recorded by `reload`.
                            let _ = slot.reload(&engine, &registry, &metrics, None, None);
                        }
                    }
                }
            })?;
        Ok(Arc::new(PolicyWatcher {
            debouncer: Mutex::new(debouncer),
            dirs: Mutex::new(HashSet::new()),
        }))
    }

    /// Watch the directory holding `file` (idempotent).
    pub fn watch(&self, file: &Path) -> anyhow::Result<()> {
        let dir = canonical_dir(file);
        if self.dirs.lock().insert(dir.clone()) {
            self.debouncer
                .lock()
                .watcher()
                .watch(&dir, RecursiveMode::NonRecursive)
                .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", dir.display()))?;
            tracing::info!("watching {} for policy changes", dir.display());
        }
        Ok(())
    }
}
