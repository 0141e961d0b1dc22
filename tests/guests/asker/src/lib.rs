//! A guest for the ask tests (deployed under several type names): it asks any
//! entity for any operation, and its continuation records every reply it gets —
//! value or error kind — so a test can count continuations per ask. As a
//! callee it echoes, refuses, traps, naps, and bounces an ask back to its asker.

use conflux_sdk::prelude::*;
use conflux_sdk::serde_json::Value;
use std::time::Duration;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Asker {
    /// Every reply the continuation ran for, in arrival order.
    pub replies: Vec<Got>,
    /// Asks this entity answered.
    pub answered: u64,
}

/// One continuation turn as it saw its reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Got {
    pub ask_id: String,
    pub callee: String,
    /// The reply's value, if any.
    pub value: Option<Value>,
    /// Else the error's kind (`bad-request`, `unknown-operation`, `failed`,
    /// `timed-out`, `undeliverable`, `bad-reply`) and message.
    pub error: Option<(String, String)>,
    /// The context the ask carried.
    pub context: Value,
}

/// Ask `target` (`type/id`) for `operation(payload)`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AskFor {
    pub target: String,
    pub operation: String,
    #[serde(default)]
    pub payload: Value,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub context: Value,
    /// Ask this many times (one continuation each).
    #[serde(default)]
    pub count: Option<u32>,
}

fn target_of(s: &str) -> Result<EntityRef, Error> {
    let (ty, id) = s.split_once('/').ok_or_else(|| Error::bad_request("target must be type/id"))?;
    Ok(EntityRef::new(ty, id))
}

#[entity]
impl Asker {
    /// Makes the ask(s); returns their ids.
    pub fn ask_for(&mut self, a: AskFor) -> Result<Vec<String>, Error> {
        let target = target_of(&a.target)?;
        let mut ids = Vec::new();
        for _ in 0..a.count.unwrap_or(1) {
            let mut ask = messaging::ask::<Value, _>(&target, &a.operation, &a.payload).context(&a.context);
            if let Some(ms) = a.timeout_ms {
                ask = ask.timeout(Duration::from_millis(ms));
            }
            ids.push(ask.then(Self::ON_REPLY)?.0);
        }
        Ok(ids)
    }

    #[continuation]
    pub fn on_reply(&mut self, reply: Result<Value, AskError>, ask: AskContext) -> Result<(), Error> {
        let (value, error) = match reply {
            Ok(v) => (Some(v), None),
            Err(e) => {
                let (kind, message) = match e {
                    AskError::Refused(Error::BadRequest(m)) => ("bad-request", m),
                    AskError::Refused(Error::UnknownOperation(m)) => ("unknown-operation", m),
                    AskError::Refused(Error::Failed(m)) => ("failed", m),
                    AskError::TimedOut => ("timed-out", String::new()),
                    AskError::Undeliverable(m) => ("undeliverable", m),
                    AskError::BadReply(m) => ("bad-reply", m),
                };
                (None, Some((kind.to_owned(), message)))
            }
        };
        let context = ask.context::<Value>()?;
        self.replies.push(Got { ask_id: ask.id.0, callee: ask.callee.to_string(), value, error, context });
        Ok(())
    }

    pub fn replies(&self) -> Vec<Got> {
        self.replies.clone()
    }

    /// Answers with its argument.
    pub fn echo(&mut self, v: Value) -> Value {
        self.answered += 1;
        v
    }

    /// Refuses with `failed(message)`.
    pub fn refuse(&mut self, message: String) -> Result<(), Error> {
        self.answered += 1;
        Err(Error::failed(message))
    }

    /// Refuses with `bad-request`.
    pub fn picky(&self) -> Result<(), Error> {
        Err(Error::bad_request("never good enough"))
    }

    /// Traps.
    pub fn crash(&self) {
        panic!("asked to crash");
    }

    /// Sleeps `ms` in its turn, then answers `ms`.
    pub fn nap(&mut self, ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        self.answered += 1;
        ms
    }

    /// Answers "bounced" at once, and asks its asker (an `Asker`) to echo
    /// "pong" — the asker answers while its own ask is pending.
    pub fn bounce(&mut self) -> Result<String, Error> {
        self.answered += 1;
        let asker = context::caller().ok_or_else(|| Error::bad_request("bounce is for asks"))?;
        messaging::ask::<Value, _>(&asker, "echo", "pong").then(Self::ON_REPLY)?;
        Ok("bounced".into())
    }

    pub fn answered(&self) -> u64 {
        self.answered
    }
}
