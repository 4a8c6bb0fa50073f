//! The sequencer: numbers committed outbox rows and sends their NOTIFYs, after the writers'
//! commits instead of inside them.
//!
//! The failure it exists for: numbering rows inside the user's commit needed a per-channel lock
//! held through the commit's fsync and a `pg_notify`, and PostgreSQL serialises every commit
//! with a pending NOTIFY behind one instance-wide lock — captured commits ran at 15 % of plain
//! ones (BENCHMARKS.md). Now writers only append (`sql/003_sequencer.sql`), and exactly one
//! session in the database numbers: whichever gateway holds [`LOCK`] as a session advisory lock.
//! The others wait as standbys and take over within [`STANDBY_RETRY`] of its connection ending.

use std::sync::Arc;
use std::time::Duration;

use changegate_core::backoff::Backoff;
use tokio::sync::Notify;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// The session advisory lock held by the one sequencer of a database.
pub const LOCK: i64 = 0x6367_7365_7100; // "cgseq"

/// How often a standby tries to become the sequencer.
pub const STANDBY_RETRY: Duration = Duration::from_millis(300);

/// Rows numbered per pass: a pass that fills it runs again at once.
const BATCH: i32 = 1000;

/// The wait after an empty pass starts here and doubles up to [`IDLE_POLL`]; any numbered row
/// brings it back. (Writers cannot wake the sequencer without a NOTIFY of their own, which is
/// the lock this design removes; so it polls, cheaply, on the pending-rows index.)
const BUSY_POLL: Duration = Duration::from_millis(1);

/// The longest wait between two passes when nothing is pending.
const IDLE_POLL: Duration = Duration::from_millis(8);

/// Runs until `cancel`: become the sequencer (or wait as a standby), then number rows. `wake`
/// starts a pass at once (a publish on this instance is waiting for its number).
pub(crate) async fn run(store: Store, cancel: CancellationToken, wake: Arc<Notify>) {
    let mut backoff = Backoff::default();
    loop {
        let ended = tokio::select! {
            () = cancel.cancelled() => return,
            ended = session(&store, &cancel, &wake) => ended,
        };
        match ended {
            Ok(()) => return,
            Err(error) => {
                metrics::gauge!("changegate_sequencer_leader").set(0.0);
                tracing::warn!(%error, "sequencer connection lost; retrying");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff.next_wait()) => {}
                }
            }
        }
    }
}

/// One connection's life: standby until the lock is ours, then passes until cancelled.
async fn session(
    store: &Store,
    cancel: &CancellationToken,
    wake: &Notify,
) -> Result<(), tokio_postgres::Error> {
    let mut config = store.config().clone();
    config.application_name("changegate-sequencer");
    let (client, connection) = config.connect(NoTls).await?;
    let connection = tokio::spawn(connection);
    let result = async {
        loop {
            let leader: bool = client.query_one("select pg_try_advisory_lock($1)", &[&LOCK]).await?.get(0);
            if leader {
                break;
            }
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = tokio::time::sleep(STANDBY_RETRY) => {}
            }
        }
        tracing::info!("this gateway is the outbox sequencer");
        metrics::gauge!("changegate_sequencer_leader").set(1.0);
        let pass = client.prepare("select realtime.sequence_batch($1)").await?;
        let mut wait = BUSY_POLL;
        loop {
            let numbered: i32 = client.query_one(&pass, &[&BATCH]).await?.get(0);
            metrics::counter!("changegate_sequenced_rows_total")
                .increment(u64::try_from(numbered).unwrap_or(0));
            if numbered == BATCH {
                continue;
            }
            wait = if numbered > 0 { BUSY_POLL } else { (wait * 2).min(IDLE_POLL) };
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = tokio::time::sleep(wait) => {}
                () = wake.notified() => wait = BUSY_POLL,
            }
        }
    }
    .await;
    // Ending the connection releases the lock for a standby.
    drop(client);
    connection.abort();
    result
}
