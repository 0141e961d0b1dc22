//! The batch tests of [`super`]: turns queued on one entity commit
//! together, each atomic, guards seeing their batch, a failed commit
//! failing every turn; and a turn sharing its async thread while it runs.

use super::*;
use crate::config::Config;
use crate::scheduler::test_support::{Harness, call};
use tokio::task::JoinHandle;

type Reply = JoinHandle<Result<Vec<u8>, InvokeError>>;

fn counter(id: &str) -> EntityRef {
    EntityRef::new("counter", id).unwrap()
}

fn text(reply: &Result<Vec<u8>, InvokeError>) -> String {
    match reply {
        Ok(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Err(e) => format!("error {}: {e}", e.kind().as_str()),
    }
}

/// Holds the log, runs `first` until its commit waits at the gate, queues
/// `rest` behind it in the entity's mailbox, then lets `before_release`
/// script the log and releases it: `rest` is one batch. Replies in order.
async fn batch(
    h: &Harness,
    entity: &EntityRef,
    first: Invocation,
    rest: Vec<Invocation>,
    before_release: impl AsyncFnOnce(&Harness),
) -> (Result<Vec<u8>, InvokeError>, Vec<Result<Vec<u8>, InvokeError>>) {
    let base = h.log.proposals();
    h.log.hold();
    let s = h.scheduler.clone();
    let first: Reply = tokio::spawn(async move { s.invoke_here(first).await });
    h.until("the first turn's commit waits", || h.log.proposals() == base + 1).await;
    let mut queued: Vec<Reply> = Vec::new();
    for (i, inv) in rest.into_iter().enumerate() {
        let s = h.scheduler.clone();
        queued.push(tokio::spawn(async move { s.invoke_here(inv).await }));
        // One at a time, so the mailbox holds them in this order.
        h.until("the invocation waits in the mailbox", || h.scheduler.mailbox_len(entity) == i + 1).await;
    }
    before_release(h).await;
    h.log.release();
    let first = first.await.unwrap();
    let mut replies = Vec::new();
    for q in queued {
        replies.push(q.await.unwrap());
    }
    (first, replies)
}

/// Batches commit one at a time here (no pipelining), so invocations
/// queued behind a held commit stay in the mailbox until it commits,
/// however many.
async fn counter_harness(max_turns_per_commit: usize) -> Harness {
    let mut cfg = Config::default();
    cfg.scheduler.max_turns_per_commit = max_turns_per_commit;
    cfg.scheduler.pipelined_commits = 1;
    Harness::new(cfg, &[("counter", "counter"), ("faulty", "faulty")]).await
}

/// The hot-key lever: adds queued behind a commit run as one batch — one
/// proposal for all of them, each reading the previous one's total — and
/// the total is exact. With `max_turns_per_commit = 1` each commits alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adds_queued_on_one_entity_commit_together() {
    const N: usize = 24;
    for (max, commits) in [(64, 1), (1, N as u64 - 1), (8, 3)] {
        let h = counter_harness(max).await;
        let e = counter("hot");
        let base = h.log.proposals();
        let rest = (1..N).map(|_| call(&e, "add", "1")).collect();
        let (first, replies) = batch(&h, &e, call(&e, "add", "1"), rest, async |_| {}).await;
        assert_eq!(text(&first), "1");
        // In mailbox order, each turn saw the writes of the ones before it.
        let totals: Vec<String> = replies.iter().map(text).collect();
        let expected: Vec<String> = (2..=N).map(|n| n.to_string()).collect();
        assert_eq!(totals, expected, "max_turns_per_commit = {max}");
        assert_eq!(h.log.proposals() - base, 1 + commits, "max_turns_per_commit = {max}");
        let confirmations = h.log.confirmations();
        assert_eq!(text(&h.scheduler.invoke_here(call(&e, "get", "")).await), N.to_string());
        assert_eq!(h.log.confirmations(), confirmations + 1, "a read alone confirms the lead once");
        let stats = h.scheduler.stats();
        assert_eq!((stats.turns_ok, stats.turns_failed), (N as u64 + 1, 0));
    }
}

