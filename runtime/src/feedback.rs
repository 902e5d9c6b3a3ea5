//! `on-complete` delivery off the response path: the host's body wrapper puts a
//! completion on a bounded queue ([`FeedbackQueue::send`], never blocking) and one
//! thread drains it into the policy versions. When the queue is full (policies slower
//! than traffic), completions are dropped and counted rather than slowing clients down.

use crate::{Completion, PolicyVersion};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

/// Completions waiting for the feedback thread, at most.
pub const DEFAULT_CAPACITY: usize = 4096;

/// What the feedback thread does.
pub enum Job {
    /// Deliver `on-complete` to a version.
    Complete(Arc<PolicyVersion>, Completion),
    /// Look at the sync flag (see [`FeedbackQueue::request_sync`]).
    Wake,
}

/// The sending side; cheap to share.
pub struct FeedbackQueue {
    tx: SyncSender<Job>,
    dropped: AtomicU64,
    delivered: Arc<AtomicU64>,
    sync: Arc<AtomicBool>,
}

impl FeedbackQueue {
    /// Start the feedback thread with a queue of `capacity` jobs. The thread ends when
    /// the queue is dropped. `on_fault(version, fault)` is called on the thread for an
    /// `on-complete` that faulted (for logs and metrics); `on_sync()` runs there after
    /// [`FeedbackQueue::request_sync`] (the host pushes its worker set to every version).
    pub fn start(
        capacity: usize,
        on_fault: impl Fn(&PolicyVersion, &crate::PolicyFault) + Send + 'static,
        on_sync: impl Fn() + Send + 'static,
    ) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = sync_channel(capacity.max(1));
        let delivered = Arc::new(AtomicU64::new(0));
        let sync = Arc::new(AtomicBool::new(false));
        let (d, s) = (delivered.clone(), sync.clone());
        std::thread::Builder::new()
            .name("policy-feedback".into())
            .spawn(move || drain(rx, d, s, on_fault, on_sync))?;
        Ok(Arc::new(FeedbackQueue {
            tx,
            dropped: AtomicU64::new(0),
            delivered,
            sync,
        }))
    }

    /// Ask the thread to run the sync function soon. Never blocks; many requests before
    /// the thread gets to it cause one run.
    pub fn request_sync(&self) {
        if !self.sync.swap(true, Ordering::AcqRel) {
            // When the queue is full the thread is busy and sees the flag after its job.
            let _ = self.tx.try_send(Job::Wake);
        }
    }

    /// Queue a completion; returns false (and counts it) when the queue is full.
    pub fn send(&self, version: Arc<PolicyVersion>, done: Completion) -> bool {
        match self.tx.try_send(Job::Complete(version, done)) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Completions dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Completions handed to policies so far.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
}

/// Pause after each drained batch. Under load the thread then wakes about once per
/// `BATCH_PAUSE` instead of once per request (a futex wake and two context switches per
/// request cost more router CPU than the guest call itself, measured); idle, it blocks
/// in `recv` and costs nothing. Feedback arrives at most this much later.
const BATCH_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

fn drain(
    rx: Receiver<Job>,
    delivered: Arc<AtomicU64>,
    sync: Arc<AtomicBool>,
    on_fault: impl Fn(&PolicyVersion, &crate::PolicyFault),
    on_sync: impl Fn(),
) {
    let run = |job: Job| match job {
        Job::Complete(v, done) => {
            if v.is_quarantined() {
                return;
            }
            if let Err(f) = v.complete(done) {
                on_fault(&v, &f);
            }
            delivered.fetch_add(1, Ordering::Relaxed);
        }
        Job::Wake => {}
    };
    while let Ok(first) = rx.recv() {
        if sync.swap(false, Ordering::AcqRel) {
            on_sync();
        }
        run(first);
        while let Ok(job) = rx.try_recv() {
            run(job);
        }
        if sync.swap(false, Ordering::AcqRel) {
            on_sync();
        }
        std::thread::sleep(BATCH_PAUSE);
        // Whatever arrived while pausing is handled before blocking again.
        while let Ok(job) = rx.try_recv() {
            run(job);
        }
        if sync.swap(false, Ordering::AcqRel) {
            on_sync();
        }
    }
}
