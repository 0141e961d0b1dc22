//! A guest for the messaging tests (type `relay`): it fans messages out to any
//! entity, sends numbered sequences to another relay that checks they arrive in
//! order, sets and cancels timers, and plays a slow receiver (`nap`).

use conflux_sdk::prelude::*;
use std::time::Duration;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Relay {
    /// Receiver side of `sequence`: the last number seen and how many arrived out of order.
    pub last: u64,
    pub violations: u64,
    pub received: u64,
}

/// `count` copies of `operation(payload)` to `target_type/target_id`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Fanout {
    pub target_type: String,
    pub target_id: String,
    pub operation: String,
    pub payload: conflux_sdk::serde_json::Value,
    pub count: u32,
}

/// `expect(n)` for n in `from..from + count`, to relay `target_id`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Sequence {
    pub target_id: String,
    pub from: u64,
    pub count: u32,
}

/// A timer sending `operation(payload)` to `target_type/target_id` after `delay_ms`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Later {
    pub delay_ms: u64,
    pub target_type: String,
    pub target_id: String,
    pub operation: String,
    pub payload: conflux_sdk::serde_json::Value,
}

#[entity]
impl Relay {
    pub fn fanout(&self, f: Fanout) -> Result<(), Error> {
        let target = EntityRef::new(f.target_type, f.target_id);
        for _ in 0..f.count {
            messaging::send(&target, &f.operation, &f.payload)?;
        }
        Ok(())
    }

    pub fn sequence(&self, s: Sequence) -> Result<(), Error> {
        for n in s.from..s.from + u64::from(s.count) {
            Relay::send_to(s.target_id.clone()).expect(&n)?;
        }
        Ok(())
    }

    /// Receiver side of `sequence`: numbers must arrive as 1, 2, 3, …
    pub fn expect(&mut self, n: u64) {
        if n != self.last + 1 {
            self.violations += 1;
        }
        self.last = n;
        self.received += 1;
    }

    pub fn later(&self, l: Later) -> Result<TimerId, Error> {
        let target = EntityRef::new(l.target_type, l.target_id);
        messaging::send_after(Duration::from_millis(l.delay_ms), &target, &l.operation, &l.payload)
    }

    pub fn cancel(&self, id: TimerId) -> bool {
        messaging::cancel(&id)
    }

    /// Sends a message and then fails: the message must never leave.
    pub fn send_then_fail(&self, target_id: String) -> Result<(), Error> {
        Relay::send_to(target_id).expect(&1)?;
        Err(Error::failed("refusing after sending"))
    }

    /// A slow receiver: sleeps `ms` inside its turn (bounded by the turn's
    /// deadline), then counts the call. Prints before and after, so a test can
    /// tell a nap in progress from one done.
    pub fn nap(&mut self, ms: u64) {
        println!("nap begins");
        std::thread::sleep(Duration::from_millis(ms));
        println!("nap ends");
        self.received += 1;
    }

    pub fn stats(&self) -> &Self {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conflux_sdk::testing::TestHarness;

    #[test]
    fn a_failed_turn_sends_nothing_and_sequences_are_checked() {
        let mut h = TestHarness::new("relay", "a");
        assert!(h.call::<Relay, _, ()>("send_then_fail", "b").is_err());
        assert!(h.sent().is_empty());
        h.call::<Relay, _, ()>("sequence", &Sequence { target_id: "b".into(), from: 1, count: 3 }).unwrap();
        let sent = h.take_sent();
        assert_eq!(sent.iter().map(|m| m.arg::<u64>()).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(sent[0].target, EntityRef::new("relay", "b"));
        let mut b = TestHarness::new("relay", "b");
        for n in [1u64, 2, 4] {
            b.call::<Relay, _, ()>("expect", &n).unwrap();
        }
        assert_eq!(b.entity::<Relay>().violations, 1);
    }
}