/// A turn that fails in the middle of a batch (a guest error after a
/// write, a trap after a write) contributes nothing: the turns after it
/// read (and commit) as if it never ran, each on a fresh instance, and
/// its neighbours' writes commit. Reads in the batch are answered after
/// the commit, without a lead confirmation of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_turn_in_a_batch_adds_nothing_and_its_neighbours_commit() {
    let h = counter_harness(64).await;
    let e = EntityRef::new("faulty", "f").unwrap();
    let base = h.log.proposals();
    let rest = vec![
        call(&e, "put", r#""one""#),
        call(&e, "set_then_fail", ""),
        call(&e, "get", ""),
        call(&e, "set_then_panic", ""),
        call(&e, "get", ""),
        call(&e, "seed", ""),
        call(&e, "read_your_writes", ""),
    ];
    let (first, replies) = batch(&h, &e, call(&e, "put", r#""zero""#), rest, async |_| {}).await;
    assert_eq!(text(&first), "null");
    let replies: Vec<String> = replies.iter().map(text).collect();
    assert_eq!(replies[0], "null");
    assert!(replies[1].starts_with("error failed"), "{}", replies[1]);
    assert_eq!(replies[2], r#""one""#);
    assert!(replies[3].starts_with("error trap"), "{}", replies[3]);
    assert_eq!(replies[4], r#""one""#);
    assert_eq!(replies[5], "null");
    // `list` through the batch's pending writes: `seed`'s keys, not committed yet.
    assert_eq!(replies[6], r#"["a=Some(1)","a=None","list=p/0,p/1,p/3","after=p/1"]"#);
    assert_eq!(h.log.proposals() - base, 2, "the batch committed as one write set");
    assert_eq!(h.log.confirmations(), 0, "the fenced commit confirmed the batch's reads");
    assert_eq!(text(&h.scheduler.invoke_here(call(&e, "get", "")).await), r#""one""#);
    let stats = h.scheduler.stats();
    // The first instance, one after the error, one after the trap.
    assert_eq!(stats.instantiations, 3);
    assert_eq!((stats.turns_ok, stats.turns_failed), (7, 2));
}

/// The guards see the batch's own records: the same idempotency key
/// twice in one batch runs once and both get the first reply (another
/// call under it is refused); a message sequence redelivered in one batch
/// is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guards_see_the_records_of_their_own_batch() {
    let h = counter_harness(64).await;
    let e = counter("guarded");
    let keyed = |payload: &str| Invocation { idempotency_key: Some("k1".into()), ..call(&e, "add", payload) };
    let sender = counter("sender");
    let message = |seq| Invocation { caller: Some(sender.clone()), message_seq: Some(seq), ..call(&e, "add", "10") };
    let rest = vec![keyed("1"), keyed("1"), keyed("2"), message(7), message(7), message(8), message(7)];
    let (first, replies) = batch(&h, &e, call(&e, "add", "5"), rest, async |_| {}).await;
    assert_eq!(text(&first), "5");
    let replies: Vec<String> = replies.iter().map(text).collect();
    assert_eq!(replies[..2], ["6", "6"]);
    assert!(replies[2].starts_with("error idempotency-key-reused"), "{}", replies[2]);
    assert_eq!(replies[3..], ["16", "", "26", ""]);
    assert_eq!(text(&h.scheduler.invoke_here(call(&e, "get", "")).await), "26");
    // And across commits, as before.
    assert_eq!(text(&h.scheduler.invoke_here(keyed("1")).await), "6");
    assert_eq!(text(&h.scheduler.invoke_here(message(8)).await), "");
}

/// A batch whose commit fails answers every turn with the error its own
/// commit would have given — fenced: not here (nothing applied); unknown
/// outcome: the commit error for writers, not-here for its read — and
/// leaves nothing cached: the next turn reads the store (after a barrier
/// when in doubt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_commit_fails_every_turn_and_keeps_nothing() {
    for fenced in [true, false] {
        let h = counter_harness(64).await;
        let e = counter("c");
        let rest = vec![call(&e, "add", "1"), call(&e, "get", ""), call(&e, "add", "1")];
        let (first, replies) = batch(&h, &e, call(&e, "add", "1"), rest, async |h: &Harness| {
            h.log.fail_next(if fenced {
                LogError::Fenced { fence_term: 1, entry_term: 2 }
            } else {
                LogError::Aborted("lost".into())
            })
        })
        .await;
        assert_eq!(text(&first), "1");
        let kinds: Vec<&str> = replies.iter().map(|r| r.as_ref().unwrap_err().kind().as_str()).collect();
        let writer = if fenced { "not-leader" } else { "commit" };
        assert_eq!(kinds, [writer, "not-leader", writer], "fenced: {fenced}");
        let proposals = h.log.proposals();
        assert_eq!(text(&h.scheduler.invoke_here(call(&e, "get", "")).await), "1", "fenced: {fenced}");
        // In doubt, a barrier was committed before the store was read again.
        assert_eq!(h.log.proposals() - proposals, u64::from(!fenced));
        let stats = h.scheduler.stats();
        assert_eq!((stats.turns_ok, stats.turns_failed), (2, 3), "fenced: {fenced}");
    }
}

/// The mailbox stays bounded: with `mailbox_depth` invocations waiting
/// behind a turn, the next is refused, and the waiting ones still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_refuses() {
    let mut cfg = Config::default();
    cfg.scheduler.mailbox_depth = 3;
    cfg.scheduler.pipelined_commits = 1;
    let h = Harness::new(cfg, &[("counter", "counter")]).await;
    let e = counter("c");
    let rest = (0..3).map(|_| call(&e, "add", "1")).collect();
    let (_, replies) = batch(&h, &e, call(&e, "add", "1"), rest, async |h: &Harness| {
        let refused = h.scheduler.invoke_here(call(&e, "add", "1")).await;
        assert!(matches!(refused, Err(InvokeError::MailboxFull { depth: 3, .. })), "{refused:?}");
    })
    .await;
    assert_eq!(replies.iter().map(text).collect::<Vec<_>>(), ["2", "3", "4"]);
}

/// Starts `add 1` on `e` in a task of its own.
fn add(h: &Harness, e: &EntityRef) -> Reply {
    let (s, inv) = (h.scheduler.clone(), call(e, "add", "1"));
    tokio::spawn(async move { s.invoke_here(inv).await })
}

/// Starts `add 1` on `e` and waits until its batch is in the log
/// (`proposals` in all).
async fn placed(h: &Harness, e: &EntityRef, proposals: u64) -> Reply {
    let reply = add(h, e);
    h.until("the batch is placed in the log", || h.log.proposals() == proposals).await;
    reply
}

/// The replies, in order, as text.
async fn texts(replies: Vec<Reply>) -> Vec<String> {
    let mut out = Vec::with_capacity(replies.len());
    for r in replies {
        out.push(text(&r.await.unwrap()));
    }
    out
}

/// Pipelined commits: while one batch's commit is held, the next full
/// batches of the hot entity (one turn each here) run, each reading the
/// writes in flight, and are placed in the log behind it, up to
/// `pipelined_commits` in flight; the next waits in the mailbox. Nobody is
/// answered before the commit, then all are, in order, with exact totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_entitys_next_batches_run_while_the_first_commits() {
    let mut cfg = Config::default();
    cfg.scheduler.pipelined_commits = 3;
    cfg.scheduler.max_turns_per_commit = 1;
    let h = Harness::new(cfg, &[("counter", "counter")]).await;
    let e = counter("hot");
    let base = h.log.proposals();
    h.log.hold();
    let mut replies = Vec::new();
    for n in 1..=3 {
        replies.push(placed(&h, &e, base + n).await);
    }
    replies.push(add(&h, &e));
    h.until("the fourth waits in the mailbox", || h.scheduler.mailbox_len(&e) == 1).await;
    assert_eq!(h.log.proposals(), base + 3, "three batches in flight at most");
    assert!(replies.iter().all(|r| !r.is_finished()), "answered before the commit");
    h.log.release();
    assert_eq!(texts(replies).await, ["1", "2", "3", "4"]);
    assert_eq!(text(&h.scheduler.invoke_here(call(&e, "get", "")).await), "4");
}

/// Behind a commit in flight, invocations gather in the mailbox until they
/// fill a batch (`max_turns_per_commit`): then that batch runs and goes in
/// flight too, while a smaller one waits for the commit and shares the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_commit_in_flight_only_a_full_batch_starts() {
    let mut cfg = Config::default();
    cfg.scheduler.max_turns_per_commit = 3;
    let h = Harness::new(cfg, &[("counter", "counter")]).await;
    let e = counter("hot");
    let base = h.log.proposals();
    h.log.hold();
    let mut replies = vec![placed(&h, &e, base + 1).await];
    for n in 1..=4 {
        replies.push(add(&h, &e));
        if n < 3 {
            h.until("the invocation waits in the mailbox", || h.scheduler.mailbox_len(&e) == n).await;
            assert_eq!(h.log.proposals(), base + 1, "a partial batch started behind the commit");
        } else {
            h.until("a full batch is placed", || h.log.proposals() == base + 2).await;
        }
    }
    h.until("the fifth waits in the mailbox", || h.scheduler.mailbox_len(&e) == 1).await;
    h.log.release();
    assert_eq!(texts(replies).await, ["1", "2", "3", "4", "5"]);
    assert_eq!(h.log.proposals(), base + 3, "the fifth committed alone, after the commits in flight");
}

/// A batch in flight whose commit fails takes every batch after it with
/// it: those read its writes, so none is acknowledged (the log commits
/// none of them without it), and the entity starts over from the store —
/// after a barrier when the outcome is unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_in_flight_fails_every_batch_that_read_it() {
    for fenced in [true, false] {
        let mut cfg = Config::default();
        cfg.scheduler.max_turns_per_commit = 1;
        let h = Harness::new(cfg, &[("counter", "counter")]).await;
        let e = counter("c");
        assert_eq!(text(&h.scheduler.invoke_here(call(&e, "add", "1")).await), "1");
        let base = h.log.proposals();
        h.log.hold();
        h.log.fail_next(if fenced {
            LogError::Fenced { fence_term: 1, entry_term: 2 }
        } else {
            LogError::Aborted("lost".into())
        });
        let first = placed(&h, &e, base + 1).await;
        let second = placed(&h, &e, base + 2).await;
        h.log.release();
        let kind = if fenced { "not-leader" } else { "commit" };
        for r in [first, second] {
            let r = r.await.unwrap();
            assert_eq!(r.as_ref().err().map(|e| e.kind().as_str()), Some(kind), "fenced: {fenced}: {}", text(&r));
        }
        let proposals = h.log.proposals();
        assert_eq!(text(&h.scheduler.invoke_here(call(&e, "get", "")).await), "1", "fenced: {fenced}");
        assert_eq!(h.log.proposals() - proposals, u64::from(!fenced), "a barrier only when in doubt");
    }
}

