//! PostgreSQL collections end to end: rows written with SQL arrive on the SSE stream.

use std::time::Duration;

use changegate_e2e::{TestDb, collection_path, seq};
use serde_json::{Value, json};

#[tokio::test]
async fn insert_update_and_delete_arrive_in_commit_order_and_delete_carries_the_prior_row() {
    let db = TestDb::new().await;
    let keys = db.setup(&["acme"], "anon");
    db.todos().await;
    let gw = db.gateway(&[]).await;
    let mut sse = gw.sse(&collection_path("todos", &keys[0]), &[]).await;
    db.client
        .batch_execute(
            "insert into todos (tenant_id, title) values ('acme', 'write tests');
             update todos set done = true where id = 1;
             delete from todos where id = 1;",
        )
        .await
        .unwrap();
    let mut previous = 0;
    for (kind, done) in [("insert", false), ("update", true), ("delete", true)] {
        let event = sse.next_event().await;
        assert_eq!(event.event(), None, "no event: field, so onmessage fires");
        let id = event.id().unwrap();
        assert!(seq(id) > previous);
        previous = seq(id);
        assert_eq!(
            event.json(),
            json!({"type": kind, "documentId": "1",
                   "document": {"id": 1, "tenant_id": "acme", "title": "write tests", "done": done}})
        );
    }
}

#[tokio::test]
async fn schema_qualified_names_work_and_rows_without_a_tenant_are_not_published() {
    let db = TestDb::new().await;
    let keys = db.setup(&["acme"], "anon");
    db.todos().await;
    let gw = db.gateway(&[]).await;
    let mut sse = gw.sse(&collection_path("public.todos", &keys[0]), &[]).await;
    db.client
        .batch_execute("insert into todos (tenant_id, title) values (null, 'orphan'), ('acme', 'mine')")
        .await
        .unwrap();
    assert_eq!(sse.next_event().await.json()["document"]["title"], "mine");
    sse.assert_quiet(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_composite_primary_key_is_sent_as_a_json_array_of_its_columns() {
    let db = TestDb::new().await;
    let keys = db.setup(&["acme"], "anon");
    db.client
        .batch_execute(
            "create schema app;
             create table app.members (org text, user_id int, tenant_id text, primary key (org, user_id));",
        )
        .await
        .unwrap();
    db.cli(&["realtime", "enable", "app.members"]);
    let gw = db.gateway(&[]).await;
    let mut sse = gw.sse(&collection_path("app.members", &keys[0]), &[]).await;
    db.client.batch_execute("insert into app.members values ('x', 7, 'acme')").await.unwrap();
    assert_eq!(sse.next_event().await.json()["documentId"], r#"["x", 7]"#);
}

#[tokio::test]
async fn a_one_megabyte_row_commits_and_is_delivered_whole() {
    let db = TestDb::new().await;
    let keys = db.setup(&["acme"], "anon");
    db.todos().await;
    let gw = db.gateway(&[]).await;
    let mut sse = gw.sse(&collection_path("todos", &keys[0]), &[]).await;
    let big = "x".repeat(1024 * 1024);
    db.client.execute("insert into todos (tenant_id, title) values ('acme', $1)", &[&big]).await.unwrap();
    let event = sse.next_event().await;
    assert_eq!(event.json()["document"]["title"].as_str().map(str::len), Some(big.len()));
}

#[tokio::test]
async fn the_trigger_notifies_the_documented_channel_name() {
    let db = TestDb::new().await;
    db.setup(&["acme"], "anon");
    db.todos().await;
    // The NOTIFY is sent after the commit by the sequencer, which a running gateway provides.
    let _gw = db.gateway(&[]).await;
    // A plain PostgreSQL client LISTENing on flc_rt_<md5('public.todos:acme')> sees the change.
    let channel: String =
        db.client.query_one("select 'flc_rt_' || md5('public.todos:acme')", &[]).await.unwrap().get(0);
    assert_eq!(channel, "flc_rt_9211f24eaed6c31d96b822af39171124", "the README's example");
    let (_listening, mut received) = changegate_e2e::notifications(&db.url, &channel).await;
    db.client.batch_execute("insert into todos (tenant_id, title) values ('acme', 'hi')").await.unwrap();
    let payload = tokio::time::timeout(Duration::from_secs(5), received.recv()).await.unwrap().unwrap();
    // One NOTIFY per channel per sequencer pass: the pass's rows of this channel, in order.
    let payload: Value = serde_json::from_str(&payload).unwrap();
    let rows = payload.as_array().unwrap_or_else(|| panic!("a batch of rows: {payload}"));
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0]["tenant"].as_str(), rows[0]["op"].as_str()), (Some("acme"), Some("insert")));
}

