//! Property tests ("fuzzing" with proptest, bounded case counts so CI stays
//! fast) over the paths that take untrusted bytes: protobuf invocation
//! decoding and validation, write-set decoding, and the write-set → storage
//! path, checked against a `BTreeMap` model for both store providers.

use crate::api::pb;
use crate::model::{EntityRef, Keyspace, Op, WriteSet, validate_entity_id, validate_type_name};
use crate::storage::{ApplyStore, MemStore, SledStore};
use proptest::prelude::*;
use prost::Message;
use std::collections::BTreeMap;

fn op_strategy() -> impl Strategy<Value = Op> {
    let keyspace = prop_oneof![Just(Keyspace::State), Just(Keyspace::Registry)];
    // Small key alphabet so puts, deletes and prefixes collide often.
    let key = proptest::collection::vec(prop_oneof![Just(0u8), Just(b'a'), Just(b'b'), Just(0xff)], 0..4);
    let value = proptest::collection::vec(any::<u8>(), 0..8);
    prop_oneof![
        (keyspace.clone(), key.clone(), value).prop_map(|(keyspace, key, value)| Op::Put { keyspace, key, value }),
        (keyspace, key).prop_map(|(keyspace, key)| Op::Delete { keyspace, key }),
    ]
}

fn write_sets() -> impl Strategy<Value = Vec<WriteSet>> {
    proptest::collection::vec(proptest::collection::vec(op_strategy(), 0..6).prop_map(|ops| WriteSet { ops }), 1..12)
}

type Model = BTreeMap<(u8, Vec<u8>), Vec<u8>>;

fn model_apply(m: &mut Model, ws: &WriteSet) {
    for op in &ws.ops {
        match op {
            Op::Put { keyspace, key, value } => {
                m.insert((keyspace.as_byte(), key.clone()), value.clone());
            }
            Op::Delete { keyspace, key } => {
                m.remove(&(keyspace.as_byte(), key.clone()));
            }
            Op::Expect { .. } => {}
        }
    }
}

fn check_store_matches(store: &dyn ApplyStore, sets: &[WriteSet], prefix: &[u8]) -> Result<(), TestCaseError> {
    let mut model = Model::new();
    for (i, ws) in sets.iter().enumerate() {
        store.apply(&[(i as u64 + 1, ws)]).map_err(|e| TestCaseError::fail(e.to_string()))?;
        model_apply(&mut model, ws);
    }
    // Replaying the same entries must change nothing.
    let replay: Vec<(u64, &WriteSet)> = sets.iter().enumerate().map(|(i, ws)| (i as u64 + 1, ws)).collect();
    store.apply(&replay).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(store.applied_index().unwrap(), sets.len() as u64);
    for ks in Keyspace::ALL {
        let got = store.scan(ks, prefix, None, usize::MAX).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let want: Vec<(Vec<u8>, Vec<u8>)> = model
            .iter()
            .filter(|((k, key), _)| *k == ks.as_byte() && key.starts_with(prefix))
            .map(|((_, key), v)| (key.clone(), v.clone()))
            .collect();
        prop_assert_eq!(&got, &want);
        for (key, v) in &want {
            let got = store.get(ks, key).unwrap();
            prop_assert_eq!(got.as_ref(), Some(v));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn invoke_requests_from_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(req) = pb::InvokeRequest::decode(bytes.as_slice())
            && let Some(e) = req.entity
        {
            let valid = EntityRef::new(e.entity_type.clone(), e.id.clone()).is_ok();
            prop_assert_eq!(valid, validate_type_name(&e.entity_type).is_ok() && validate_entity_id(&e.id).is_ok());
        }
    }

    #[test]
    fn entity_refs_parse_or_refuse_without_panicking(s in "\\PC{0,300}|[a-z]{1,8}/[\\x00-\\x7f]{0,300}") {
        if let Ok(r) = EntityRef::parse(&s) {
            prop_assert!(r.id.len() <= 256 && !r.id.is_empty());
            prop_assert!(!r.id.chars().any(char::is_control));
            prop_assert_eq!(r.to_string(), s);
        }
    }

    #[test]
    fn write_sets_round_trip_and_garbage_is_refused(sets in write_sets(), garbage in proptest::collection::vec(any::<u8>(), 0..64)) {
        for ws in &sets {
            prop_assert_eq!(&WriteSet::decode(&ws.encode()).unwrap(), ws);
        }
        // Arbitrary bytes either decode to some write set or are refused; never a panic.
        let _ = WriteSet::decode(&garbage);
    }

    #[test]
    fn mem_store_matches_the_model(sets in write_sets(), prefix in proptest::collection::vec(prop_oneof![Just(0u8), Just(b'a')], 0..2)) {
        check_store_matches(&MemStore::new(), &sets, &prefix)?;
    }
}

proptest! {
    // Each case opens a sled database: fewer cases.
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn sled_store_matches_the_model(sets in write_sets(), prefix in proptest::collection::vec(prop_oneof![Just(0u8), Just(b'a')], 0..2)) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        check_store_matches(&store, &sets, &prefix)?;
    }
}
