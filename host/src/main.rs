//! The `conflux` binary: a thin edge over [`conflux_host::cli`].

fn main() -> std::process::ExitCode {
    conflux_host::cli::main()
}