#[tokio::test]
async fn truncate_sends_a_reset_to_the_tables_subscribers() {
    let db = TestDb::new().await;
    let keys = db.setup(&["acme"], "anon");
    db.todos().await;
    let gw = db.gateway(&[]).await;
    db.client.batch_execute("insert into todos (tenant_id, title) values ('acme', 'a')").await.unwrap();
    // The insert is numbered (and so in the past) before the subscriber arrives.
    changegate_e2e::eventually("the insert is sequenced", || async {
        let pending: i64 =
            db.client.query_one("select count(*) from realtime.queue", &[]).await.unwrap().get(0);
        if pending == 0 { Ok(()) } else { Err(format!("{pending} rows pending")) }
    })
    .await;
    let mut sse = gw.sse(&collection_path("todos", &keys[0]), &[]).await;
    db.client.batch_execute("truncate todos").await.unwrap();
    let reset = sse.next_event().await;
    assert_eq!(reset.event(), Some("reset"));
    assert_eq!(reset.json(), json!({"reason": "truncated"}));
    assert!(reset.id().is_some());
}

#[tokio::test]
async fn tables_that_are_not_enabled_and_hostile_names_get_404_and_nothing_runs() {
    let db = TestDb::new().await;
    let keys = db.setup(&["acme"], "anon");
    db.todos().await;
    db.client.batch_execute("create table secrets (id int primary key, tenant_id text)").await.unwrap();
    let gw = db.gateway(&[]).await;
    for name in [
        "secrets",
        "nope",
        "todos;drop%20table%20todos",
        "todos%22;drop%20table%20todos;--",
        "%27todos%27",
        "t%C3%A2ches",
        "pg_catalog.pg_authid",
        "realtime.api_keys",
        "flc_rt_9211f24eaed6c31d96b822af39171124",
    ] {
        let (status, body) = gw.try_sse(&collection_path(name, &keys[0]), &[]).await.err().expect("refused");
        assert_eq!((status, body["error"]["code"].as_str()), (404, Some("collection_not_enabled")), "{name}");
    }
    let count: i64 = db.client.query_one("select count(*) from todos", &[]).await.unwrap().get(0);
    assert_eq!(count, 0, "the table still exists and is untouched");
}

#[tokio::test]
async fn the_cli_prints_a_key_once_and_lists_keys_without_secrets() {
    let db = TestDb::new().await;
    db.cli(&["migrate"]);
    db.cli(&["tenants", "create", "acme"]);
    db.cli(&["environments", "create", "--tenant", "acme", "production"]);
    db.cli(&["tenants", "create", "beta"]);
    assert_eq!(db.cli(&["tenants", "list"]), "tenant=acme\ntenant=beta\n");
    assert_eq!(db.cli(&["environments", "list", "--tenant", "acme"]), "environment=production tenant=acme\n");
    let created =
        db.cli(&["keys", "create", "--tenant", "acme", "--environment", "production", "--scope", "sdk"]);
    let lines: Vec<&str> = created.lines().collect();
    assert_eq!(lines.len(), 1);
    let key = lines[0].strip_prefix("key=flc_sdk_").expect("key=flc_sdk_…");
    let listing = db.cli(&["keys", "list", "--tenant", "acme"]);
    assert!(listing.contains("scope=sdk") && listing.contains("environment=production"), "{listing}");
    assert!(!listing.contains(&key[6..]), "the listing shows only a prefix");
    let stored: i64 = db
        .client
        .query_one("select count(*) from realtime.api_keys where position($1 in prefix) > 0", &[&key])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "the key itself is not stored");
    // Rotation prints the new key and retires the old one (at once, with no grace).
    let id = listing.split_whitespace().find_map(|f| f.strip_prefix("id=")).unwrap().to_owned();
    let rotated = db.cli(&["keys", "rotate", &id]);
    assert!(rotated.trim().starts_with("key=flc_sdk_") && rotated.lines().count() == 1, "{rotated}");
    let listing = db.cli(&["keys", "list", "--tenant", "acme"]);
    assert!(
        listing.contains(&format!("id={id} "))
            && listing.lines().any(|l| l.contains(&id) && l.ends_with("revoked=true"))
    );
    assert_eq!(listing.lines().filter(|l| l.ends_with("revoked=false")).count(), 1, "{listing}");
}