/// Turns run as futures on the node's async threads: a guest that spins
/// yields at every epoch tick, so on a runtime of one thread a task that
/// became ready meanwhile (here a timer) runs before the turn's deadline
/// ends it, not after.
#[tokio::test(flavor = "current_thread")]
async fn a_spinning_turn_yields_its_thread_at_every_tick() {
    let mut cfg = Config::default();
    cfg.runtime.turn_timeout_ms = 2_000;
    cfg.runtime.fuel_per_turn = 0;
    let h = Harness::new(cfg, &[("faulty", "faulty")]).await;
    let woke = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let woke2 = woke.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        woke2.store(true, Ordering::SeqCst);
    });
    let spun = h.scheduler.invoke_here(call(&EntityRef::new("faulty", "spin").unwrap(), "infinite_loop", "")).await;
    let woke_during_the_turn = woke.load(Ordering::SeqCst);
    assert!(text(&spun).starts_with("error timeout"), "{}", text(&spun));
    assert!(woke_during_the_turn, "the timer's task waited for the spinning turn to end");
}

/// A member whose metadata replica has not caught up (after a power cut it
/// re-applies the registry's records after the API is up) may not know a
/// type that exists: the call is retryable (`component-loading`), not
/// `unknown-type`, until the registry is synced.
#[tokio::test]
async fn an_unknown_type_is_loading_until_the_registry_has_caught_up() {
    let h = Harness::new(Config::default(), &[("counter", "counter")]).await;
    let registry = &h.scheduler.inner.registry;
    let ghost = EntityRef::new("ghost", "g").unwrap();
    registry.set_synced(false);
    assert!(matches!(registry.version_for(&ghost), Err(crate::registry::RegistryError::Loading { .. })));
    assert!(registry.version_for(&counter("c")).is_ok(), "a loaded type is served meanwhile");
    registry.set_synced(true);
    assert!(matches!(registry.version_for(&ghost), Err(crate::registry::RegistryError::UnknownType(_))));
}

