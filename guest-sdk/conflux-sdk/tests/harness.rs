//! Integration tests of `#[entity]` and `TestHarness`: turn atomicity, read-your-writes,
//! listing, context facts, logs and payload rules.

use conflux_sdk::prelude::*;
use conflux_sdk::testing::TestHarness;

#[derive(Default, Serialize, Deserialize)]
struct Notes {
    count: u32,
}

#[derive(Serialize, Deserialize)]
struct Put {
    key: String,
    text: String,
}

#[entity]
impl Notes {
    /// Writes a note, then fails if asked to (so the write must be discarded).
    pub fn put(&mut self, p: Put) -> Result<Vec<(String, String)>, Error> {
        state::set(&format!("note/{}", p.key), &p.text)?;
        self.count += 1;
        // Read-your-writes inside the turn.
        assert_eq!(state::get::<String>(&format!("note/{}", p.key))?, Some(p.text.clone()));
        if p.text == "fail" {
            return Err(Error::failed("asked to fail"));
        }
        if p.text == "panic" {
            panic!("asked to panic");
        }
        state::list("note/", None, 100)
    }

    pub fn remove(&mut self, key: String) {
        state::delete(&format!("note/{key}"));
    }

    pub fn page(&self, args: (Option<String>, u32)) -> Result<Vec<String>, Error> {
        Ok(state::list::<String>("note/", args.0.as_deref(), args.1)?.into_iter().map(|(k, _)| k).collect())
    }

    pub fn who(&self, _ignored: Option<u8>) -> (String, Option<String>, u64, bool) {
        log::warn("who called");
        let caller = context::caller().map(|c| c.to_string());
        (context::self_ref().to_string(), caller, context::now_ms(), !context::invocation_id().is_empty())
    }

    pub fn count(&self) -> u32 {
        self.count
    }
}

fn put(h: &mut TestHarness, key: &str, text: &str) -> Result<Vec<(String, String)>, Error> {
    h.call::<Notes, _, _>("put", &Put { key: key.into(), text: text.into() })
}

#[test]
fn commits_on_ok_discards_on_err_and_panic() {
    let mut h = TestHarness::new("notes", "n1");
    let listed = put(&mut h, "a", "hello").unwrap();
    assert_eq!(listed, [("note/a".to_string(), "hello".to_string())]);
    assert!(matches!(put(&mut h, "b", "fail"), Err(Error::Failed(_))));
    assert!(h.get_raw("note/b").is_none());
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| put(&mut h, "c", "panic")));
    assert!(panicked.is_err());
    assert!(h.get_raw("note/c").is_none());
    assert_eq!(h.call::<Notes, _, u32>("count", &()).unwrap(), 1);
    // The harness is still usable after a panic.
    put(&mut h, "d", "x").unwrap();
    assert_eq!(h.get::<String>("note/d").as_deref(), Some("x"));
}

#[test]
fn list_pages_in_byte_order_over_committed_and_deleted_keys() {
    let mut h = TestHarness::new("notes", "n1");
    for k in ["b", "a", "c", "B"] {
        put(&mut h, k, k).unwrap();
    }
    h.call::<Notes, _, ()>("remove", "c").unwrap();
    h.set_raw("other", b"\"x\"".to_vec());
    let page = |h: &mut TestHarness, after: Option<&str>, n: u32| {
        h.call::<Notes, _, Vec<String>>("page", &(after, n)).unwrap()
    };
    assert_eq!(page(&mut h, None, 10), ["note/B", "note/a", "note/b"]);
    assert_eq!(page(&mut h, None, 2), ["note/B", "note/a"]);
    assert_eq!(page(&mut h, Some("note/a"), 2), ["note/b"]);
}

#[test]
fn context_facts_and_logs() {
    let mut h = TestHarness::new("notes", "n1");
    h.set_now_ms(1234);
    h.set_caller(Some(EntityRef::new("user", "sue")));
    let (me, caller, now, has_id): (String, Option<String>, u64, bool) = h.call::<Notes, _, _>("who", &()).unwrap();
    assert_eq!((me.as_str(), caller.as_deref(), now, has_id), ("notes/n1", Some("user/sue"), 1234, true));
    assert_eq!(h.logs()[0].level, log::Level::Warn);
    assert_eq!(h.logs()[0].message, "who called");
    // Option argument accepts an empty payload; reads write nothing.
    assert!(h.invoke::<Notes>("who", b"").is_ok());
    assert!(h.get_raw("$self").is_none());
}

#[test]
fn zero_arg_operations_accept_only_empty_or_null() {
    let mut h = TestHarness::new("notes", "n1");
    assert_eq!(h.invoke::<Notes>("count", b"").unwrap(), b"0");
    assert_eq!(h.invoke::<Notes>("count", b" null ").unwrap(), b"0");
    match h.invoke::<Notes>("count", b"{}") {
        Err(Error::BadRequest(m)) => assert!(m.starts_with("invalid payload for operation 'count'"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
#[should_panic(expected = "TestHarness")]
fn state_outside_a_turn_panics() {
    let _ = state::get_raw("x");
}
