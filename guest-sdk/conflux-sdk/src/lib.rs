//! Write [Conflux](https://example.invalid/conflux) entities in Rust.
//!
//! An *entity* is a Rust struct whose state lives in the platform and whose public
//! methods are *operations* that clients (or other entities) invoke by name. You compile
//! the crate to a WebAssembly component and deploy it as an entity type; the platform
//! runs one turn at a time per entity id, so every change to one entity is serialised.
//!
//! # Example
//!
//! ```
//! use conflux_sdk::prelude::*;
//!
//! #[derive(Default, Serialize, Deserialize)]
//! pub struct Counter {
//!     total: i64,
//! }
//!
//! #[entity]
//! impl Counter {
//!     /// Adds `n` and returns the new total.
//!     pub fn add(&mut self, n: i64) -> Result<i64, Error> {
//!         self.total = self
//!             .total
//!             .checked_add(n)
//!             .ok_or_else(|| Error::failed("counter would overflow"))?;
//!         log::info(&format!("{} is now {}", context::self_ref(), self.total));
//!         Ok(self.total)
//!     }
//!
//!     /// The current total.
//!     pub fn get(&self) -> i64 {
//!         self.total
//!     }
//! }
//!
//! // Unit-test it natively, no host needed:
//! use conflux_sdk::testing::TestHarness;
//!
//! let mut h = TestHarness::new("counter", "c1");
//! assert_eq!(h.call::<Counter, _, i64>("add", &5)?, 5);
//! assert_eq!(h.call::<Counter, _, i64>("add", &2)?, 7);
//! assert_eq!(h.call::<Counter, _, i64>("get", &())?, 7);
//! assert_eq!(h.invoke::<Counter>("get", b"")?, b"7");
//! assert_eq!(h.logs().last().unwrap().message, "counter/c1 is now 7");
//!
//! // A bad payload is a bad request, and the turn's writes are discarded.
//! assert!(matches!(h.invoke::<Counter>("add", b"\"five\""), Err(Error::BadRequest(_))));
//! assert!(matches!(h.invoke::<Counter>("reset", b""), Err(Error::UnknownOperation(_))));
//! assert_eq!(h.entity::<Counter>().total, 7);
//! # Ok::<(), conflux_sdk::Error>(())
//! ```
//!
//! # Operations
//!
//! Put `#[entity]` on one inherent `impl` block of a struct that is
//! `Default + Serialize + DeserializeOwned`. Every `pub fn` in it with a `&self`,
//! `&mut self` or `self` receiver becomes an operation named after the method; other
//! functions (private, or without a receiver) are left alone. An operation takes zero or
//! one argument besides the receiver — bundle several values into a struct or tuple.
//! Generic and `async` methods are rejected at compile time.
//!
//! **Only one `#[entity]` per crate**: a crate compiles to one component exporting one
//! handler, so a second `#[entity]` fails to link on `wasm32` (duplicate export). To
//! address another entity type with its typed client, depend on its crate with
//! feature `client` (see "Asking other entities").
//!
//! The user crate must depend on `conflux-sdk` under that name (the macro refers to
//! `::conflux_sdk`), plus `serde` for the derives. Set `crate-type = ["cdylib", "rlib"]`.
//!
//! # Payloads and replies
//!
//! Payloads and replies are JSON. The argument is parsed from the payload with
//! `serde_json`; an **empty payload counts as JSON `null`**, so an `Option<T>` argument
//! accepts it. Operations without an argument accept only an empty or `null` payload.
//! An unparseable payload yields [`Error::BadRequest`] naming the operation and serde's
//! message.
//!
//! A method returns either `T: Serialize` or `Result<T, E>` with `E: Into<Error>` (any
//! type whose last path segment is `Result`). The reply is the JSON of `T` (`()` → `null`).
//!
//! # Errors
//!
//! Errors abort the turn and reach the client as gRPC status codes:
//!
//! | [`Error`] variant / WIT `call-error` | gRPC code             |
//! |--------------------------------------|-----------------------|
//! | `BadRequest` / `bad-request`         | `INVALID_ARGUMENT`    |
//! | `UnknownOperation` / `unknown-operation` | `NOT_FOUND`       |
//! | `Failed` / `failed`                  | `FAILED_PRECONDITION` |
//!
//! An unknown operation name produces `Error::UnknownOperation` listing the operations the
//! entity offers. A panic (trap) also aborts the turn; the host reports it as an internal
//! error.
//!
//! # Atomic turns and the `$self` key
//!
//! Each invocation is one *turn*. Everything the turn writes — through [`state`] or by
//! mutating `self` — is buffered and committed atomically if the operation returns `Ok`,
//! and discarded if it returns `Err` or panics. Reads inside a turn see its own writes.
//!
//! Before each operation the struct is loaded from state key `"$self"` (JSON), or
//! `Default::default()` if absent. After a `&mut self` method returns `Ok`, the struct is
//! saved back to `"$self"` only if its JSON changed. `&self` methods never write it. A
//! by-value `self` method consumes its copy, so it cannot change the stored struct either.
//! You may keep additional data under other keys with [`state`] (e.g. large collections
//! you page through with [`state::list`]).
//!
//! # Migrating state between versions
//!
//! Deploying a new version of an entity type switches every entity to it at its next
//! turn. If the new code stores its state differently, mark one associated function of
//! the `#[entity]` impl block with `#[migrate]`. It takes the registry version that last
//! committed the entity's state (`u32`) and returns `Result<(), E>` with `E: Into<Error>`;
//! it reads and rewrites the old layout with [`state`]:
//!
//! ```
//! use conflux_sdk::prelude::*;
//! use conflux_sdk::{SELF_KEY, testing::TestHarness};
//!
//! #[derive(Default, Serialize, Deserialize)]
//! pub struct Tally { count: i64 }
//!
//! #[entity]
//! impl Tally {
//!     pub fn get(&self) -> i64 { self.count }
//!
//!     /// Version 1 kept a bare number under the key "n".
//!     #[migrate]
//!     fn upgrade(from_version: u32) -> Result<(), Error> {
//!         if let Some(n) = state::get::<i64>("n")? {
//!             state::delete("n");
//!             state::set(SELF_KEY, &Tally { count: n })?;
//!         }
//!         Ok(())
//!     }
//! }
//! let mut h = TestHarness::new("tally", "t1");
//! h.set_raw("n", "41");
//! h.migrate::<Tally>(1)?;
//! assert_eq!(h.call::<Tally, _, i64>("get", &())?, 41);
//! assert!(h.get_raw("n").is_none());
//! # Ok::<(), conflux_sdk::Error>(())
//! ```
//!
//! The migration runs inside the turn it precedes and commits with it, exactly once per
//! entity and version change. If it returns an error or panics, nothing is committed: the
//! caller gets a `migration failed` error, the entity keeps its old state, and the
//! migration is tried again on the entity's next turn (after you deploy a fix or roll
//! back). After a rollback, the older code's migration is called with the *newer*
//! `from_version`. Without `#[migrate]` the migration does nothing. `conflux deploy
//! --dry-run` runs a new version's migration against existing entities without
//! committing anything.
//!
//! # Asking other entities
//!
//! A turn never waits for another entity. To use an answer, *ask*: the ask is a
//! message committed with the turn, and the callee's reply (or its error, a
//! timeout, a failure to deliver) runs a `#[continuation]` of the asker later, as
//! a turn of its own, effectively once per ask. `#[entity]` generates a typed
//! client per entity, `Type::ask(id).operation(&arg)`, and a constant per
//! continuation (`on_done` → `Self::ON_DONE`) that `then` takes:
//!
//! ```
//! use conflux_sdk::prelude::*;
//! use conflux_sdk::testing::TestHarness;
//!
//! #[derive(Default, Serialize, Deserialize)]
//! pub struct Counter { total: i64 }
//!
//! #[entity]
//! impl Counter {
//!     pub fn add(&mut self, n: i64) -> i64 { self.total += n; self.total }
//! }
//!
//! #[derive(Default, Serialize, Deserialize)]
//! pub struct Auditor { seen: Vec<i64> }
//!
//! #[entity]
//! impl Auditor {
//!     pub fn bump(&mut self, id: String) -> Result<AskId, Error> {
//!         Counter::ask(id).add(&1).context("bump").then(Self::ON_ADDED)
//!     }
//!
//!     #[continuation]
//!     pub fn on_added(&mut self, reply: Result<i64, AskError>, ask: AskContext) -> Result<(), Error> {
//!         assert_eq!(ask.context::<String>()?, "bump");
//!         self.seen.push(reply?);
//!         Ok(())
//!     }
//! }
//!
//! let mut auditor = TestHarness::new("auditor", "a");
//! let mut counter = TestHarness::new("counter", "c");
//! let id = auditor.call::<Auditor, _, AskId>("bump", "c")?;
//! assert_eq!(auditor.asks()[0].operation, "add");
//! auditor.answer::<Auditor, Counter>(&id, &mut counter)?; // runs `add` on `counter`, then `on_added`
//! assert_eq!(auditor.entity::<Auditor>().seen, [1]);
//! assert!(auditor.asks().is_empty());
//! // A continuation runs only for a reply.
//! assert!(matches!(auditor.invoke::<Auditor>("on_added", b""), Err(Error::BadRequest(_))));
//! # Ok::<(), conflux_sdk::Error>(())
//! ```
//!
//! A continuation takes the reply as `Result<T, AskError>` — `T` the callee
//! operation's reply type; [`AskError`](messaging::AskError) is the callee's
//! refusal (its `Error`), a timeout ([`Ask::timeout`](messaging::Ask::timeout)),
//! an undeliverable ask, or a reply that does not parse — and optionally an
//! [`AskContext`](messaging::AskContext). To use another crate's typed client,
//! depend on it with its feature `client` (the callee crate declares
//! `[features] client = []`): its handler export then stays out of your
//! component. Only one `#[entity]` exports per component.
//!
//! # Building
//!
//! ```text
//! rustup target add wasm32-wasip2
//! cargo build --release --target wasm32-wasip2
//! # → target/wasm32-wasip2/release/<crate_name>.wasm, a component exporting
//! #   conflux:entity/handler@0.1.0
//! ```
//!
//! # Testing
//!
//! On non-`wasm32` targets the [`testing`] module provides
//! [`TestHarness`](testing::TestHarness), which runs operations with the host's turn
//! semantics against an in-memory store, so `cargo test` works with no host. Calling
//! [`state`], [`context`] or [`log`] functions natively outside a harness call panics.

