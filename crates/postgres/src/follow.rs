//! The follower: how a gateway attached to a read replica delivers, where LISTEN cannot reach.
//!
//! The failure it exists for: NOTIFY is not replicated — a hot standby accepts no LISTEN and
//! hears nothing of the primary's notifications — and a standby cannot run the sequencer (it is
//! read-only). Yet the outbox rows, numbered on the primary, arrive on the replica in commit
//! order through WAL. So a follower reads them: whenever the replica has replayed further
//! (`pg_last_wal_replay_lsn()` moved), one query fetches what follows each open channel's last
//! position. Same rows, same ids, same resume and `reset` as on the primary, so a client can
//! move between the primary's gateways and the replica's with its `Last-Event-ID`.
//!
//! Key revocations travel by NOTIFY too; the follower reads recent ones from `api_keys` instead.
//!
//! When the replica is promoted (a region fails over), its capture trigger starts filling the
//! queue and nothing here numbers it: the follower notices (`pg_is_in_recovery()` turns false,
//! read with the replay position on every pass) and hands its channels, with their positions,
//! to a [`Listener`] — the engine starts the sequencer beside it — so the streams already open
//! go on without a gap, and without a gateway restart.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use changegate_core::backoff::Backoff;
use changegate_core::{Epoch, Hub};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::source::{Command, Listened, Listener, Upstream};
use crate::store::Store;
use crate::{PgError, channel};

/// The wait after a pass that found rows: the next one comes almost at once.
const BUSY_POLL: Duration = Duration::from_millis(2);

/// The longest wait between two passes while the replica is quiet. A quiet pass costs one
/// `pg_last_wal_replay_lsn()` call.
const IDLE_POLL: Duration = Duration::from_millis(20);

/// Rows read per channel per pass: a channel that fills it is read again at once.
const PAGE: i64 = 1000;

/// How often revocations are read.
const REVOCATIONS_EVERY: Duration = Duration::from_secs(1);

/// Revocations this recent are read (and the time since the last successful read on top), so
/// one missed read — the replica was unreachable — misses nothing.
const REVOCATIONS_WINDOW: Duration = Duration::from_secs(60);

pub(crate) struct Follower {
    pub(crate) store: Store,
    pub(crate) hub: Hub,
    pub(crate) epoch: Epoch,
    pub(crate) commands: mpsc::UnboundedReceiver<Command>,
    pub(crate) ready: watch::Sender<bool>,
    pub(crate) revoked: broadcast::Sender<String>,
    pub(crate) cancel: CancellationToken,
    channels: HashMap<String, Listened>,
    /// The replay position of the last pass that read every channel to its end.
    replayed: Option<String>,
    /// Set by a pass that found the replica promoted.
    promoted: bool,
    /// Revocation notices already sent, and when they were last read.
    announced: HashSet<String>,
    revocations_read: Option<Instant>,
}

impl Follower {
    pub(crate) fn new(upstream: Upstream) -> Self {
        let Upstream { store, hub, epoch, commands, ready, revoked, cancel } = upstream;
        Self {
            store,
            hub,
            epoch,
            commands,
            ready,
            revoked,
            cancel,
            channels: HashMap::new(),
            replayed: None,
            promoted: false,
            announced: HashSet::new(),
            revocations_read: None,
        }
    }

