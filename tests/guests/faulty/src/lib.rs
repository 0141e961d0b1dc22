//! A deliberately misbehaving guest for the host's tests: one operation per
//! failure the sandbox must contain (endless loop, memory bomb, stack overflow,
//! `unreachable`, panic, oversized reply, oversized write, trap after writes),
//! plus reads-your-writes and `list` checks and a CPU burner.

use conflux_sdk::prelude::*;

#[derive(Default, Serialize, Deserialize)]
pub struct Faulty {}

#[entity]
impl Faulty {
    /// Stores `value` under key `k`.
    pub fn put(&self, value: String) -> Result<(), Error> {
        state::set("k", &value)
    }

    /// Prints `line` to stdout, then prefixed with `err: ` to stderr, then
    /// prefixed with `logged: ` to the host log at warn level (guest logs).
    pub fn say(&self, line: String) {
        println!("{line}");
        eprintln!("err: {line}");
        conflux_sdk::log::warn(&format!("logged: {line}"));
    }

    /// The value under key `k`, if any.
    pub fn get(&self) -> Result<Option<String>, Error> {
        state::get("k")
    }

    /// Writes, then returns a guest error: nothing may be committed.
    pub fn set_then_fail(&self) -> Result<(), Error> {
        state::set("k", &"poisoned-by-error".to_owned())?;
        Err(Error::failed("refusing after a write"))
    }

    /// Writes, then panics (a trap): nothing may be committed.
    pub fn set_then_panic(&self) -> Result<(), Error> {
        state::set("k", &"poisoned-by-trap".to_owned())?;
        panic!("deliberate panic after a write");
    }

    /// Exercises reads of the turn's own writes and `list` over a mix of
    /// committed and buffered keys; returns what it saw.
    pub fn read_your_writes(&self) -> Result<Vec<String>, Error> {
        let mut seen = Vec::new();
        state::set("a", &1)?;
        seen.push(format!("a={:?}", state::get::<i32>("a")?));
        state::delete("a");
        seen.push(format!("a={:?}", state::get::<i32>("a")?));
        // `p/0` and `p/2` are committed by `seed`; buffer a new key and delete one.
        state::set("p/1", &1)?;
        state::delete("p/2");
        let keys: Vec<String> = state::list::<i32>("p/", None, 10)?.into_iter().map(|(k, _)| k).collect();
        seen.push(format!("list={}", keys.join(",")));
        let after: Vec<String> = state::list::<i32>("p/", Some("p/0"), 1)?.into_iter().map(|(k, _)| k).collect();
        seen.push(format!("after={}", after.join(",")));
        Ok(seen)
    }

    /// Commits `p/0`, `p/2` and `p/3` for `read_your_writes`.
    pub fn seed(&self) -> Result<(), Error> {
        for k in ["p/0", "p/2", "p/3"] {
            state::set(k, &0)?;
        }
        Ok(())
    }

    /// Burns CPU for `rounds` iterations and returns a checksum.
    pub fn spin(&self, rounds: u64) -> u64 {
        let mut x: u64 = 1;
        for i in 0..rounds {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
        x
    }

    /// Never returns: must be stopped by the CPU budget.
    pub fn infinite_loop(&self) -> u64 {
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }

    /// Allocates until memory runs out.
    pub fn memory_bomb(&self) -> usize {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![1u8; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }

    /// Recurses without end.
    pub fn stack_overflow(&self, depth: u64) -> u64 {
        #[allow(unconditional_recursion)]
        fn dive(n: u64) -> u64 {
            std::hint::black_box(dive(std::hint::black_box(n + 1))) + 1
        }
        dive(depth)
    }

    /// Executes the wasm `unreachable` instruction after a write.
    pub fn unreachable(&self) -> Result<(), Error> {
        state::set("k", &"poisoned-by-unreachable".to_owned())?;
        #[cfg(target_arch = "wasm32")]
        core::arch::wasm32::unreachable();
        #[cfg(not(target_arch = "wasm32"))]
        unreachable!("native stand-in for the wasm instruction");
    }

    /// Returns a reply of `bytes` bytes.
    pub fn huge_reply(&self, bytes: usize) -> String {
        "x".repeat(bytes)
    }

    /// Writes one value of `bytes` bytes.
    pub fn huge_write(&self, bytes: usize) -> Result<(), Error> {
        state::set_raw("k", &vec![b'x'; bytes]);
        Ok(())
    }

    /// Writes `count` values of `bytes` bytes each under keys `w/0000`…:
    /// a write set of about `count × bytes`.
    pub fn write_many(&self, spec: (u32, usize)) -> Result<(), Error> {
        let (count, bytes) = spec;
        let value = vec![b'w'; bytes];
        for i in 0..count {
            state::set_raw(&format!("w/{i:04}"), &value);
        }
        Ok(())
    }

    /// Writes one value under a key of `bytes` bytes.
    pub fn huge_key(&self, bytes: usize) -> Result<(), Error> {
        state::set_raw(&"k".repeat(bytes), b"v");
        Ok(())
    }

    /// Commits `n` keys `many/0000`… for `count_list`.
    pub fn seed_many(&self, n: u32) -> Result<(), Error> {
        for i in 0..n {
            state::set(&format!("many/{i:04}"), &i)?;
        }
        Ok(())
    }

    /// How many keys one `list` call returned when asked for `limit`.
    pub fn count_list(&self, limit: u32) -> Result<usize, Error> {
        Ok(state::list_raw("many/", None, limit).len())
    }
}