// The `bindings` module (wit-bindgen output) needs `unsafe`; the rest of the SDK does not.
#![deny(missing_docs)]

extern crate self as conflux_sdk;

#[doc(hidden)]
#[allow(unsafe_code, missing_docs, clippy::all)]
pub mod bindings;

pub mod context;
mod entity_ref;
mod error;
pub mod log;
pub mod messaging;
pub mod state;
mod sys;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use conflux_sdk_macros::{continuation, entity, migrate};
pub use entity_ref::EntityRef;
pub use error::Error;
pub use serde;
pub use serde_json;

/// The state key under which `#[entity]` stores the entity struct as JSON.
pub const SELF_KEY: &str = "$self";

/// What `#[entity]` implements for your struct. You normally never implement or call
/// this yourself: the host calls `dispatch` through the component export, and
/// [`TestHarness`](testing::TestHarness) calls it in tests.
pub trait Entity: Default + serde::Serialize + serde::de::DeserializeOwned {
    /// The operation names, in declaration order.
    const OPERATIONS: &'static [&'static str];

    /// Runs operation `op` with the JSON `payload` inside the current turn and returns
    /// the JSON reply.
    fn dispatch(op: &str, payload: &[u8]) -> Result<Vec<u8>, Error>;

    /// Brings state written by registry version `from_version` up to date. The host runs
    /// it once per entity before that entity's first turn on a new version, in the same
    /// write set as that turn. The default does nothing; `#[migrate]` on a method of the
    /// `#[entity]` impl block overrides it.
    fn migrate(from_version: u32) -> Result<(), Error> {
        let _ = from_version;
        Ok(())
    }
}

