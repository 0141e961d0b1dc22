//! A guest written straight against `wit/entity.wit` with `wit-bindgen` and
//! raw WASI calls (no SDK): each operation abuses a host call the way a
//! hostile tenant would, for the sandbox's end-to-end tests. The payload is a
//! decimal number where an operation takes one; the reply is a short text.
//!
//! - `sleep N`: `std::thread::sleep` for N ms (wasi-libc: subscribe + poll).
//! - `block N`: `monotonic-clock.subscribe-duration(N ms)` then `pollable.block`.
//! - `poll-instant N`: `subscribe-instant(now + N ms)` then `poll([it])`.
//! - `poll-ready N`: `poll` of a due clock and a N ms one: returns at once.
//! - `random N`: `random.get-random-bytes(N)`.
//! - `leak-pollables N`: subscribes N times without dropping anything.
//! - `grow N`: grows its memory by N MiB and keeps it (a large warm instance).
//! - `set K`: writes `k = K` (to see what a turn committed).
//! - `get`: the value of `k`.

// The generated bindings are the unsafe ABI glue; this crate adds none of its own.
#![allow(unsafe_code)]

// Only the wasm build is a guest: natively (the workspace build) the crate is empty.
#[cfg(target_arch = "wasm32")]
mod guest {
    wit_bindgen::generate!({
        world: "entity",
        path: "../../../wit",
        default_bindings_module: "crate::guest",
    });

    use conflux::entity::state;
    use conflux::entity::types::CallError;
    use exports::conflux::entity::handler::Guest;
    use wasip2::clocks::monotonic_clock;

    struct RawWaits;

    /// Memory `grow` keeps alive across turns.
    static HOARD: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

    fn number(payload: &[u8]) -> Result<u64, CallError> {
        std::str::from_utf8(payload)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| CallError::BadRequest("payload must be a decimal number".into()))
    }

    const MS: u64 = 1_000_000;

    impl Guest for RawWaits {
        fn handle(operation: String, payload: Vec<u8>) -> Result<Vec<u8>, CallError> {
            let reply = match operation.as_str() {
                "sleep" => {
                    std::thread::sleep(std::time::Duration::from_millis(number(&payload)?));
                    "slept".to_owned()
                }
                "block" => {
                    monotonic_clock::subscribe_duration(number(&payload)? * MS).block();
                    "blocked".to_owned()
                }
                "poll-instant" => {
                    let at = monotonic_clock::now() + number(&payload)? * MS;
                    let p = monotonic_clock::subscribe_instant(at);
                    format!("ready {:?}", wasip2::io::poll::poll(&[&p]))
                }
                "poll-ready" => {
                    let due = monotonic_clock::subscribe_duration(0);
                    let later = monotonic_clock::subscribe_duration(number(&payload)? * MS);
                    format!("ready {:?}", wasip2::io::poll::poll(&[&later, &due]))
                }
                "random" => {
                    let bytes = wasip2::random::random::get_random_bytes(number(&payload)?);
                    format!("{} random bytes", bytes.len())
                }
                "leak-pollables" => {
                    for _ in 0..number(&payload)? {
                        std::mem::forget(monotonic_clock::subscribe_duration(0));
                    }
                    "leaked".to_owned()
                }
                "grow" => {
                    let mib = number(&payload)? as usize;
                    HOARD.lock().unwrap().push(vec![1u8; mib << 20]);
                    format!("holding {mib} MiB more")
                }
                "set" => {
                    state::set("k", &payload);
                    "set".to_owned()
                }
                "get" => return Ok(state::get("k").unwrap_or_default()),
                other => return Err(CallError::UnknownOperation(other.to_owned())),
            };
            Ok(reply.into_bytes())
        }
    }

    export!(RawWaits);
}
