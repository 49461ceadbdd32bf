//! Journey policy (being written).
