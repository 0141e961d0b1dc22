//! The `lock` example (deployed as type `lock`): a lease lock with fencing tokens,
//! as in the seeds' "locks with fencing" section.
//!
//! `acquire` grants the lock for `ttl_ms` and returns a fencing token that grows by
//! one with every new holder. A durable timer releases the lock when the lease runs
//! out, even across restarts; `release` cancels that timer. A resource protected by
//! the lock accepts a write only with the newest token it has seen (`check` tells
//! whether a token is still the current holder's), so a holder that paused past its
//! lease cannot corrupt anything. See README.md.

use conflux_sdk::prelude::*;
use std::time::Duration;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Lock {
    pub owner: Option<String>,
    /// The newest fencing token handed out (0: never held).
    pub token: u64,
    pub expires_at_ms: u64,
    timer: Option<TimerId>,
    /// How many lease timers have fired (whether or not they still had a lease to end).
    pub expirations: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Acquire {
    pub owner: String,
    pub ttl_ms: u64,
}

/// What `acquire` grants.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub token: u64,
    pub expires_at_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Release {
    pub owner: String,
    pub token: u64,
}

#[entity]
impl Lock {
    /// Grants the lock to `owner` for `ttl_ms` (1 ms ..= 1 day). The current holder may
    /// call it again to extend its lease (same token).
    pub fn acquire(&mut self, a: Acquire) -> Result<Lease, Error> {
        if a.owner.is_empty() || !(1..=86_400_000).contains(&a.ttl_ms) {
            return Err(Error::bad_request("owner must be non-empty and ttl_ms in 1..=86400000"));
        }
        match &self.owner {
            Some(o) if *o != a.owner => {
                return Err(Error::failed(format!("held by {o} until {} (token {})", self.expires_at_ms, self.token)));
            }
            Some(_) => {}
            None => {
                self.token += 1;
                self.owner = Some(a.owner.clone());
            }
        }
        if let Some(t) = self.timer.take() {
            messaging::cancel(&t);
        }
        self.expires_at_ms = context::now_ms() + a.ttl_ms;
        let me = context::self_ref().id;
        self.timer = Some(Lock::send_after(Duration::from_millis(a.ttl_ms), me).expire(&self.token)?);
        Ok(Lease { token: self.token, expires_at_ms: self.expires_at_ms })
    }

    /// Gives the lock up early; only its holder, with the current token, may.
    pub fn release(&mut self, r: Release) -> Result<(), Error> {
        if self.owner.as_deref() != Some(r.owner.as_str()) || r.token != self.token {
            return Err(Error::failed(format!("{} with token {} does not hold the lock", r.owner, r.token)));
        }
        self.owner = None;
        if let Some(t) = self.timer.take() {
            messaging::cancel(&t);
        }
        Ok(())
    }

    /// (Timer.) The lease that got `token` ran out.
    pub fn expire(&mut self, token: u64) -> Result<(), Error> {
        if context::caller() != Some(context::self_ref()) {
            return Err(Error::bad_request("'expire' is the lock's own timer"));
        }
        self.expirations += 1;
        if token == self.token && self.owner.is_some() {
            log::info(&format!("lease of {:?} (token {token}) expired", self.owner));
            self.owner = None;
            self.timer = None;
        }
        Ok(())
    }

    /// Whether `token` belongs to the current holder: what a fenced resource asks
    /// before accepting a write.
    pub fn check(&self, token: u64) -> bool {
        self.owner.is_some() && token == self.token
    }

    pub fn holder(&self) -> &Self {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conflux_sdk::testing::TestHarness;

    fn acquire(h: &mut TestHarness, owner: &str) -> Result<Lease, Error> {
        h.call::<Lock, _, Lease>("acquire", &Acquire { owner: owner.into(), ttl_ms: 1000 })
    }

    #[test]
    fn tokens_grow_with_each_holder_and_the_lease_timer_frees_the_lock() {
        let mut h = TestHarness::new("lock", "l");
        h.set_now_ms(5);
        assert_eq!(acquire(&mut h, "a").unwrap(), Lease { token: 1, expires_at_ms: 1005 });
        assert!(matches!(acquire(&mut h, "b"), Err(Error::Failed(m)) if m.contains("held by a")));
        let timers = h.timers();
        assert_eq!((timers.len(), timers[0].operation.as_str(), timers[0].arg::<u64>()), (1, "expire", 1));
        // The timer fires: the lock is free and the next holder gets token 2.
        h.set_caller(Some(EntityRef::new("lock", "l")));
        h.call::<Lock, _, ()>("expire", &1u64).unwrap();
        assert!(!h.call::<Lock, _, bool>("check", &1u64).unwrap());
        assert_eq!(acquire(&mut h, "b").unwrap().token, 2);
    }

    #[test]
    fn release_cancels_the_timer_and_needs_the_current_token() {
        let mut h = TestHarness::new("lock", "l");
        acquire(&mut h, "a").unwrap();
        let stale = Release { owner: "a".into(), token: 7 };
        assert!(h.call::<Lock, _, ()>("release", &stale).is_err());
        h.call::<Lock, _, ()>("release", &Release { owner: "a".into(), token: 1 }).unwrap();
        assert!(h.timers().is_empty(), "the lease timer was cancelled");
        // Only the lock itself may expire a lease.
        h.set_caller(None);
        assert!(matches!(h.call::<Lock, _, ()>("expire", &1u64), Err(Error::BadRequest(_))));
    }
}
