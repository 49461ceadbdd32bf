//! Banking-day calendars and contact hours (being written).