/// A database migrated by a changegate from before the sequencer (schema versions 1 and 2,
/// rows numbered at commit) upgrades in place: positions handed out before stay valid, a client
/// resuming from one gets exactly what it missed, and rows committed during the upgrade window
/// are numbered after everything older.
#[tokio::test]
async fn an_id_from_before_the_sequencer_upgrade_resumes_without_loss() {
    let db = TestDb::new().await;
    let migrations_ddl = "create schema realtime;
        create table realtime.migrations (version integer primary key, name text not null,
                                          applied_at timestamptz not null default now());";
    db.client
        .batch_execute(&format!(
            "{migrations_ddl} {} {} insert into realtime.migrations (version, name) values (1, 'realtime'), (2, 'flags');",
            include_str!("../../sql/001_realtime.sql"),
            include_str!("../../sql/002_flags.sql")
        ))
        .await
        .unwrap();
    db.todos().await;
    // Under the old schema the commit trigger numbers rows as they commit.
    for title in ["old-1", "old-2", "old-3"] {
        db.client
            .execute("insert into todos (tenant_id, title) values ('acme', $1)", &[&title])
            .await
            .unwrap();
    }
    let row = db
        .client
        .query_one("select (select epoch from realtime.meta), min(seq) from realtime.outbox", &[])
        .await
        .unwrap();
    let (epoch, first): (i64, i64) = (row.get(0), row.get(1));
    let held = format!("{epoch:08x}-{first}");
    // The upgrade (as `changegate migrate` or `serve --migrate` runs it), then a new gateway.
    let keys = db.setup(&["acme"], "anon");
    let gw = db.gateway(&[]).await;
    db.client.execute("insert into todos (tenant_id, title) values ('acme', 'new-1')", &[]).await.unwrap();
    let mut resumed = gw.sse(&collection_path("todos", &keys[0]), &[("last-event-id", &held)]).await;
    let mut titles = Vec::new();
    for _ in 0..3 {
        titles.push(resumed.next_event().await.json()["document"]["title"].as_str().unwrap().to_owned());
    }
    assert_eq!(titles, ["old-2", "old-3", "new-1"]);
    resumed.assert_quiet(Duration::from_millis(300)).await;
}

