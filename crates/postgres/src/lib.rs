//! The PostgreSQL engine: migrations, the capture trigger's SQL, the outbox (publish, replay,
//! retention), tenants and keys, and the LISTEN source that feeds the hub.
//!
//! Isolation happens here, at the source: a feed is one NOTIFY channel,
//! `flc_rt_<md5('<schema>.<table>:<tenant>')>`, LISTENed only while the hub has subscribers of
//! that tenant and table, and every replay query is keyed by channel *and* tenant. This crate
//! never speaks HTTP, never logs a key, and never splices a caller's text into SQL: names are
//! resolved through the catalog (`to_regclass`) and passed as parameters.
//!
//! # Layout
//!
//! * [`migrate`] — the schema and the capture trigger; [`store`] — every query (outbox, keys,
//!   tenants, flags, retention);
//! * `engine` — [`PgEngine`], the [`changegate_core::Source`] of messages, flags and tables:
//!   opens feeds through the LISTEN task, reads catch-ups in keyset pages;
//! * [`sequencer`] — numbers committed outbox rows and sends their NOTIFYs, one session per
//!   database, so writers' commits take no lock and send no NOTIFY;
//! * `follow` — on a read replica, instead of LISTEN and the sequencer: reads each open
//!   channel's new rows whenever the replica has replayed more WAL;
//! * `source` — the LISTEN task (reconnects, replays what it missed while down); `event` — a
//!   NOTIFY payload or outbox row to an event; `channel` — feed to channel name.

mod channel;
mod engine;
mod event;
mod follow;
pub mod migrate;
pub mod sequencer;
mod source;
pub mod store;

pub use channel::channel;
pub use engine::{PgConfig, PgEngine};
pub use event::decode_notification;
pub use store::KEYS_CHANNEL;
pub use store::{KeyListing, Store};

/// Everything that can go wrong talking to PostgreSQL, with context and without secrets.
///
/// Opaque: ask what kind of failure it is ([`PgError::is_refused`], [`PgError::is_missing`],
/// [`PgError::is_corrupt`], [`PgError::is_unavailable`]); the database's or the pool's own error
/// is its [`std::error::Error::source`], for the log. `Display` says what changegate was doing
/// and, for a failed query, the database's message — log text, never a client's.
#[derive(Debug, thiserror::Error)]
#[error("{context}{}", detail(source.as_deref()))]
pub struct PgError {
    kind: Kind,
    context: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// A query failed (or the connection broke during one).
    Query,
    /// No connection could be had, or the configuration is unusable.
    Unavailable,
    /// The request broke a rule of the schema (no such tenant, already exists, bad value).
    Refused,
    /// The request named a thing that does not exist.
    Missing,
    /// Data the database holds cannot be read (a malformed row, stored key or flag state).
    Corrupt,
    /// A write reached a read replica (SQLSTATE 25006): it belongs on the primary.
    ReadOnly,
}

fn detail(source: Option<&(dyn std::error::Error + Send + Sync + 'static)>) -> String {
    match source {
        Some(source) => match source.downcast_ref::<tokio_postgres::Error>() {
            Some(error) => format!(": {}", describe(error)),
            None => format!(": {source}"),
        },
        None => String::new(),
    }
}

/// The database's own message for a failed query (tokio-postgres' `Display` says only "db error").
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

impl PgError {
    fn new(kind: Kind, context: impl Into<String>) -> Self {
        Self { kind, context: context.into(), source: None }
    }

    /// A failed query, doing `context`.
    pub(crate) fn query(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Self {
        let context = context.into();
        move |source| {
            // Whatever the write was, on a replica the answer is the same: not here.
            if source.code() == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION) {
                return Self::read_only(None);
            }
            Self { kind: Kind::Query, context, source: Some(Box::new(source)) }
        }
    }

    /// A write on a read replica; `primary` names where writes go, when known.
    pub(crate) fn read_only(primary: Option<&str>) -> Self {
        let whither = primary.map_or_else(String::new, |p| format!(" ({p})"));
        Self::new(
            Kind::ReadOnly,
            format!(
                "this gateway follows a read replica and cannot write: send writes to the primary{whither}"
            ),
        )
    }

    /// No connection, or a configuration that cannot give one.
    pub(crate) fn unavailable(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self { kind: Kind::Unavailable, context: context.into(), source: Some(source.into()) }
    }

    /// The request broke a rule; `message` says which, in words a client may read.
    pub(crate) fn refused(message: impl Into<String>) -> Self {
        Self::new(Kind::Refused, message)
    }

    /// The request named something that does not exist; `message` says what.
    pub(crate) fn missing(message: impl Into<String>) -> Self {
        Self::new(Kind::Missing, message)
    }

    /// Stored data that cannot be read; `what` says which, for the log.
    pub(crate) fn corrupt(what: impl Into<String>) -> Self {
        Self::new(Kind::Corrupt, what)
    }

    /// Whether the request broke a rule (the caller's mistake: the message may be shown).
    pub fn is_refused(&self) -> bool {
        self.kind == Kind::Refused
    }

    /// Whether the request named something that does not exist (the message may be shown).
    pub fn is_missing(&self) -> bool {
        self.kind == Kind::Missing
    }

    /// Whether stored data could not be read (our failure, not the caller's).
    pub fn is_corrupt(&self) -> bool {
        self.kind == Kind::Corrupt
    }

    /// Whether a write reached a read replica (send it to the primary; the message says where).
    pub fn is_read_only(&self) -> bool {
        self.kind == Kind::ReadOnly
    }

    /// Whether PostgreSQL could not be reached or a query failed (worth a retry).
    pub fn is_unavailable(&self) -> bool {
        matches!(self.kind, Kind::Unavailable | Kind::Query)
    }

    /// What a caller may be told: the message of a refused, missing or read-only request;
    /// `None` for everything else, whose text is for the log.
    pub fn client_message(&self) -> Option<&str> {
        matches!(self.kind, Kind::Refused | Kind::Missing | Kind::ReadOnly).then_some(self.context.as_str())
    }

    /// The SQLSTATE of a failed query, if any.
    pub fn sqlstate(&self) -> Option<&str> {
        let error = self.source.as_deref()?.downcast_ref::<tokio_postgres::Error>()?;
        error.code().map(tokio_postgres::error::SqlState::code)
    }
}
