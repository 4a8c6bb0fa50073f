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
//! * `source` — the LISTEN task (reconnects, replays what it missed while down); `event` — a
//!   NOTIFY payload or outbox row to an event; `channel` — feed to channel name.

mod channel;
mod engine;
mod event;
pub mod migrate;
mod source;
pub mod store;

pub use channel::channel;
pub use engine::{PgConfig, PgEngine};
pub use store::KEYS_CHANNEL;
pub use store::{KeyListing, Store};

/// Everything that can go wrong talking to PostgreSQL, with context and without secrets.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// A query failed.
    #[error("{context}: {}", describe(source))]
    Query {
        /// What changegate was doing.
        context: String,
        /// The database's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// No connection could be had from the pool.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The connection string is invalid.
    #[error("invalid DATABASE_URL: {0}")]
    Config(String),
    /// A request named something that does not exist or is not allowed.
    #[error("{0}")]
    Invalid(String),
    /// A row the outbox holds could not be read as an event.
    #[error("outbox row {seq} is malformed: {reason}")]
    Malformed {
        /// Its position.
        seq: i64,
        /// What is wrong.
        reason: String,
    },
}

/// The database's own message for a failed query (tokio-postgres' `Display` says only "db error").
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

impl PgError {
    pub(crate) fn query(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Self {
        let context = context.into();
        move |source| Self::Query { context, source }
    }

    /// The SQLSTATE of a failed query, if any.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Self::Query { source, .. } => source.code().map(tokio_postgres::error::SqlState::code),
            _ => None,
        }
    }
}
