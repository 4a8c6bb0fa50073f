//! Catch-up reads: what a resuming subscriber receives before live events, read in pages.
//!
//! A catch-up is never loaded whole. A client with an old `Last-Event-ID` — an anonymous browser
//! key is public — could otherwise make the gateway hold its whole retained history in memory,
//! once per connection. Each source answers one bounded [`Replay::Page`] at a time, and says
//! where the next one starts; the gateway writes a page to the socket before it asks for the
//! next. A position that is no longer (or never was) in the log, also one that retention passes
//! between two pages, is a [`Replay::Reset`]: never a silent gap.

use std::sync::Arc;

use crate::event::Frame;
use crate::position::Position;

/// Events a source reads per catch-up page: small enough that 50 clients catching up at once
/// hold little, large enough that a database answers few queries per second of replay.
pub const PAGE: usize = 500;

/// One answer of a catch-up read.
#[derive(Debug)]
pub enum Replay {
    /// The matching events of one page, in order.
    Page {
        /// The events.
        frames: Vec<Arc<Frame>>,
        /// Where the next page starts (the last position this page read, matching or not);
        /// `None` once the page reached the head of the log.
        next: Option<Position>,
    },
    /// The start is unknown or older than retention: the client must refetch.
    Reset,
}
