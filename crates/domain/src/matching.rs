//! Payment matching decisions (being written).
