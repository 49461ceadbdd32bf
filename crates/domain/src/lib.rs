//! Forfall's functional core: money, invoices, journey decisions and payment references.
//!
//! Everything here is pure: no I/O, no async, no clock reads. Services in `services/` read
//! inputs, ask this crate what to do, and write the outputs. Time is always passed in.

pub mod agency;
pub mod bank_codes;
pub mod behaviour;
pub mod calendar;
pub mod claim;
pub mod evidence;
pub mod experiment;
pub mod history;
pub mod invoice;
pub mod journey;
pub mod jurisdiction;
pub mod law;
pub mod locale;
pub mod matching;
pub mod merge;
pub mod money;
pub mod paylink;
pub mod policy;
pub mod propensity;
pub mod reference;
pub mod self_service;
pub mod settlement;
pub mod sms;
pub mod stats;

pub use invoice::{InvoiceSnapshot, InvoiceStatus, Rejection};
pub use journey::{JourneyState, Plan, PlannedStep, StepKind, Tone};
pub use jurisdiction::{DebtorKind, Jurisdiction};
pub use locale::Locale;
pub use money::{Currency, Money, MoneyError};
