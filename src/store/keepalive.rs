//! The renewal task shared by the tenant lease and reader records: it renews
//! every third of the TTL until told to stop, and never cuts a renewal short
//! (cancelled mid-request, its write could still land after the owner's
//! release read the version), except when the owner gives up on it.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// A record kept alive by renewal.
pub(super) trait Renew: Send + Sync + 'static {
    /// Renews the record; an error (why it lapsed) ends the renewals.
    fn renew_record(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// Told once, with why, when a renewal failed.
    fn lost(&self, why: String);
}

pub(super) struct Keepalive {
    task: JoinHandle<()>,
    stop: Arc<Notify>,
}

impl Keepalive {
    /// Renews `record` every third of `ttl` while it is alive (the task holds
    /// only a weak reference: dropping the owner ends it).
    pub fn spawn<R: Renew>(record: &Arc<R>, ttl: Duration) -> Keepalive {
        let weak: Weak<R> = Arc::downgrade(record);
        let stop = Arc::new(Notify::new());
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(ttl / 3) => {}
                    _ = stopped.notified() => return,
                }
                let Some(record) = weak.upgrade() else { return };
                if let Err(why) = record.renew_record().await {
                    record.lost(why);
                    return;
                }
            }
        });
        Keepalive { task, stop }
    }

    /// Stops renewing once a renewal in flight is done, waiting for it up to
    /// `within`; one still stuck in retries then is cut short.
    pub async fn stop(&mut self, within: Duration) {
        self.stop.notify_one();
        if tokio::time::timeout(within, &mut self.task).await.is_err() {
            self.task.abort();
        }
    }

    /// Stops at once (an owner dropped without release, a test's stall).
    pub fn abort(&self) {
        self.task.abort();
    }
}
