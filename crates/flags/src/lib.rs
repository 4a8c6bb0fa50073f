//! Feature flags for changegate: the flag, rule and segment model and its validation, the
//! versioned state transitions both engines run, and the three flag-stream SSE dialects.
//!
//! Flags are a tenant's data like any other: every change becomes an event in the tenant's one
//! log, so resume, isolation and cross-instance delivery come from the shared machinery. This
//! crate never does I/O: the gateway's engine decides whether state lives in PostgreSQL or in
//! [`memory`].
//!
//! # Layout
//!
//! * [`model`] — flags, rules, segments and their validation; [`eval`] — evaluation and the
//!   rollout bucket;
//! * [`store`] — the versioned state transitions both engines run, and the events they emit;
//!   [`memory`] — the in-process store of the memory engine;
//! * [`dialect`] — the flag-stream SSE dialects; [`featureflip`] — the model in Featureflip's
//!   SDK shape.

pub mod dialect;
pub mod eval;
pub mod featureflip;
pub mod memory;
pub mod model;
pub mod store;

pub use model::{Flag, FlagSpec, NewFlag, Rule, Segment, SegmentSpec};
pub use store::{Emit, Environment};

/// Why a flag operation was refused. Messages name the flag, rule or segment, never a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    /// No such flag, rule, segment or environment.
    #[error("{0} not found")]
    NotFound(String),
    /// It exists already.
    #[error("{0} already exists")]
    Exists(String),
    /// The input breaks a rule of the model.
    #[error("{0}")]
    Invalid(String),
    /// `If-Match` named another version.
    #[error("version mismatch: the current version is {current}")]
    VersionMismatch {
        /// The version the caller should have sent.
        current: u64,
    },
    /// Still referenced.
    #[error("{0}")]
    InUse(String),
}
