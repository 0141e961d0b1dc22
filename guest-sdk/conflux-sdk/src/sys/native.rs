//! Native back end of the platform layer: a thread-local "turn" that
//! [`crate::testing::TestHarness`] installs around each call, mirroring the host's
//! semantics (buffered writes, reads see the turn's own writes, byte-ordered listing).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Bound;

use crate::EntityRef;

const OUTSIDE_TURN: &str = "conflux-sdk: state/context/log functions only work inside a turn. \
On native targets, run the entity through `conflux_sdk::testing::TestHarness` \
(e.g. `TestHarness::new(\"counter\", \"c1\").call::<Counter, _, i64>(\"add\", &5)`); \
in production they are provided by the Conflux host.";

/// One log line written during a turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogLine {
    pub(crate) level: u8,
    pub(crate) message: String,
}

/// A message a turn sent, or a timer it set (`delay_ms` is `Some`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sent {
    pub(crate) timer_id: Option<String>,
    pub(crate) target: EntityRef,
    pub(crate) operation: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) delay_ms: Option<u64>,
}

/// An ask a turn made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Asked {
    pub(crate) id: String,
    pub(crate) target: EntityRef,
    pub(crate) operation: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) continuation: String,
    pub(crate) context: Vec<u8>,
    pub(crate) timeout_ms: Option<u64>,
}

/// Everything a running turn can see and touch.
#[derive(Debug)]
pub(crate) struct Turn {
    /// Timers set by earlier, committed turns and not cancelled, by id.
    pub(crate) timers: BTreeMap<String, Sent>,
    /// Messages and timers this turn sent.
    pub(crate) sent: Vec<Sent>,
    /// Committed timers this turn cancelled.
    pub(crate) cancelled: Vec<String>,
    /// The id the next timer gets.
    pub(crate) next_timer: u64,
    /// The committed state, as of the start of the turn.
    pub(crate) store: BTreeMap<String, Vec<u8>>,
    /// This turn's writes: `Some` = set, `None` = delete.
    pub(crate) writes: BTreeMap<String, Option<Vec<u8>>>,
    pub(crate) self_ref: EntityRef,
    pub(crate) caller: Option<EntityRef>,
    pub(crate) invocation_id: String,
    pub(crate) now_ms: u64,
    pub(crate) logs: Vec<LogLine>,
    /// Asks this turn made.
    pub(crate) asked: Vec<Asked>,
    /// For a continuation turn, its reply.
    pub(crate) reply: Option<crate::messaging::RawReply>,
}

thread_local! {
    static TURN: RefCell<Option<Turn>> = const { RefCell::new(None) };
}

/// Installs `turn` as the current one. Panics if a turn is already running on this thread.
pub(crate) fn begin(turn: Turn) {
    TURN.with(|cell| {
        let mut slot = cell.borrow_mut();
        assert!(
            slot.is_none(),
            "conflux-sdk: a TestHarness turn is already running on this thread \
             (harness calls cannot be nested)"
        );
        *slot = Some(turn);
    });
}

/// Removes and returns the current turn.
pub(crate) fn end() -> Option<Turn> {
    TURN.with(|cell| cell.borrow_mut().take())
}

fn with<R>(f: impl FnOnce(&mut Turn) -> R) -> R {
    TURN.with(|cell| {
        let mut slot = cell.borrow_mut();
        let Some(turn) = slot.as_mut() else { panic!("{OUTSIDE_TURN}") };
        f(turn)
    })
}

pub(crate) fn state_get(key: &str) -> Option<Vec<u8>> {
    with(|t| match t.writes.get(key) {
        Some(buffered) => buffered.clone(),
        None => t.store.get(key).cloned(),
    })
}

pub(crate) fn state_set(key: &str, value: &[u8]) {
    with(|t| {
        t.writes.insert(key.to_owned(), Some(value.to_vec()));
    })
}

pub(crate) fn state_delete(key: &str) {
    with(|t| {
        t.writes.insert(key.to_owned(), None);
    })
}

pub(crate) fn state_list(prefix: &str, start_after: Option<&str>, limit: u32) -> Vec<(String, Vec<u8>)> {
    with(|t| list_merged(&t.store, &t.writes, prefix, start_after, limit))
}

