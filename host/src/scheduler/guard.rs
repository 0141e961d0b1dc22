//! Turn guards: what makes an invocation safe to retry — a client's
//! idempotency key (its first successful reply is stored and answers every
//! retry) or the sequence of the message being delivered (the receiver's
//! inbox record drops a redelivery). Checked before any guest code runs;
//! recorded in the turn's own write set.

use super::InvokeError;
use crate::model::{
    EntityRef, IdempotentReply, Keyspace, Op, Record, idempotency_expiry_key, idempotency_key, inbox_key,
};
use crate::storage::StateStore;

/// What makes an invocation safe to retry: a client's idempotency key, or the
/// id of the message being delivered.
pub(super) struct TurnGuard<'a> {
    /// The client's key and the call's [`request_digest`](crate::model::request_digest).
    pub(super) idempotency: Option<(&'a str, [u8; 32])>,
    pub(super) message_seq: Option<u64>,
}

/// [`TurnGuard`] resolved to store keys.
#[derive(Clone)]
pub(super) struct GuardKeys {
    /// The idempotency record's key, the client's key and the call's digest.
    pub(super) idempotency: Option<(Vec<u8>, String, [u8; 32])>,
    /// The inbox key of (receiver, sender) and the message's sequence.
    inbox: Option<(Vec<u8>, u64)>,
    entity: String,
}

impl TurnGuard<'_> {
    pub(super) fn keys(&self, entity: &EntityRef, caller: Option<&EntityRef>) -> GuardKeys {
        GuardKeys {
            idempotency: self.idempotency.map(|(k, request)| (idempotency_key(entity, k), k.to_owned(), request)),
            inbox: match (self.message_seq, caller) {
                (Some(seq), Some(sender)) => Some((inbox_key(entity, sender), seq)),
                _ => None,
            },
            entity: entity.to_string(),
        }
    }
}

impl GuardKeys {
    /// The answer if this invocation already happened: the stored reply of its
    /// idempotency key (unless expired), or an empty reply for a message whose
    /// sequence the receiver has processed (one sender's messages arrive in order).
    /// A key first used for another call is refused, not answered.
    pub(super) fn check(&self, store: &dyn StateStore, now_ms: u64) -> Result<Option<Vec<u8>>, InvokeError> {
        let internal = |e: &dyn std::fmt::Display| InvokeError::Internal(format!("reading turn guard: {e}"));
        if let Some((key, client_key, request)) = &self.idempotency
            && let Some(bytes) = store.get(Keyspace::Idempotency, key).map_err(|e| internal(&e))?
        {
            let stored = IdempotentReply::decode(&bytes).map_err(|e| internal(&e))?;
            if stored.expires_at_ms > now_ms {
                if stored.request.is_some_and(|r| r != *request) {
                    return Err(InvokeError::IdempotencyKeyReused {
                        entity: self.entity.clone(),
                        key: client_key.clone(),
                    });
                }
                return Ok(Some(stored.reply));
            }
        }
        if let Some((key, seq)) = &self.inbox
            && let Some(bytes) = store.get(Keyspace::Inbox, key).map_err(|e| internal(&e))?
        {
            let last = u64::from_le_bytes(bytes.as_slice().try_into().map_err(|_| internal(&"bad inbox record"))?);
            if *seq <= last {
                return Ok(Some(Vec::new()));
            }
        }
        Ok(None)
    }

    /// Adds the records that make a retry of this turn answer early; returns
    /// whether it stored an idempotent reply.
    pub(super) fn record(&self, ops: &mut Vec<Op>, reply: &[u8], now_ms: u64, retention_ms: u64) -> bool {
        if let Some((key, seq)) = &self.inbox {
            ops.push(Op::Put { keyspace: Keyspace::Inbox, key: key.clone(), value: seq.to_le_bytes().to_vec() });
        }
        let Some((key, _, request)) = &self.idempotency else { return false };
        let expires_at_ms = now_ms.saturating_add(retention_ms);
        let value = IdempotentReply { expires_at_ms, reply: reply.to_vec(), request: Some(*request) }.encode();
        ops.push(Op::Put { keyspace: Keyspace::Idempotency, key: key.clone(), value });
        ops.push(Op::Put {
            keyspace: Keyspace::Idempotency,
            key: idempotency_expiry_key(expires_at_ms, key),
            value: Vec::new(),
        });
        true
    }
}
