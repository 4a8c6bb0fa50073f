//! Positions: where an event sits in its log, sent to clients as the SSE `id:` and taken back as
//! `Last-Event-ID`.
//!
//! A position names a *durable* place — the log it belongs to ([`Epoch`]) and a sequence number
//! in it — never instance memory. The epoch makes a position from another log (a restarted
//! memory engine, another database) recognisable, so it yields a `reset` instead of a silent
//! wrong replay.

use std::fmt;
use std::str::FromStr;

/// Identifies one log: a memory engine picks a random epoch when it starts; a database keeps
/// one for its lifetime, so every gateway instance on it agrees.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Epoch(pub u32);

impl Epoch {
    /// A fresh random epoch, for a log that lives only as long as this process.
    pub fn random() -> Self {
        let mut bytes = [0u8; 4];
        // Without an OS random source the process cannot make keys either; a fixed epoch is
        // still correct (positions then only collide across restarts, which the memory
        // engine's sequence start guards as well).
        let _ = getrandom::fill(&mut bytes);
        Self(u32::from_le_bytes(bytes))
    }
}

/// A place in a log: events of one stream have strictly increasing positions in delivery
/// order. Clients treat its text form (`0badcafe-42`) as opaque.
///
/// ```
/// use changegate_core::{Epoch, Position};
/// let p = Position::new(Epoch(0xbadcafe), 42);
/// assert_eq!(p.to_string(), "0badcafe-42");
/// assert_eq!("0badcafe-42".parse::<Position>().unwrap(), p);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Position {
    epoch: Epoch,
    seq: u64,
}

impl Position {
    /// The position `seq` in the log `epoch`.
    pub const fn new(epoch: Epoch, seq: u64) -> Self {
        Self { epoch, seq }
    }

    /// The log this position belongs to.
    pub const fn epoch(self) -> Epoch {
        self.epoch
    }

    /// The sequence number within the log.
    pub const fn seq(self) -> u64 {
        self.seq
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}-{}", self.epoch.0, self.seq)
    }
}

/// A `Last-Event-ID` that is not a position changegate could have produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a changegate event id; expected the `id:` of an event this service sent")]
pub struct PositionError;

impl FromStr for Position {
    type Err = PositionError;

    fn from_str(s: &str) -> Result<Self, PositionError> {
        let (epoch, seq) = s.split_once('-').ok_or(PositionError)?;
        let hex = epoch.len() == 8 && epoch.bytes().all(|b| b.is_ascii_hexdigit());
        let digits = !seq.is_empty() && seq.len() <= 20 && seq.bytes().all(|b| b.is_ascii_digit());
        if !hex || !digits {
            return Err(PositionError);
        }
        let epoch = u32::from_str_radix(epoch, 16).map_err(|_| PositionError)?;
        let seq = seq.parse().map_err(|_| PositionError)?;
        Ok(Self::new(Epoch(epoch), seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_through_their_text_form() {
        for (epoch, seq) in [(0, 0), (1, 1), (u32::MAX, u64::MAX), (0xdead_beef, 123_456)] {
            let p = Position::new(Epoch(epoch), seq);
            assert_eq!(p.to_string().parse::<Position>(), Ok(p));
        }
    }

    #[test]
    fn garbage_event_ids_are_refused() {
        for bad in [
            "",
            "42",
            "0badcafe-",
            "-42",
            "0badcafe-4a",
            "badcafe-42",
            "0badcafe-+42",
            "0badcafe-99999999999999999999999",
            "0badcafe-42-1",
            "0bädcafe-42",
            " 0badcafe-42",
        ] {
            assert_eq!(bad.parse::<Position>(), Err(PositionError), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn every_position_round_trips(epoch: u32, seq: u64) {
            let p = Position::new(Epoch(epoch), seq);
            prop_assert_eq!(p.to_string().parse::<Position>(), Ok(p));
        }

        #[test]
        fn parsing_any_text_never_panics(s in "\\PC{0,40}") {
            let _ = s.parse::<Position>();
        }
    }
}
