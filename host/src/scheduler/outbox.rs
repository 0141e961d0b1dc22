//! The outbox as the deliverer reads it: messages in delivery order, a run
//! from the front of each (sender, receiver) pair's queue, a bounded share
//! per sender, passing over the pairs being delivered or backing off
//! ([`read_outbox`]); undecodable entries are returned for removal. Also the
//! start-up count of what waits in the outbox and the idempotency store.

use super::Scheduler;
use crate::model::{EntityRef, IDEMPOTENCY_EXPIRY_PREFIX, Keyspace, Message, Record, entity_prefix};
use crate::storage::{StateStore, StorageError};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

/// Messages of one sender taken per outbox read, so one busy sender cannot
/// crowd out the others.
const PER_SENDER_BATCH: usize = 64;
/// Outbox entries of one sender a read looks at, past the pairs it skips
/// (being delivered or backing off), to find the sender's other pairs.
const PER_SENDER_SCAN: usize = 1024;
/// Senders one outbox read visits at most; the next read goes on from there.
const SENDERS_PER_READ: usize = 4096;

/// One outbox entry.
pub(super) struct Outgoing {
    pub(super) key: Vec<u8>,
    pub(super) message: Message,
}

/// A (sender, receiver) pair: the unit of in-order delivery.
pub(super) type Pair = (EntityRef, EntityRef);

/// Pairs an outbox read passes over: receivers by the sender's
/// [`entity_prefix`] (what its outbox keys start with).
pub(super) type Skip = BTreeMap<Vec<u8>, BTreeSet<EntityRef>>;

pub(super) fn skip_of<'a>(pairs: impl Iterator<Item = &'a Pair>) -> Skip {
    let mut skip = Skip::new();
    for (sender, target) in pairs {
        skip.entry(entity_prefix(sender)).or_default().insert(target.clone());
    }
    skip
}

/// What one read of the outbox found.
pub(super) struct OutboxRead {
    /// Messages in delivery order: of each pair, a run from the front of its
    /// queue.
    pub(super) batch: Vec<Outgoing>,
    /// Undecodable entries, for removal.
    pub(super) corrupt: Vec<Vec<u8>>,
    /// Where the next read goes on (strictly after this key), or `None`: this
    /// read reached the end of the outbox.
    pub(super) resume: Option<Vec<u8>>,
}

