//! A plain WASI command: a valid component that exports `wasi:cli/run` instead
//! of `conflux:entity/handler`. Uploading it must fail with a clear error.

fn main() {
    println!("hello from a command, not an entity");
}
