//! The workloads and their correctness checks, identical for every system.
//!
//! - **counter**: `add 1` to key `n mod keys` for call `n`; afterwards every key
//!   that was addressed is read back, and the totals must add up to the
//!   acknowledged adds (an add that failed on the client may or may not have
//!   been applied, so the sum may exceed the acknowledged adds by at most the
//!   number of failed calls; anything below is a lost update).
//! - **team-joiner**: `users` users each get `teams` concurrent `join` calls
//!   naming different teams (calls `n = user * teams + team`, so a user's joins
//!   are in flight together). Afterwards every addressed user's teams are read
//!   back. A violation is a user on more than one team, or a user who was told
//!   "joined" for two different teams.
//!
//! Before measuring, every key (user) of the cell is read once, on every system
//! alike, so cells measure steady state rather than first activations.

use crate::load::{LoadSpec, Measured, Outcome, drive, for_each};
use crate::target::{CallError, Target};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

/// Readers used for warm-up and read-back.
const READERS: usize = 64;

/// The verdict of a cell's correctness check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub correct: bool,
    /// Lost updates (counter) or users violating the invariant (team-joiner).
    pub violations: u64,
    pub detail: String,
}

/// The operation of a counter cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterOp {
    /// `add 1`: a durable write per call.
    Add,
    /// `get`: read-only; the totals must stay 0.
    Get,
}

fn key(prefix: &str, k: u64) -> String {
    format!("{prefix}-{k}")
}

/// Reads every key in `0..n` once and returns their sum.
pub async fn sum_counters<T: Target>(t: &T, prefix: &str, n: u64) -> anyhow::Result<i64> {
    let (t, prefix) = (t.clone(), prefix.to_owned());
    let totals = for_each(n, READERS, move |k| {
        let (t, id) = (t.clone(), key(&prefix, k));
        async move { t.get(&id).await.map_err(|e| anyhow::anyhow!("reading counter {id}: {e}")) }
    })
    .await?;
    Ok(totals.into_iter().sum())
}

/// One counter cell: warm-up, load, read-back, check.
pub async fn counter_cell<T: Target>(
    t: &T,
    prefix: &str,
    keys: u64,
    op: CounterOp,
    spec: LoadSpec,
) -> anyhow::Result<(Measured, Check)> {
    sum_counters(t, prefix, keys).await?;
    let (target, p) = (t.clone(), prefix.to_owned());
    let m = drive(spec, move |n| {
        let (t, id) = (target.clone(), key(&p, n % keys));
        async move {
            let r = match op {
                CounterOp::Add => t.add(&id, 1).await,
                CounterOp::Get => t.get(&id).await,
            };
            if r.is_ok() { Outcome::Ok } else { Outcome::Error }
        }
    })
    .await;
    let total = sum_counters(t, prefix, m.issued.min(keys)).await?;
    let check = match op {
        CounterOp::Add => counter_check(total, m.ok as i64, m.errors as i64),
        CounterOp::Get if total == 0 => {
            Check { correct: true, violations: 0, detail: "read-only: every total is still 0".into() }
        }
        CounterOp::Get => Check {
            correct: false,
            violations: total.unsigned_abs(),
            detail: format!("read-only calls changed the totals to {total}"),
        },
    };
    Ok((m, check))
}

/// Judges a counter cell: `total` read back, `acked` acknowledged adds, and
/// `unsure` adds that failed on the client (each may or may not have applied).
pub fn counter_check(total: i64, acked: i64, unsure: i64) -> Check {
    if total < acked {
        Check {
            correct: false,
            violations: (acked - total) as u64,
            detail: format!("LOST {} acknowledged adds: total {total} < {acked} acknowledged", acked - total),
        }
    } else if total > acked + unsure {
        Check {
            correct: false,
            violations: (total - acked - unsure) as u64,
            detail: format!("total {total} exceeds the {} adds issued", acked + unsure),
        }
    } else if total == acked {
        Check { correct: true, violations: 0, detail: format!("total = {acked} acknowledged adds") }
    } else {
        Check {
            correct: true,
            violations: 0,
            detail: format!("total {total}: {acked} acknowledged + {} of {unsure} failed calls applied", total - acked),
        }
    }
}

/// The team-joiner cell: `users` × `teams` concurrent joins, then a read-back.
pub async fn team_cell<T: Target>(
    t: &T,
    prefix: &str,
    users: u64,
    teams: u64,
    spec: LoadSpec,
) -> anyhow::Result<(Measured, Check)> {
    let read = |n: u64| {
        let (t, prefix) = (t.clone(), prefix.to_owned());
        for_each(n, READERS, move |u| {
            let (t, id) = (t.clone(), key(&prefix, u));
            async move { t.teams(&id).await.map_err(|e| anyhow::anyhow!("reading user {id}: {e}")) }
        })
    };
    read(users).await?;
    let acked: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let (target, p, log) = (t.clone(), prefix.to_owned(), acked.clone());
    let spec = LoadSpec { max_requests: spec.max_requests.min(users * teams), ..spec };
    let m = drive(spec, move |n| {
        let (t, log) = (target.clone(), log.clone());
        let (user, team) = (n / teams, n % teams);
        let id = key(&p, user);
        async move {
            match t.join(&id, &format!("team-{team}")).await {
                Ok(()) => {
                    log.lock().expect("ack log").push((user, team));
                    Outcome::Ok
                }
                Err(CallError::Refused) => Outcome::Refused,
                Err(CallError::Failed(_)) => Outcome::Error,
            }
        }
    })
    .await;
    let addressed = m.issued.div_ceil(teams).min(users);
    let stored = read(addressed).await?;
    let mut told: HashMap<u64, BTreeSet<u64>> = HashMap::new();
    for (user, team) in acked.lock().expect("ack log").iter() {
        told.entry(*user).or_default().insert(*team);
    }
    let (mut on_two, mut told_two) = (0u64, 0u64);
    let mut violations = 0u64;
    for (u, s) in stored.iter().enumerate() {
        let distinct: BTreeSet<&String> = s.iter().collect();
        let two_stored = distinct.len() > 1;
        let two_told = told.get(&(u as u64)).is_some_and(|t| t.len() > 1);
        on_two += two_stored as u64;
        told_two += two_told as u64;
        violations += (two_stored || two_told) as u64;
    }
    let detail = format!(
        "{violations} of {addressed} users violate (on two teams: {on_two}; told \"joined\" for two teams: {told_two})"
    );
    Ok((m, Check { correct: violations == 0, violations, detail }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_verdicts() {
        assert!(counter_check(10, 10, 0).correct);
        assert!(counter_check(11, 10, 2).correct);
        let lost = counter_check(7, 10, 2);
        assert!(!lost.correct);
        assert_eq!(lost.violations, 3);
        assert!(lost.detail.starts_with("LOST 3"));
        assert!(!counter_check(13, 10, 2).correct);
    }
}