/// Everything an entity crate usually needs: `use conflux_sdk::prelude::*;`.
pub mod prelude {
    pub use crate::messaging::{self, AskContext, AskError, AskId, TimerId};
    pub use crate::{EntityRef, Error, context, continuation, entity, log, migrate, state};
    pub use serde::{Deserialize, Serialize};
}

/// Support code for `#[entity]`-generated code. Not a stable API.
#[doc(hidden)]
pub mod __private {
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    use crate::{Error, SELF_KEY, state};

    pub use wit_bindgen;

    /// The typed reply and ask context of a continuation turn; a bad request
    /// when `op` was called other than by a reply.
    pub fn continuation_input<R: crate::messaging::FromReply>(
        op: &str,
    ) -> Result<(R, crate::messaging::AskContext), Error> {
        let reply = crate::messaging::reply()
            .ok_or_else(|| Error::bad_request(format!("'{op}' is a continuation: only the reply to an ask runs it")))?;
        Ok((R::from_reply(reply.outcome), reply.ask))
    }

    /// Parses the operation's argument; an empty payload is JSON `null`.
    pub fn parse_payload<A: DeserializeOwned>(op: &str, payload: &[u8]) -> Result<A, Error> {
        let bytes: &[u8] = if payload.is_empty() { b"null" } else { payload };
        serde_json::from_slice(bytes)
            .map_err(|e| Error::bad_request(format!("invalid payload for operation '{op}': {e}")))
    }

