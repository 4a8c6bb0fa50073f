//! The migrations runner: applies the numbered files in `sql/` once each, in order, under an
//! advisory lock so that several gateway instances starting together do not race.

use tokio_postgres::Client;

use crate::PgError;

/// Every migration, in order: (version, name, SQL). The files themselves are idempotent too.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "realtime", include_str!("../../../sql/001_realtime.sql")),
    (2, "flags", include_str!("../../../sql/002_flags.sql")),
    (3, "sequencer", include_str!("../../../sql/003_sequencer.sql")),
    (4, "queue", include_str!("../../../sql/004_queue.sql")),
];

/// Applies the migrations that have not run yet; returns the versions applied now.
pub async fn run(client: &mut Client) -> Result<Vec<i32>, PgError> {
    let tx = client.transaction().await.map_err(PgError::query("starting the migration transaction"))?;
    tx.execute("select pg_advisory_xact_lock(hashtext('changegate.migrate'))", &[])
        .await
        .map_err(PgError::query("taking the migration lock"))?;
    tx.batch_execute(
        "create schema if not exists realtime;
         create table if not exists realtime.migrations (
             version    integer primary key,
             name       text not null,
             applied_at timestamptz not null default now()
         );",
    )
    .await
    .map_err(PgError::query("creating realtime.migrations"))?;
    let done: Vec<i32> = tx
        .query("select version from realtime.migrations", &[])
        .await
        .map_err(PgError::query("reading realtime.migrations"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        tx.batch_execute(sql)
            .await
            .map_err(PgError::query(format!("applying migration {version} ({name})")))?;
        tx.execute("insert into realtime.migrations (version, name) values ($1, $2)", &[version, name])
            .await
            .map_err(PgError::query("recording a migration"))?;
        applied.push(*version);
    }
    tx.commit().await.map_err(PgError::query("committing migrations"))?;
    Ok(applied)
}
