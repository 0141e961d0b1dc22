//! [`Secret`]: a token or shared secret whose `Debug` never shows it. Clients
//! send one as a bearer token; the daemon's configuration holds its tokens
//! and cluster secret as such.

use serde::{Deserialize, Serialize};

/// A secret string (an API token). Its `Debug` is redacted, so a logged or
/// printed configuration never shows it; only [`Secret::expose`] reveals it.
/// The daemon hashes its tokens and drops them once the configuration is
/// validated (`Node::open`); its bytes are wiped when dropped.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the one place that hashes or sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// A dropped secret leaves no copy of itself in freed memory.
impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_secret() {
        let s = Secret::new("tok-xyz");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert_eq!(s.expose(), "tok-xyz");
    }
}