    /// Runs until cancelled (`None`) or until the replica is promoted: then it returns itself,
    /// for [`Follower::into_listener`]. A pass, a wait, again; on failure it retries with
    /// backoff, and because positions are kept per channel, nothing committed meanwhile is lost.
    pub(crate) async fn run(mut self) -> Option<Self> {
        let mut backoff = Backoff::default();
        let mut wait = BUSY_POLL;
        let mut next = Instant::now();
        let cancel = self.cancel.clone();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return None,
                command = self.commands.recv() => match command {
                    None => return None,
                    Some(Command::Listen { key, done }) => {
                        let name = channel(&key);
                        if self.channels.contains_key(&name) {
                            let _ = done.send(Ok(()));
                            continue;
                        }
                        // Live delivery starts at the channel's head here; the subscriber's
                        // catch-up covers what came before.
                        match self.store.head(&name).await {
                            Ok(head) => {
                                self.channels.insert(name, Listened { key, last: head, floor: head });
                                let _ = done.send(Ok(()));
                            }
                            Err(error) => {
                                let _ = done.send(Err(error.to_string()));
                            }
                        }
                    }
                    Some(Command::Unlisten { key }) => {
                        self.channels.remove(&channel(&key));
                    }
                },
                () = tokio::time::sleep_until(next) => {
                    match self.pass().await {
                        Ok(_) if self.promoted => return Some(self),
                        Ok(busy) => {
                            backoff.reset();
                            if !*self.ready.borrow() {
                                self.ready.send_replace(true);
                                metrics::gauge!("changegate_upstream_up", "upstream" => "postgres_follow").set(1.0);
                            }
                            wait = if busy { BUSY_POLL } else { (wait * 2).min(IDLE_POLL) };
                        }
                        Err(error) => {
                            tracing::warn!(%error, "following the replica failed; retrying");
                            self.ready.send_replace(false);
                            metrics::gauge!("changegate_upstream_up", "upstream" => "postgres_follow").set(0.0);
                            self.replayed = None;
                            wait = backoff.next_wait();
                        }
                    }
                    next = Instant::now() + wait;
                }
            }
        }
    }

    /// One pass: revocations (every [`REVOCATIONS_EVERY`]), then, if the replica replayed
    /// anything since the last complete pass, every open channel's new rows. `true` when
    /// it found rows.
    async fn pass(&mut self) -> Result<bool, PgError> {
        if self.revocations_read.is_none_or(|at| at.elapsed() >= REVOCATIONS_EVERY) {
            self.revocations().await?;
        }
        // Read the position first: anything visible by then is in the query below.
        let state = self.store.replayed_through().await?;
        if !state.in_recovery {
            // The listener that takes over reads every channel on from its position.
            self.promoted = true;
            return Ok(false);
        }
        let replayed = state.through;
        if replayed.is_some() && replayed == self.replayed {
            return Ok(false);
        }
        if self.channels.is_empty() {
            self.replayed = replayed;
            return Ok(false);
        }
        let mut names = Vec::with_capacity(self.channels.len());
        let mut tenants = Vec::with_capacity(self.channels.len());
        let mut after = Vec::with_capacity(self.channels.len());
        for (name, listened) in &self.channels {
            names.push(name.as_str());
            tenants.push(listened.key.tenant.as_str());
            after.push(i64::try_from(listened.last).unwrap_or(i64::MAX));
        }
        let rows = self.store.follow(&names, &tenants, &after, PAGE, self.epoch).await?;
        let found = !rows.is_empty();
        let mut per_channel: HashMap<String, i64> = HashMap::new();
        for (name, event) in rows {
            *per_channel.entry(name.clone()).or_default() += 1;
            if let Some(listened) = self.channels.get_mut(&name) {
                listened.dispatch(&self.hub, &name, event);
            }
        }
        // A full page means more is waiting: read again before trusting the position.
        let complete = per_channel.values().all(|&n| n < PAGE);
        self.replayed = if complete { replayed } else { None };
        Ok(found)
    }

    /// The LISTEN source that takes over on a promoted replica, with this follower's channels
    /// and their positions (it reads each on from there when it connects).
    pub(crate) fn into_listener(self) -> Listener {
        let Self { store, hub, epoch, commands, ready, revoked, cancel, channels, .. } = self;
        Listener::new(Upstream { store, hub, epoch, commands, ready, revoked, cancel })
            .with_channels(channels)
    }

    async fn revocations(&mut self) -> Result<(), PgError> {
        let window = REVOCATIONS_WINDOW + self.revocations_read.map_or(Duration::ZERO, |at| at.elapsed());
        let notices: HashSet<String> = self.store.revoked_within(window).await?.into_iter().collect();
        for notice in notices.difference(&self.announced) {
            let _ = self.revoked.send(notice.clone());
        }
        self.announced = notices;
        self.revocations_read = Some(Instant::now());
        Ok(())
    }
}
