//! [`EntityRef`], the SDK's own address of an entity (type + id).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The address of an entity: its deployed type name and its id. Displays as `type/id`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EntityRef {
    /// The deployed entity type, e.g. `counter`.
    pub entity_type: String,
    /// The id within that type, e.g. `c1`.
    pub id: String,
}

impl EntityRef {
    /// A ref for `entity_type/id`.
    pub fn new(entity_type: impl Into<String>, id: impl Into<String>) -> Self {
        EntityRef { entity_type: entity_type.into(), id: id.into() }
    }
}

impl fmt::Display for EntityRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.entity_type, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_as_type_slash_id() {
        assert_eq!(EntityRef::new("counter", "c1").to_string(), "counter/c1");
    }
}
