//! Logging to the host log, tagged by the host with this entity's ref.
//!
//! Log lines are written immediately, even if the turn later fails.

use crate::sys;

/// Log severity, numbered as in the WIT `context.log` (0 trace … 4 error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// 0
    Trace = 0,
    /// 1
    Debug = 1,
    /// 2
    Info = 2,
    /// 3
    Warn = 3,
    /// 4
    Error = 4,
}

impl Level {
    /// The level for a WIT level number; numbers above 4 are treated as `Error`.
    pub fn from_u8(n: u8) -> Level {
        match n {
            0 => Level::Trace,
            1 => Level::Debug,
            2 => Level::Info,
            3 => Level::Warn,
            _ => Level::Error,
        }
    }
}

/// Writes `message` at `level`.
pub fn log(level: Level, message: &str) {
    sys::log(level as u8, message)
}

/// Logs at trace level (0).
pub fn trace(message: &str) {
    log(Level::Trace, message)
}

/// Logs at debug level (1).
pub fn debug(message: &str) {
    log(Level::Debug, message)
}

/// Logs at info level (2).
pub fn info(message: &str) {
    log(Level::Info, message)
}

/// Logs at warn level (3).
pub fn warn(message: &str) {
    log(Level::Warn, message)
}

/// Logs at error level (4).
pub fn error(message: &str) {
    log(Level::Error, message)
}
