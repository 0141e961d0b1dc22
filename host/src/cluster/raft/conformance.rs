//! The commit-log conformance suite (`log::conformance`) run against the
//! log production commits through: a shard's `ShardLog` on disk, in a group
//! of one ([`super::open_solo`]).

use crate::log::LogConfig;
use crate::log::conformance::*;
use crate::storage::StateStore;
use std::path::Path;
use std::sync::Arc;

/// The production log: a shard replica's `ShardLog`, in a group of one.
pub(crate) struct ShardFactory;

impl LogFactory for ShardFactory {
    type Log = super::ShardLog;
    async fn open(&self, dir: &Path, config: LogConfig) -> Result<(Arc<Self::Log>, Arc<dyn StateStore>), String> {
        // A snapshot being built when the group shut down finishes on a
        // blocking thread and only then lets go of the store's database, so
        // a reopen in the same process may find it locked for a moment (a
        // restarted node is a new process). A second open while the first
        // log is alive stays locked and fails after the retries.
        let mut tries = 0;
        let log = loop {
            match super::open_solo(dir, &config).await {
                Ok(log) => break log,
                Err(e) if tries < 20 && e.to_string().contains("could not acquire lock") => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.to_string()),
            }
        };
        let store: Arc<dyn StateStore> = log.store().clone();
        Ok((Arc::new(log), store))
    }
}

commit_log_conformance!(
    shard_log,
    ShardFactory,
    [
        indexes_increase_and_resolve_durable_and_applied,
        concurrent_proposals_all_resolve_and_batch,
        batches_respect_max_batch_entries,
        batches_respect_max_batch_bytes,
        reopen_keeps_everything_acknowledged,
        state_survives_compactions_and_reopen,
        propose_after_shutdown_fails_cleanly,
        second_open_of_same_dir_fails,
        write_set_is_applied_atomically,
        timing_10k_proposals_at_concurrency_64,
    ]
);