    /// Loads the entity struct from `$self`, or its default.
    pub fn load<T: Default + DeserializeOwned>() -> Result<T, Error> {
        Ok(state::get(SELF_KEY)?.unwrap_or_default())
    }

    /// Loads the entity struct plus the JSON it had, to detect changes.
    pub fn load_for_update<T: Default + Serialize + DeserializeOwned>() -> Result<(T, Vec<u8>), Error> {
        match state::get_raw(SELF_KEY) {
            Some(bytes) => {
                let value = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::failed(format!("state key '{SELF_KEY}' does not hold the entity: {e}")))?;
                Ok((value, bytes))
            }
            None => {
                let value = T::default();
                let bytes = to_json(&value)?;
                Ok((value, bytes))
            }
        }
    }

    /// Saves the entity struct to `$self` if its JSON differs from `before`.
    pub fn save_if_changed<T: Serialize>(value: &T, before: &[u8]) -> Result<(), Error> {
        let after = to_json(value)?;
        if after != before {
            state::set_raw(SELF_KEY, &after);
        }
        Ok(())
    }

    /// Serialises an operation's reply.
    pub fn reply<T: Serialize + ?Sized>(op: &str, value: &T) -> Result<Vec<u8>, Error> {
        serde_json::to_vec(value).map_err(|e| Error::failed(format!("cannot serialise the reply of '{op}': {e}")))
    }

    fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
        serde_json::to_vec(value).map_err(|e| Error::failed(format!("cannot serialise the entity: {e}")))
    }

    /// The error for an operation name the entity does not offer.
    pub fn unknown_operation(op: &str, entity_type: &str, offered: &[&str]) -> Error {
        Error::UnknownOperation(format!(
            "unknown operation '{op}' for entity type {entity_type}; offered: {}",
            offered.join(", ")
        ))
    }
}
