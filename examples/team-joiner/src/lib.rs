//! team-joiner example (being written).