/// A callee that refuses an ask still answers it (the refusal goes back in
/// its outbox), but nothing else of its turn commits — not even the
/// migration that turn ran first: the next turn migrates again.
#[tokio::test]
async fn a_refused_ask_answers_but_does_not_record_the_migration_its_turn_ran() {
    use crate::model::{Message, MessageKind, Record};
    let h = Harness::new(Config::default(), &[("tally", "tally_v1")]).await;
    let t = EntityRef::new("tally", "t").unwrap();
    h.scheduler.invoke_here(call(&t, "add", "5")).await.unwrap();
    let v2 = crate::scheduler::test_support::guest("tally_v2");
    h.scheduler.inner.registry.deploy("tally", v2, None).await.unwrap();
    let asker = EntityRef::new("asker", "a").unwrap();
    let ask = Invocation {
        caller: Some(asker.clone()),
        message_seq: Some(1),
        kind: MessageKind::Ask,
        ..call(&t, "nope", "")
    };
    h.scheduler.invoke_here(ask).await.expect("a refusal is an answer to the asker");
    let outbox = h.scheduler.inner.store.scan(Keyspace::Outbox, b"", None, 10).unwrap();
    let answers: Vec<Message> = outbox.iter().map(|(_, v)| Message::decode(v).unwrap()).collect();
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0].target, asker);
    assert!(
        matches!(
            &answers[0].kind,
            MessageKind::Reply {
                ask_seq: 1,
                outcome: Err(crate::model::AskFailure::Refused {
                    kind: crate::model::RefusalKind::UnknownOperation,
                    ..
                })
            }
        ),
        "{:?}",
        answers[0].kind
    );
    let got = h.scheduler.invoke_here(call(&t, "get", "")).await.unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&got).unwrap(),
        serde_json::json!({"count": 5, "migrated_from": 1, "migrations": 1}),
        "the migration ran on the first turn that committed"
    );
}
