//! Command-line interface (being written).
pub fn main() -> std::process::ExitCode { std::process::ExitCode::SUCCESS }