/// Outbox entries in delivery order from strictly after `start_after`: at most
/// `PER_SENDER_BATCH` per sender, `limit` in all (a sender's share is taken
/// whole once started), and of at most `max_pairs` pairs. The pairs in `skip`
/// are passed over whole (their front is being delivered, or waits for a
/// retry), and so are their later messages: a pair's messages are only ever
/// taken from its front.
pub(super) fn read_outbox(
    store: &dyn StateStore,
    start_after: Option<&[u8]>,
    limit: usize,
    max_pairs: usize,
    skip: &Skip,
) -> Result<OutboxRead, StorageError> {
    let mut read = OutboxRead { batch: Vec::new(), corrupt: Vec::new(), resume: None };
    let mut after: Option<Vec<u8>> = start_after.map(<[u8]>::to_vec);
    let mut pairs = 0usize;
    for _ in 0..SENDERS_PER_READ {
        if read.batch.len() >= limit || pairs >= max_pairs {
            read.resume = after;
            return Ok(read);
        }
        let Some((first, _)) = store.scan(Keyspace::Outbox, b"", after.as_deref(), 1)?.into_iter().next() else {
            return Ok(read);
        };
        // Outbox keys are `sender-prefix seq(8)`; the prefix ends with the separator.
        let prefix = first[..first.len().saturating_sub(8)].to_vec();
        let empty = BTreeSet::new();
        let skipped = skip.get(&prefix).unwrap_or(&empty);
        let mut targets: BTreeSet<EntityRef> = BTreeSet::new();
        let (mut taken, mut seen) = (0usize, 0usize);
        let mut within: Option<Vec<u8>> = None;
        'sender: while taken < PER_SENDER_BATCH && seen < PER_SENDER_SCAN {
            let page = store.scan(Keyspace::Outbox, &prefix, within.as_deref(), PER_SENDER_BATCH)?;
            let last_page = page.len() < PER_SENDER_BATCH;
            for (key, value) in page {
                seen += 1;
                within = Some(key.clone());
                if key.len() != prefix.len() + 8 {
                    continue;
                }
                match Message::decode(&value) {
                    Ok(message) if skipped.contains(&message.target) => {}
                    Ok(message) => {
                        if !targets.contains(&message.target) {
                            if pairs >= max_pairs {
                                // Come back to this sender: its pairs taken so
                                // far are skipped then, the others are found.
                                read.resume = after;
                                return Ok(read);
                            }
                            pairs += 1;
                            targets.insert(message.target.clone());
                        }
                        read.batch.push(Outgoing { key, message });
                        taken += 1;
                        if taken >= PER_SENDER_BATCH {
                            break 'sender;
                        }
                    }
                    Err(e) => {
                        tracing::error!(key = ?key, "dropping an undecodable outbox entry: {e}");
                        read.corrupt.push(key);
                    }
                }
            }
            if last_page {
                break;
            }
        }
        // Skip to the next sender: replace the prefix's last separator by 0x01.
        let mut next = prefix;
        match next.last_mut() {
            Some(b) => *b = 1,
            None => return Ok(read),
        }
        after = Some(next);
    }
    read.resume = after;
    Ok(read)
}