/// Migration 4 moves writers' rows to a queue. Rows appended under migration 3 and not yet
/// numbered when it runs (no gateway was sequencing) move with it and are delivered once, in
/// order, after the rows numbered before the upgrade.
#[tokio::test]
async fn rows_queued_before_the_queue_upgrade_are_delivered_after_it() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(&format!(
            "create schema realtime;
             create table realtime.migrations (version integer primary key, name text not null,
                                               applied_at timestamptz not null default now());
             {} {} {}
             insert into realtime.migrations (version, name) values (1, 'realtime'), (2, 'flags'), (3, 'sequencer');",
            include_str!("../../sql/001_realtime.sql"),
            include_str!("../../sql/002_flags.sql"),
            include_str!("../../sql/003_sequencer.sql")
        ))
        .await
        .unwrap();
    db.todos().await;
    db.client.execute("insert into todos (tenant_id, title) values ('acme', 'numbered')", &[]).await.unwrap();
    db.client.query_one("select realtime.sequence_batch(1000)", &[]).await.unwrap();
    let held: i64 = db.client.query_one("select max(seq) from realtime.outbox", &[]).await.unwrap().get(0);
    for title in ["pending-1", "pending-2"] {
        db.client
            .execute("insert into todos (tenant_id, title) values ('acme', $1)", &[&title])
            .await
            .unwrap();
    }
    let epoch: i64 = db.client.query_one("select epoch from realtime.meta", &[]).await.unwrap().get(0);
    // A gateway does not serve a schema older than its code: it says what to run, and exits.
    let refused = tokio::process::Command::new(changegate_e2e::changegate_binary())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", &db.url)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("migration 4 (queue) has not run: run `changegate migrate`"), "{stderr}");
    let keys = db.setup(&["acme"], "anon");
    let moved: i64 = db.client.query_one("select count(*) from realtime.queue", &[]).await.unwrap().get(0);
    assert_eq!(moved, 2, "the upgrade moved the pending rows to the queue");
    let gw = db.gateway(&[]).await;
    let mut resumed = gw
        .sse(&collection_path("todos", &keys[0]), &[("last-event-id", &format!("{epoch:08x}-{held}"))])
        .await;
    let mut titles = Vec::new();
    for _ in 0..2 {
        titles.push(resumed.next_event().await.json()["document"]["title"].as_str().unwrap().to_owned());
    }
    assert_eq!(titles, ["pending-1", "pending-2"]);
    resumed.assert_quiet(Duration::from_millis(300)).await;
}

/// The sequencer NOTIFYs each channel once per pass: a 300-row transaction is one NOTIFY on its
/// tenant's channel (a reference to the range: too big to carry), and the gateway reads the
/// range and delivers all 300 in order, once; the other tenant's rows of the same transaction
/// go to its own channel only.
#[tokio::test]
async fn a_large_transaction_is_one_notify_per_channel_and_every_row_is_delivered_once() {
    let db = TestDb::new().await;
    let keys = db.setup(&["acme", "beta"], "anon");
    db.todos().await;
    let gw = db.gateway(&[]).await;
    let mut acme = gw.sse(&collection_path("todos", &keys[0]), &[]).await;
    let mut beta = gw.sse(&collection_path("todos", &keys[1]), &[]).await;
    let channel: String =
        db.client.query_one("select 'flc_rt_' || md5('public.todos:acme')", &[]).await.unwrap().get(0);
    let (_listening, mut received) = changegate_e2e::notifications(&db.url, &channel).await;
    db.client
        .batch_execute(
            "begin;
             insert into todos (tenant_id, title) select 'acme', 'a' || n from generate_series(1, 300) n;
             insert into todos (tenant_id, title) values ('beta', 'b1');
             commit",
        )
        .await
        .unwrap();
    let mut titles = Vec::new();
    let mut last = 0;
    for _ in 0..300 {
        let event = acme.next_event().await;
        let seq = changegate_e2e::seq(event.id().unwrap());
        assert!(seq > last, "in order");
        last = seq;
        titles.push(event.json()["document"]["title"].as_str().unwrap().to_owned());
    }
    assert_eq!(titles, (1..=300).map(|n| format!("a{n}")).collect::<Vec<_>>());
    acme.assert_quiet(Duration::from_millis(300)).await;
    assert_eq!(beta.next_event().await.json()["document"]["title"], "b1");
    beta.assert_quiet(Duration::from_millis(100)).await;

    let payload: Value = serde_json::from_str(&received.recv().await.unwrap()).unwrap();
    assert_eq!(
        (payload["ref"].as_bool(), payload["tenant"].as_str()),
        (Some(true), Some("acme")),
        "{payload}"
    );
    assert_eq!(payload["through"].as_i64().unwrap() - payload["from"].as_i64().unwrap(), 299);
    assert!(received.try_recv().is_err(), "one NOTIFY for the whole transaction on this channel");
}
