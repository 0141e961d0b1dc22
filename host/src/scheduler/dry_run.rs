//! Migration dry runs: a candidate version's migration run against a sample
//! of existing entities, each in a fresh instance, against committed state,
//! committing nothing and taking no entity lock.

use super::meta::MetaCache;
use super::turn::PermitSlot;
use super::{Inner, InvokeError, Scheduler};
use crate::model::{EntityRef, unix_ms as wall_ms};
use crate::registry::LoadedVersion;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// What a dry run of a candidate version's migration found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DryRunReport {
    pub sampled: u64,
    pub migrated: u64,
    pub failed: u64,
    /// Entities already on the candidate's version (nothing to run).
    pub up_to_date: u64,
    /// The first failures: entity id, version it would migrate from, error.
    pub failures: Vec<(String, u32, String)>,
    pub has_migration: bool,
}

/// Failures a dry-run report lists in full; the rest are only counted.
const DRY_RUN_FAILURES_SHOWN: usize = 10;
/// Upper bound of a dry run's sample, so one request cannot run for hours.
pub const DRY_RUN_MAX_SAMPLE: usize = 10_000;

impl Scheduler {
    /// Runs `candidate`'s migration against up to `sample` existing entities of its
    /// type, each in a fresh instance, reading committed state and committing
    /// nothing: no other caller can observe a dry run. Entities are visited in id
    /// order; each takes a turn permit, so foreground turns keep their share.
    pub async fn dry_run_migration(
        &self,
        candidate: Arc<LoadedVersion>,
        sample: usize,
    ) -> Result<DryRunReport, InvokeError> {
        let inner = self.inner.clone();
        let sample = sample.min(DRY_RUN_MAX_SAMPLE);
        let store = inner.store.clone();
        let ty = candidate.type_name.clone();
        let ids =
            crate::determinism::blocking(move || crate::storage::entity_ids(store.as_ref(), &ty, "", None, sample))
                .await
                .map_err(|e| InvokeError::Internal(e.to_string()))?
                .map_err(|e| InvokeError::Internal(format!("listing entities: {e}")))?;
        let mut report = DryRunReport { has_migration: candidate.prepared.has_migration(), ..Default::default() };
        for id in ids {
            let entity = EntityRef { entity_type: candidate.type_name.clone(), id };
            let slot = inner.turn_slot().await?;
            let outcome = inner.dry_run_one(&candidate, &entity, slot).await;
            report.sampled += 1;
            match outcome {
                Ok(None) => report.up_to_date += 1,
                Ok(Some(_)) => report.migrated += 1,
                Err((from, message)) => {
                    report.failed += 1;
                    if report.failures.len() < DRY_RUN_FAILURES_SHOWN {
                        report.failures.push((entity.id, from, message));
                    }
                }
            }
        }
        Ok(report)
    }
}

impl Inner {
    /// One entity of a dry run: `Ok(None)` if nothing to migrate, `Ok(Some(from))`
    /// if the migration succeeded, `Err((from, why))` if it failed.
    async fn dry_run_one(
        &self,
        candidate: &LoadedVersion,
        entity: &EntityRef,
        slot: PermitSlot,
    ) -> Result<Option<u32>, (u32, String)> {
        let meta = MetaCache::load(self.store.as_ref(), entity).map_err(|e| (0, e.to_string()))?;
        let Some(from) = meta.stored.migrate_from(candidate.version) else { return Ok(None) };
        let mut instance =
            self.instantiate_with_room(&candidate.prepared, entity).await.map_err(|e| (from, e.to_string()))?;
        let seq = self.next_invocation.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{seq:x}-dry-run", self.invocation_prefix);
        instance
            .run_migration(from, id, wall_ms(), self.store.clone(), Box::new(slot))
            .await
            .map(|_| Some(from))
            .map_err(|e| (from, e.to_string()))
    }
}