impl Scheduler {
    /// Counts what is waiting in the outbox and the idempotency store, for the
    /// bounds; call once at start-up, before serving.
    pub fn recover_counts(&self) -> Result<(), StorageError> {
        let count = |ks: Keyspace, prefix: &[u8]| -> Result<u64, StorageError> {
            let mut n = 0u64;
            let mut after: Option<Vec<u8>> = None;
            loop {
                let page = self.inner.store.scan(ks, prefix, after.as_deref(), 10_000)?;
                let Some((last, _)) = page.last() else { break };
                after = Some(last.clone());
                n += page.len() as u64;
            }
            Ok(n)
        };
        self.inner.outbox_len.store(count(Keyspace::Outbox, b"")?, Ordering::Relaxed);
        self.inner.idempotency_len.store(count(Keyspace::Idempotency, IDEMPOTENCY_EXPIRY_PREFIX)?, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Op, WriteSet, outbox_key};
    use crate::scheduler::test_support::{entity, message};
    use crate::storage::{ApplyStore, MemStore};

    #[test]
    fn the_outbox_is_read_per_sender_in_sequence_order() {
        let store = MemStore::new();
        let (a, b) = (entity("a"), entity("b"));
        let mut ops = Vec::new();
        for seq in [3u64, 1, 300, 2] {
            ops.push(Op::Put {
                keyspace: Keyspace::Outbox,
                key: outbox_key(&a, seq),
                value: message(&a, seq, &b).encode(),
            });
        }
        for seq in 0..(PER_SENDER_BATCH as u64 + 5) {
            ops.push(Op::Put {
                keyspace: Keyspace::Outbox,
                key: outbox_key(&b, seq),
                value: message(&b, seq, &b).encode(),
            });
        }
        ops.push(Op::Put { keyspace: Keyspace::Outbox, key: outbox_key(&b, 999_999), value: b"junk".to_vec() });
        store.apply(&[(1, &WriteSet { ops })]).unwrap();
        let read = read_outbox(&store, None, 10_000, 100, &Skip::new()).unwrap();
        let seqs_of = |batch: &[Outgoing], s: &EntityRef| {
            batch.iter().filter(|o| &o.message.sender == s).map(|o| o.message.seq).collect::<Vec<_>>()
        };
        assert_eq!(seqs_of(&read.batch, &a), [1, 2, 3, 300]);
        // One sender's share per read is bounded.
        assert_eq!(seqs_of(&read.batch, &b).len(), PER_SENDER_BATCH);
        assert!(read.corrupt.is_empty(), "the junk entry is beyond b's share this read");
        assert!(read.resume.is_none(), "the read reached the end");
        let read = read_outbox(&store, None, 2, 100, &Skip::new()).unwrap();
        assert_eq!(read.batch.len(), 4, "a whole sender's share is taken once started");
        // The next read goes on with the next sender.
        let next = read_outbox(&store, read.resume.as_deref(), 2, 100, &Skip::new()).unwrap();
        assert_eq!(seqs_of(&next.batch, &b).len(), PER_SENDER_BATCH);
        assert!(seqs_of(&next.batch, &a).is_empty());
    }

    /// A pair being delivered, or backing off, is passed over whole: the
    /// sender's other pairs behind it are read, and none of its own later
    /// messages (a pair is only ever delivered from its front).
    #[test]
    fn a_stuck_pair_does_not_hide_the_senders_other_pairs() {
        let store = MemStore::new();
        let (a, slow, fast, other) = (entity("a"), entity("slow"), entity("fast"), entity("other"));
        let mut ops = Vec::new();
        let mut seq = 0;
        for target in [&slow, &fast, &slow, &other] {
            for _ in 0..PER_SENDER_BATCH {
                seq += 1;
                ops.push(Op::Put {
                    keyspace: Keyspace::Outbox,
                    key: outbox_key(&a, seq),
                    value: message(&a, seq, target).encode(),
                });
            }
        }
        store.apply(&[(1, &WriteSet { ops })]).unwrap();
        let targets =
            |read: &OutboxRead| read.batch.iter().map(|o| o.message.target.id.clone()).collect::<BTreeSet<_>>();
        // Without a skip, the first pair fills the sender's share.
        let read = read_outbox(&store, None, 1000, 100, &Skip::new()).unwrap();
        assert_eq!(targets(&read), BTreeSet::from(["slow".to_string()]));
        let skip = skip_of([(a.clone(), slow.clone())].iter());
        let read = read_outbox(&store, None, 1000, 100, &skip).unwrap();
        assert_eq!(targets(&read), BTreeSet::from(["fast".to_string()]));
        let seqs: Vec<u64> = read.batch.iter().map(|o| o.message.seq).collect();
        assert_eq!(seqs, (PER_SENDER_BATCH as u64 + 1..=2 * PER_SENDER_BATCH as u64).collect::<Vec<_>>());
        let skip = skip_of([(a.clone(), slow.clone()), (a.clone(), fast.clone())].iter());
        let read = read_outbox(&store, None, 1000, 100, &skip).unwrap();
        assert_eq!(targets(&read), BTreeSet::from(["other".to_string()]), "found past 192 skipped entries");
        // At most `max_pairs` pairs; the next read comes back to the sender.
        let two = {
            let store = MemStore::new();
            let ops = [&slow, &fast, &other]
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let seq = i as u64 + 1;
                    Op::Put {
                        keyspace: Keyspace::Outbox,
                        key: outbox_key(&a, seq),
                        value: message(&a, seq, t).encode(),
                    }
                })
                .collect();
            store.apply(&[(1, &WriteSet { ops })]).unwrap();
            store
        };
        let read = read_outbox(&two, None, 1000, 2, &Skip::new()).unwrap();
        assert_eq!(targets(&read), BTreeSet::from(["slow".to_string(), "fast".to_string()]));
        let skip = skip_of([(a.clone(), slow.clone()), (a.clone(), fast.clone())].iter());
        let next = read_outbox(&two, read.resume.as_deref(), 1000, 2, &skip).unwrap();
        assert_eq!(targets(&next), BTreeSet::from(["other".to_string()]));
    }
}
