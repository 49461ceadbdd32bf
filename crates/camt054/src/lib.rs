//! camt.054 reader (being written).
