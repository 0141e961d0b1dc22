//! Type records and the pure planning of registry changes: a type's
//! numbered versions (identical bytes reuse their number), its active
//! version and canary, and `plan_*` functions that compute the next record
//! and the outcome from the stored one — no I/O, unit-tested.

use super::RegistryError;
use serde::{Deserialize, Serialize};

/// Most entity ids one canary may list; a canary is a handful of test entities.
pub const MAX_CANARY_IDS: usize = 1000;

/// A version pinned for some entities of a type while the others stay on the active one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryRecord {
    pub version: u32,
    /// Sorted and without duplicates.
    pub ids: Vec<String>,
}

/// One immutable version of a type, as recorded in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub version: u32,
    /// Lowercase hex sha256 of the component bytes.
    pub digest: String,
    pub size_bytes: u64,
    pub deployed_at_ms: u64,
}

/// Everything the registry knows about one entity type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeRecord {
    pub name: String,
    pub versions: Vec<VersionRecord>,
    pub active: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryRecord>,
    /// Changes committed to this record so far (0 for records written before
    /// it was counted): a member serving revision N or later serves this
    /// change or one made after it.
    #[serde(default)]
    pub revision: u64,
}

/// A record change decided by a `plan_*` function, with what to tell the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan<O> {
    /// `None`: nothing changes.
    pub(super) record: Option<TypeRecord>,
    pub(super) outcome: O,
}

impl TypeRecord {
    pub(super) fn version(&self, v: u32) -> Option<&VersionRecord> {
        self.versions.iter().find(|r| r.version == v)
    }

    /// The version entity `id` runs: the canary's if it lists `id`, else the active one.
    pub fn version_for(&self, id: &str) -> u32 {
        match &self.canary {
            Some(c) if c.ids.binary_search_by(|x| x.as_str().cmp(id)).is_ok() => c.version,
            _ => self.active,
        }
    }

    pub(super) fn next_version(&self) -> u32 {
        self.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1
    }

    pub(super) fn known_versions(&self) -> String {
        self.versions.iter().map(|v| v.version.to_string()).collect::<Vec<_>>().join(", ")
    }

    /// What deploying bytes with `digest` does. Bytes equal to the active version change
    /// nothing; bytes equal to an earlier version reuse its number (a version is its
    /// content); other bytes become version N+1. Without a canary the version becomes
    /// active for everyone and any canary ends; with one it is pinned for `canary` ids.
    pub(super) fn plan_deploy(
        existing: Option<&TypeRecord>,
        name: &str,
        digest: &str,
        size_bytes: u64,
        now_ms: u64,
        canary: Option<Vec<String>>,
    ) -> Result<Plan<DeployOutcome>, RegistryError> {
        let canary = canary.map(canary_ids).transpose()?;
        let empty = TypeRecord { name: name.to_owned(), versions: vec![], active: 0, canary: None, revision: 0 };
        let rec = existing.unwrap_or(&empty);
        let previous_active = existing.map(|r| r.active);
        let same = rec.versions.iter().find(|v| v.digest == digest).map(|v| v.version);
        let mut outcome = DeployOutcome {
            version: same.unwrap_or_else(|| rec.next_version()),
            digest: digest.to_owned(),
            unchanged: false,
            reused: same.is_some(),
            previous_active,
            canary: None,
        };
        if same.is_some() && same == previous_active {
            outcome.unchanged = true;
            outcome.canary = rec.canary.as_ref().map(|c| c.ids.clone());
            return Ok(Plan { record: None, outcome });
        }
        let mut next = rec.clone();
        next.revision += 1;
        if same.is_none() {
            next.versions.push(VersionRecord {
                version: outcome.version,
                digest: digest.to_owned(),
                size_bytes,
                deployed_at_ms: now_ms,
            });
        }
        match canary {
            None => {
                next.active = outcome.version;
                next.canary = None;
            }
            Some(ids) => {
                if existing.is_none() {
                    return Err(RegistryError::BadCanary(format!(
                        "{name} has no active version yet; deploy its first version without --canary"
                    )));
                }
                outcome.canary = Some(ids.clone());
                next.canary = Some(CanaryRecord { version: outcome.version, ids });
            }
        }
        Ok(Plan { record: Some(next), outcome })
    }

    /// What making `version` active for every entity does (rollback or promote); it
    /// ends any canary.
    pub(super) fn plan_activate(&self, version: u32) -> Result<Plan<ActivateOutcome>, RegistryError> {
        if self.version(version).is_none() {
            return Err(RegistryError::UnknownVersion {
                name: self.name.clone(),
                version,
                known: self.known_versions(),
            });
        }
        let outcome = ActivateOutcome {
            active: version,
            previous_active: self.active,
            unchanged: version == self.active && self.canary.is_none(),
            ended_canary: self.canary.clone(),
        };
        if outcome.unchanged {
            return Ok(Plan { record: None, outcome });
        }
        let mut next = self.clone();
        next.revision += 1;
        next.active = version;
        next.canary = None;
        Ok(Plan { record: Some(next), outcome })
    }
}

