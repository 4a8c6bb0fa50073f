//! The changegate core: the one event model every source produces and every dialect encodes,
//! the tenancy and credential types, the fan-out [`hub`], and the in-process [`memory`] engine.
//!
//! This crate never does I/O: no sockets, files, databases or HTTP. Sources (Postgres, MongoDB)
//! and the gateway depend on it, never the other way round. Every value that crosses a tenant
//! boundary is typed here ([`TenantId`], [`Position`], [`FeedKey`]) and only constructed through
//! validating constructors, so an unvalidated name or a stream without a tenant cannot exist.
//!
//! # Layout
//!
//! * [`names`], [`position`], [`auth`] — the validated domain types;
//! * [`event`] — the event model and its once-per-dialect encoding cache ([`Frame`]);
//! * [`source`] — the one interface every source implements (open, close, catch-up as a stream
//!   of pages), and [`source::paged`] for sources that are logs; [`replay`] — one page;
//! * [`hub`] — the one fan-out of every source's feeds;
//! * [`memory`] — the in-process engine (a [`Source`]); [`backoff`] — reconnect delays; [`sse`] —
//!   SSE framing.

pub mod auth;
pub mod backoff;
pub mod event;
pub mod hub;
pub mod memory;
pub mod names;
pub mod position;
pub mod replay;
pub mod source;
pub mod sse;

pub use auth::{ApiKey, KeyHash, KeyRecord, Principal, Role, Scope};
pub use event::{
    ConfigReason, Event, EventBody, FlagEventKind, Frame, Op, RawJson, ResetReason, SourceKind, Timestamp,
};
pub use hub::{Feed, FeedKey, Filter, Hub, HubConfig, Lagged, Subscription};
pub use memory::{MemoryEngine, MemoryKeys, Retention};
pub use names::{CollectionName, EnvironmentId, NameError, TenantId, Topic, TopicPattern};
pub use position::{Epoch, Position, PositionError};
pub use replay::{PAGE, Replay};
pub use source::{CatchUp, Caught, Source, SourceError, Start};