/// Keys starting with `prefix`, strictly after `start_after`, in byte order, at most
/// `limit`, as seen through the write buffer `writes` laid over `store`.
pub(crate) fn list_merged(
    store: &BTreeMap<String, Vec<u8>>,
    writes: &BTreeMap<String, Option<Vec<u8>>>,
    prefix: &str,
    start_after: Option<&str>,
    limit: u32,
) -> Vec<(String, Vec<u8>)> {
    // `str` ordering is byte ordering of the UTF-8 encoding, as the host uses.
    let lower = match start_after {
        Some(after) if after >= prefix => Bound::Excluded(after),
        _ => Bound::Included(prefix),
    };
    let range = (lower, Bound::Unbounded);
    let mut merged: BTreeMap<&str, &[u8]> = store
        .range::<str, _>(range)
        .take_while(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    for (k, w) in writes.range::<str, _>(range).take_while(|(k, _)| k.starts_with(prefix)) {
        match w {
            Some(v) => merged.insert(k.as_str(), v.as_slice()),
            None => merged.remove(k.as_str()),
        };
    }
    merged.into_iter().take(limit as usize).map(|(k, v)| (k.to_owned(), v.to_vec())).collect()
}

pub(crate) fn self_ref() -> EntityRef {
    with(|t| t.self_ref.clone())
}

pub(crate) fn caller() -> Option<EntityRef> {
    with(|t| t.caller.clone())
}

pub(crate) fn invocation_id() -> String {
    with(|t| t.invocation_id.clone())
}

pub(crate) fn now_ms() -> u64 {
    with(|t| t.now_ms)
}

pub(crate) fn log(level: u8, message: &str) {
    with(|t| t.logs.push(LogLine { level, message: message.to_owned() }))
}

pub(crate) fn send(target: &EntityRef, operation: &str, payload: &[u8]) {
    with(|t| {
        t.sent.push(Sent {
            timer_id: None,
            target: target.clone(),
            operation: operation.to_owned(),
            payload: payload.to_vec(),
            delay_ms: None,
        })
    })
}

pub(crate) fn send_after(delay_ms: u64, target: &EntityRef, operation: &str, payload: &[u8]) -> String {
    with(|t| {
        let id = t.next_timer.to_string();
        t.next_timer += 1;
        t.sent.push(Sent {
            timer_id: Some(id.clone()),
            target: target.clone(),
            operation: operation.to_owned(),
            payload: payload.to_vec(),
            delay_ms: Some(delay_ms),
        });
        id
    })
}

pub(crate) fn cancel(timer_id: &str) -> bool {
    with(|t| {
        if let Some(pos) = t.sent.iter().position(|s| s.timer_id.as_deref() == Some(timer_id)) {
            t.sent.remove(pos);
            return true;
        }
        if t.timers.contains_key(timer_id) && !t.cancelled.iter().any(|c| c == timer_id) {
            t.cancelled.push(timer_id.to_owned());
            return true;
        }
        false
    })
}

pub(crate) fn ask(
    target: &EntityRef,
    operation: &str,
    payload: &[u8],
    continuation: &str,
    context: &[u8],
    timeout_ms: Option<u64>,
) -> String {
    with(|t| {
        // Ask ids share the timers' sequence, as on the host.
        let id = t.next_timer.to_string();
        t.next_timer += 1;
        t.asked.push(Asked {
            id: id.clone(),
            target: target.clone(),
            operation: operation.to_owned(),
            payload: payload.to_vec(),
            continuation: continuation.to_owned(),
            context: context.to_vec(),
            timeout_ms,
        });
        id
    })
}

pub(crate) fn reply() -> Option<crate::messaging::RawReply> {
    with(|t| t.reply.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(keys: &[&str]) -> BTreeMap<String, Vec<u8>> {
        keys.iter().map(|k| (k.to_string(), k.as_bytes().to_vec())).collect()
    }

    fn keys(v: Vec<(String, Vec<u8>)>) -> Vec<String> {
        v.into_iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn list_merges_buffer_over_store() {
        let s = store(&["a/1", "a/2", "a/4", "b/1", "a"]);
        let mut w = BTreeMap::new();
        w.insert("a/3".to_string(), Some(b"new".to_vec()));
        w.insert("a/2".to_string(), None);
        w.insert("a/4".to_string(), Some(b"over".to_vec()));
        w.insert("c/1".to_string(), Some(b"x".to_vec()));
        let all = list_merged(&s, &w, "a/", None, 10);
        assert_eq!(keys(all.clone()), ["a/1", "a/3", "a/4"]);
        assert_eq!(all[2].1, b"over");
        assert_eq!(keys(list_merged(&s, &w, "a/", Some("a/1"), 10)), ["a/3", "a/4"]);
        assert_eq!(keys(list_merged(&s, &w, "a/", Some("a/3"), 1)), ["a/4"]);
        assert_eq!(keys(list_merged(&s, &w, "a/", None, 2)), ["a/1", "a/3"]);
        assert_eq!(keys(list_merged(&s, &w, "a/", Some("0"), 1)), ["a/1"]);
        assert!(list_merged(&s, &w, "a/", Some("z"), 10).is_empty());
        assert!(list_merged(&s, &w, "a/", None, 0).is_empty());
        assert_eq!(keys(list_merged(&s, &w, "", None, 10)), ["a", "a/1", "a/3", "a/4", "b/1", "c/1"]);
    }

    #[test]
    fn byte_order_not_char_order() {
        // 'Z' (0x5a) < 'a' (0x61) < 'é' (0xc3 0xa9) in byte order.
        let s = store(&["k/é", "k/a", "k/Z"]);
        assert_eq!(keys(list_merged(&s, &BTreeMap::new(), "k/", None, 10)), ["k/Z", "k/a", "k/é"]);
    }

    #[test]
    #[should_panic(expected = "TestHarness")]
    fn outside_a_turn_panics_helpfully() {
        now_ms();
    }
}
