//! The LISTEN source: one dedicated connection per gateway instance, LISTENing only on the
//! channels the hub has subscribers for, dispatching each notification to the hub in commit
//! order, and — after a lost connection — replaying from the outbox everything committed since
//! the last event it delivered on each channel, so nothing is lost while it was down.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use changegate_core::backoff::Backoff;
use changegate_core::{Epoch, Event, FeedKey, Frame, Hub};
use futures_util::StreamExt;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};
use tokio_util::sync::CancellationToken;

use crate::event::{self, Notified};
use crate::store::{KEYS_CHANNEL, Store};
use crate::{PgError, channel};

/// Requests from the hub to the listener task.
pub(crate) enum Command {
    Listen { key: FeedKey, done: oneshot::Sender<Result<(), String>> },
    Unlisten { key: FeedKey },
}

/// One open channel of the source.
pub(crate) struct Listened {
    pub(crate) key: FeedKey,
    /// The last position dispatched on this channel (0: none yet).
    pub(crate) last: u64,
    /// The channel's head when LISTEN took effect: a reconnect replays from here at least.
    pub(crate) floor: u64,
}

impl Listened {
    pub(crate) fn resume_from(&self) -> u64 {
        self.last.max(self.floor)
    }

    /// Hands `event` (read from this channel) to the hub, unless it is another tenant's or one
    /// already dispatched (a reconnect's replay overlaps what LISTEN delivered).
    pub(crate) fn dispatch(&mut self, hub: &Hub, name: &str, event: Event) {
        if event.tenant != self.key.tenant {
            tracing::error!(channel = name, "event of another tenant on a channel ignored");
            return;
        }
        let seq = event.position.seq();
        if seq <= self.last {
            return;
        }
        self.last = seq;
        hub.dispatch(&self.key, Arc::new(Frame::new(event)));
    }
}

/// Why a session ended.
enum Ended {
    Cancelled,
    Lost(String),
}

pub(crate) struct Listener {
    pub(crate) store: Store,
    pub(crate) hub: Hub,
    pub(crate) epoch: Epoch,
    pub(crate) commands: mpsc::UnboundedReceiver<Command>,
    pub(crate) ready: watch::Sender<bool>,
    pub(crate) revoked: broadcast::Sender<String>,
    pub(crate) cancel: CancellationToken,
    channels: HashMap<String, Listened>,
}

fn quoted(channel: &str) -> String {
    format!("\"{}\"", channel.replace('"', "\"\""))
}

/// What a task that delivers the database's events to the hub works with: the LISTEN task on a
/// primary, the follower on a replica (and the LISTEN task again once that replica is promoted).
pub(crate) struct Upstream {
    pub(crate) store: Store,
    pub(crate) hub: Hub,
    pub(crate) epoch: Epoch,
    /// Feeds to open and close.
    pub(crate) commands: mpsc::UnboundedReceiver<Command>,
    /// Whether the upstream is up (`/readyz`).
    pub(crate) ready: watch::Sender<bool>,
    /// Ids of revoked keys, as they are announced.
    pub(crate) revoked: broadcast::Sender<String>,
    pub(crate) cancel: CancellationToken,
}

impl Listener {
    pub(crate) fn new(upstream: Upstream) -> Self {
        let Upstream { store, hub, epoch, commands, ready, revoked, cancel } = upstream;
        Self { store, hub, epoch, commands, ready, revoked, cancel, channels: HashMap::new() }
    }

    /// This listener, already holding `channels` (a promoted replica's follower's): they are
    /// LISTENed on connecting, and each is read on from its last position.
    pub(crate) fn with_channels(mut self, channels: HashMap<String, Listened>) -> Self {
        self.channels = channels;
        self
    }

    /// Runs until cancelled: connect, serve, and on any loss reconnect with exponential backoff
    /// and jitter.
    pub(crate) async fn run(self) {
        self.run_after(None).await;
    }