/// Validates, sorts and de-duplicates canary ids.
pub(super) fn canary_ids(ids: Vec<String>) -> Result<Vec<String>, RegistryError> {
    let mut ids: Vec<String> = ids.into_iter().map(|i| i.trim().to_owned()).filter(|i| !i.is_empty()).collect();
    ids.sort();
    ids.dedup();
    if ids.is_empty() {
        return Err(RegistryError::BadCanary("list at least one entity id".into()));
    }
    if ids.len() > MAX_CANARY_IDS {
        return Err(RegistryError::BadCanary(format!("{} ids; the limit is {MAX_CANARY_IDS}", ids.len())));
    }
    for id in &ids {
        crate::model::validate_entity_id(id).map_err(|e| RegistryError::BadCanary(format!("id {id:?}: {e}")))?;
    }
    Ok(ids)
}

/// What a deploy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployOutcome {
    pub version: u32,
    pub digest: String,
    /// The bytes were identical to the active version: nothing changed.
    pub unchanged: bool,
    /// The bytes were identical to this earlier version, which was reused.
    pub reused: bool,
    /// The active version before the deploy (`None` for a new type).
    pub previous_active: Option<u32>,
    /// The ids the version is pinned for, when deployed as a canary.
    pub canary: Option<Vec<String>>,
}

/// What a rollback or promote did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivateOutcome {
    pub active: u32,
    pub previous_active: u32,
    /// The version was already active for everyone.
    pub unchanged: bool,
    /// The canary that was in place, now ended.
    pub ended_canary: Option<CanaryRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy(rec: Option<&TypeRecord>, digest: &str, canary: Option<&[&str]>) -> Plan<DeployOutcome> {
        let canary = canary.map(|ids| ids.iter().map(|s| s.to_string()).collect());
        TypeRecord::plan_deploy(rec, "counter", digest, 10, 1000, canary).unwrap()
    }

    fn record(p: Plan<DeployOutcome>) -> TypeRecord {
        p.record.expect("the plan changes the record")
    }

    #[test]
    fn deploys_number_versions_and_identical_bytes_change_nothing() {
        let v1 = record(deploy(None, "aa", None));
        assert_eq!((v1.active, v1.versions.len()), (1, 1));
        let same = deploy(Some(&v1), "aa", None);
        assert!(same.record.is_none() && same.outcome.unchanged && same.outcome.version == 1);
        let v2 = deploy(Some(&v1), "bb", None);
        assert_eq!((v2.outcome.version, v2.outcome.previous_active, v2.outcome.reused), (2, Some(1), false));
        let v2 = record(v2);
        assert_eq!(v2.active, 2);
        // Bytes of an earlier version reuse its number instead of minting a new one.
        let back = deploy(Some(&v2), "aa", None);
        assert!(back.outcome.reused && !back.outcome.unchanged && back.outcome.version == 1);
        let back = record(back);
        assert_eq!((back.active, back.versions.len()), (1, 2));
        // Every change counts: propagation waits for this revision or a later one.
        assert_eq!((v1.revision, v2.revision, back.revision), (1, 2, 3));
    }

    #[test]
    fn a_canary_pins_listed_ids_until_promote_or_rollback() {
        let v1 = record(deploy(None, "aa", None));
        let c = deploy(Some(&v1), "bb", Some(&["z", "a", "a", " "]));
        assert_eq!(c.outcome.canary.as_deref(), Some(&["a".to_string(), "z".to_string()][..]));
        let c = record(c);
        assert_eq!(c.active, 1);
        assert_eq!((c.version_for("a"), c.version_for("z"), c.version_for("b")), (2, 2, 1));
        let promoted = c.plan_activate(2).unwrap();
        assert_eq!(promoted.outcome.ended_canary.as_ref().map(|c| c.version), Some(2));
        let promoted = promoted.record.unwrap();
        assert_eq!((promoted.active, promoted.canary.is_none(), promoted.version_for("b")), (2, true, 2));
        // Rolling back while a canary runs ends it too.
        let rolled = c.plan_activate(1).unwrap();
        assert!(!rolled.outcome.unchanged);
        assert_eq!(rolled.record.unwrap().version_for("a"), 1);
    }

    #[test]
    fn bad_canaries_and_unknown_versions_are_refused() {
        let fresh = TypeRecord::plan_deploy(None, "counter", "aa", 1, 1, Some(vec!["a".into()]));
        assert!(matches!(fresh, Err(RegistryError::BadCanary(m)) if m.contains("first version")));
        let v1 = record(deploy(None, "aa", None));
        for ids in [vec![], vec![" ".to_string()], vec!["bad\nid".to_string()]] {
            assert!(matches!(
                TypeRecord::plan_deploy(Some(&v1), "counter", "bb", 1, 1, Some(ids)),
                Err(RegistryError::BadCanary(_))
            ));
        }
        let too_many = (0..=MAX_CANARY_IDS).map(|i| i.to_string()).collect();
        assert!(TypeRecord::plan_deploy(Some(&v1), "counter", "bb", 1, 1, Some(too_many)).is_err());
        let e = v1.plan_activate(7).unwrap_err().to_string();
        assert!(e.contains("no version 7") && e.contains("versions are 1"), "{e}");
        assert!(v1.plan_activate(1).unwrap().outcome.unchanged);
    }

    #[test]
    fn records_without_a_canary_field_still_load() {
        let old = r#"{"name":"counter","versions":[{"version":1,"digest":"aa","size_bytes":1,"deployed_at_ms":2}],"active":1}"#;
        let rec: TypeRecord = serde_json::from_str(old).unwrap();
        assert_eq!((rec.active, &rec.canary, rec.revision), (1, &None, 0));
        assert!(!serde_json::to_string(&rec).unwrap().contains("canary"));
    }
}
