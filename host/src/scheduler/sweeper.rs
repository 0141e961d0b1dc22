//! The idempotency sweeper: deletes expired idempotent replies (and their
//! expiry index entries), and the oldest ones beyond `max_idempotency_keys`.

use super::{Inner, InvokeError, Scheduler, wall_ms};
use crate::model::{
    IDEMPOTENCY_EXPIRY_PREFIX, IdempotentReply, Keyspace, Op, Record, WriteSet, split_idempotency_expiry_key,
};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Idempotency index entries handled per sweep.
const SWEEP_BATCH: usize = 1000;

impl Scheduler {
    /// Deletes expired idempotent replies (and the oldest beyond the bound) until
    /// the node shuts down.
    pub async fn run_idempotency_sweeper(self) {
        let inner = self.inner.clone();
        let period = Duration::from_millis((inner.cfg.idempotency_retention_ms / 100).clamp(1000, 60_000));
        loop {
            tokio::time::sleep(period).await;
            if inner.shutting_down.load(Ordering::Acquire) {
                return;
            }
            loop {
                match inner.sweep_idempotency().await {
                    Ok(n) if n >= SWEEP_BATCH => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!("idempotency sweep failed: {e}");
                        break;
                    }
                }
            }
        }
    }
}

impl Inner {
    /// One sweep of the idempotency expiry index; returns how many entries it handled.
    async fn sweep_idempotency(self: &Arc<Self>) -> Result<usize, InvokeError> {
        let this = self.clone();
        let now = wall_ms();
        let over = self.idempotency_len.load(Ordering::Relaxed).saturating_sub(self.cfg.max_idempotency_keys);
        let (ops, seen) = crate::determinism::blocking(move || {
            let internal = |e: &dyn std::fmt::Display| InvokeError::Internal(e.to_string());
            let page = this
                .store
                .scan(Keyspace::Idempotency, IDEMPOTENCY_EXPIRY_PREFIX, None, SWEEP_BATCH)
                .map_err(|e| internal(&e))?;
            let seen = page.len();
            let mut ops = Vec::new();
            let mut over = over;
            for (index_key, _) in page {
                let Some((expires, record_key)) = split_idempotency_expiry_key(&index_key) else { continue };
                if expires > now && over == 0 {
                    break;
                }
                over = over.saturating_sub(1);
                // The record may have been replaced (a later call after expiry):
                // then only this stale index entry goes.
                let record = this.store.get(Keyspace::Idempotency, record_key).map_err(|e| internal(&e))?;
                if let Some(bytes) = record
                    && IdempotentReply::decode(&bytes).is_ok_and(|r| r.expires_at_ms == expires)
                {
                    ops.push(Op::Delete { keyspace: Keyspace::Idempotency, key: record_key.to_vec() });
                }
                ops.push(Op::Delete { keyspace: Keyspace::Idempotency, key: index_key });
            }
            Ok::<_, InvokeError>((ops, seen))
        })
        .await
        .map_err(|e| InvokeError::Internal(e.to_string()))??;
        let handled = ops.iter().filter(|op| op.key().first() == Some(&b'e')).count();
        if handled > 0 {
            self.log.propose(WriteSet { ops }).await?;
            let len = self.idempotency_len.load(Ordering::Relaxed);
            self.idempotency_len.store(len.saturating_sub(handled as u64), Ordering::Relaxed);
        }
        // A short page is the whole index: the exact count. On a cluster the
        // running count drifts as shard leaderships move between nodes.
        if seen < SWEEP_BATCH {
            self.idempotency_len.store((seen - handled) as u64, Ordering::Relaxed);
        }
        Ok(handled)
    }
}