    /// [`Listener::run`] for channels already open: what was committed since `since` (and
    /// after each channel's position) is delivered once connected, as after a reconnect.
    pub(crate) async fn take_over(self, since: Instant) {
        self.run_after(Some(since)).await;
    }

    async fn run_after(mut self, since: Option<Instant>) {
        let mut backoff = Backoff::default();
        let mut down_since = since;
        loop {
            match self.connect().await {
                Ok((client, notifications)) => {
                    backoff.reset();
                    match self.session(&client, notifications, down_since).await {
                        Ended::Cancelled => return,
                        Ended::Lost(reason) => {
                            tracing::warn!(%reason, "LISTEN connection lost; reconnecting")
                        }
                    }
                    down_since = Some(Instant::now());
                }
                Err(error) => {
                    tracing::warn!(%error, "LISTEN connection failed; retrying");
                    down_since.get_or_insert_with(Instant::now);
                }
            }
            self.ready.send_replace(false);
            metrics::gauge!("changegate_upstream_up", "upstream" => "postgres_listen").set(0.0);
            if !self.wait_while_down(backoff.next_wait()).await {
                return;
            }
        }
    }

    /// Waits out the backoff, refusing subscriptions meanwhile. `false` when cancelled.
    async fn wait_while_down(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        let cancel = self.cancel.clone();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return false,
                () = &mut deadline => return true,
                command = self.commands.recv() => match command {
                    None => return false,
                    Some(Command::Listen { done, .. }) => {
                        let _ = done.send(Err("the database is unreachable".into()));
                    }
                    Some(Command::Unlisten { key }) => {
                        self.channels.remove(&channel(&key));
                    }
                },
            }
        }
    }

    async fn connect(
        &self,
    ) -> Result<(Client, mpsc::UnboundedReceiver<Notification>), tokio_postgres::Error> {
        let mut config = self.store.config().clone();
        // Named so that operators (and the tests) can find the LISTEN backend.
        config.application_name("changegate-listen");
        let (client, mut connection) = config.connect(NoTls).await?;
        let (sender, receiver) = mpsc::unbounded_channel();
        let cancel = self.cancel.clone();
        // Drives the connection; ends (dropping `sender`) when the connection does, which is
        // how the session learns it was lost.
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    message = messages.next() => match message {
                        Some(Ok(AsyncMessage::Notification(n))) => {
                            if sender.send(n).is_err() {
                                return;
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(error)) => {
                            tracing::debug!(%error, "LISTEN connection closed");
                            return;
                        }
                        None => return,
                    },
                }
            }
        });
        Ok((client, receiver))
    }

    async fn session(
        &mut self,
        client: &Client,
        mut notifications: mpsc::UnboundedReceiver<Notification>,
        down_since: Option<Instant>,
    ) -> Ended {
        if let Err(reason) = self.restore(client, down_since).await {
            return Ended::Lost(reason);
        }
        self.ready.send_replace(true);
        metrics::gauge!("changegate_upstream_up", "upstream" => "postgres_listen").set(1.0);
        let cancel = self.cancel.clone();
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Ended::Cancelled,
                note = notifications.recv() => match note {
                    None => return Ended::Lost("connection closed".into()),
                    Some(note) => {
                        if let Err(error) = self.notified(&note).await {
                            return Ended::Lost(error.to_string());
                        }
                    }
                },
                command = self.commands.recv() => match command {
                    None => return Ended::Cancelled,
                    Some(Command::Listen { key, done }) => {
                        let result = self.listen(client, key).await;
                        let lost = result.as_ref().err().filter(|_| client.is_closed()).cloned();
                        let _ = done.send(result);
                        if let Some(reason) = lost {
                            return Ended::Lost(reason);
                        }
                    }
                    Some(Command::Unlisten { key }) => {
                        let name = channel(&key);
                        if self.channels.remove(&name).is_some()
                            && let Err(error) = client.batch_execute(&format!("UNLISTEN {}", quoted(&name))).await
                        {
                            return Ended::Lost(error.to_string());
                        }
                    }
                },
            }
        }
    }

    /// After (re)connecting: LISTEN again on every channel, then deliver what was committed
    /// while the connection was down, and replay revocations announced meanwhile.
    async fn restore(&mut self, client: &Client, down_since: Option<Instant>) -> Result<(), String> {
        client.batch_execute(&format!("LISTEN {KEYS_CHANNEL}")).await.map_err(|e| e.to_string())?;
        for name in self.channels.keys() {
            client.batch_execute(&format!("LISTEN {}", quoted(name))).await.map_err(|e| e.to_string())?;
        }
        let Some(down_since) = down_since else { return Ok(()) };
        let window = down_since.elapsed() + Duration::from_secs(10);
        for id in self.store.revoked_within(window).await.map_err(|e| e.to_string())? {
            let _ = self.revoked.send(id);
        }
        let names: Vec<String> = self.channels.keys().cloned().collect();
        for name in names {
            // In pages: a long outage must not become one huge read into memory.
            let mut replayed = 0;
            while let Some(listened) = self.channels.get(&name) {
                let (tenant, from) = (listened.key.tenant.clone(), listened.resume_from());
                let events = self
                    .store
                    .replay(&name, &tenant, from, changegate_core::PAGE, self.epoch)
                    .await
                    .map_err(|e| e.to_string())?;
                let full = events.len() == changegate_core::PAGE;
                replayed += events.len();
                for event in events {
                    self.dispatch(&name, event);
                }
                if !full {
                    break;
                }
            }
            if replayed > 0 {
                tracing::info!(replayed, "delivered changes committed while LISTEN was down");
            }
        }
        Ok(())
    }

    async fn listen(&mut self, client: &Client, key: FeedKey) -> Result<(), String> {
        let name = channel(&key);
        if self.channels.contains_key(&name) {
            return Ok(());
        }
        client.batch_execute(&format!("LISTEN {}", quoted(&name))).await.map_err(|e| e.to_string())?;
        let floor = self.store.head(&name).await.map_err(|e| e.to_string())?;
        self.channels.insert(name, Listened { key, last: 0, floor });
        Ok(())
    }

    async fn notified(&mut self, note: &Notification) -> Result<(), PgError> {
        if note.channel() == KEYS_CHANNEL {
            let _ = self.revoked.send(note.payload().to_owned());
            return Ok(());
        }
        let Some(listened) = self.channels.get(note.channel()) else { return Ok(()) };
        let name = note.channel().to_owned();
        match event::notification(note.payload(), self.epoch) {
            Ok(Notified::Events(events)) => {
                for event in events {
                    self.dispatch(&name, event);
                }
            }
            Ok(Notified::Range { through, tenant, .. }) => {
                let tenant = match changegate_core::TenantId::parse(&tenant) {
                    Ok(tenant) if tenant == listened.key.tenant => tenant,
                    _ => {
                        tracing::error!(channel = name, "notification for another tenant ignored");
                        return Ok(());
                    }
                };
                // Read from the last event dispatched, not just the range: under load this
                // takes in the ranges of passes whose NOTIFYs are still queued, and those are
                // then skipped without a query. A failure must not lose the events: it ends
                // the session, and the reconnect replays from the last delivered position.
                let Some(listened) = self.channels.get(&name) else { return Ok(()) };
                if u64::try_from(through).unwrap_or(0) <= listened.last {
                    return Ok(());
                }
                loop {
                    let Some(listened) = self.channels.get(&name) else { return Ok(()) };
                    let after = listened.resume_from();
                    let events =
                        self.store.replay(&name, &tenant, after, changegate_core::PAGE, self.epoch).await?;
                    let full = events.len() == changegate_core::PAGE;
                    for event in events {
                        self.dispatch(&name, event);
                    }
                    if !full {
                        break;
                    }
                }
            }
            Err(error) => tracing::error!(%error, "unreadable notification ignored"),
        }
        Ok(())
    }

    fn dispatch(&mut self, name: &str, event: Event) {
        if let Some(listened) = self.channels.get_mut(name) {
            listened.dispatch(&self.hub, name, event);
        }
    }
}
