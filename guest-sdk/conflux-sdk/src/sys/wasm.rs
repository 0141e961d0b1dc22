//! `wasm32` back end of the platform layer: thin calls into the WIT imports.

use crate::EntityRef;
use crate::bindings::conflux::entity::{context, messaging, state, types};

fn from_wit(r: types::EntityRef) -> EntityRef {
    EntityRef { entity_type: r.entity_type, id: r.id }
}

pub(crate) fn state_get(key: &str) -> Option<Vec<u8>> {
    state::get(key)
}

pub(crate) fn state_set(key: &str, value: &[u8]) {
    state::set(key, value)
}

pub(crate) fn state_delete(key: &str) {
    state::delete(key)
}

pub(crate) fn state_list(prefix: &str, start_after: Option<&str>, limit: u32) -> Vec<(String, Vec<u8>)> {
    state::list(prefix, start_after, limit)
}

pub(crate) fn self_ref() -> EntityRef {
    from_wit(context::self_ref())
}

pub(crate) fn caller() -> Option<EntityRef> {
    context::caller().map(from_wit)
}

pub(crate) fn invocation_id() -> String {
    context::invocation_id()
}

pub(crate) fn now_ms() -> u64 {
    context::now_ms()
}

pub(crate) fn log(level: u8, message: &str) {
    context::log(level, message)
}

fn to_wit(r: &EntityRef) -> types::EntityRef {
    types::EntityRef { entity_type: r.entity_type.clone(), id: r.id.clone() }
}

pub(crate) fn send(target: &EntityRef, operation: &str, payload: &[u8]) {
    messaging::send(&to_wit(target), operation, payload)
}

pub(crate) fn send_after(delay_ms: u64, target: &EntityRef, operation: &str, payload: &[u8]) -> String {
    messaging::send_after(delay_ms, &to_wit(target), operation, payload)
}

pub(crate) fn cancel(timer_id: &str) -> bool {
    messaging::cancel(timer_id)
}

pub(crate) fn ask(
    target: &EntityRef,
    operation: &str,
    payload: &[u8],
    continuation: &str,
    context: &[u8],
    timeout_ms: Option<u64>,
) -> String {
    messaging::ask(&to_wit(target), operation, payload, continuation, context, timeout_ms)
}

pub(crate) fn reply() -> Option<crate::messaging::RawReply> {
    use crate::messaging::{AskContext, AskError, RawReply};
    let r = messaging::reply()?;
    let outcome = r.outcome.map_err(|e| match e {
        messaging::AskError::Refused(c) => AskError::Refused(match c {
            types::CallError::BadRequest(m) => crate::Error::BadRequest(m),
            types::CallError::UnknownOperation(m) => crate::Error::UnknownOperation(m),
            types::CallError::Failed(m) => crate::Error::Failed(m),
        }),
        messaging::AskError::TimedOut => AskError::TimedOut,
        messaging::AskError::Undeliverable(why) => AskError::Undeliverable(why),
    });
    Some(RawReply { ask: AskContext::new(r.ask_id, from_wit(r.callee), r.context), outcome })
}
