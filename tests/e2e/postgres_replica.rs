//! A gateway on a streaming read replica (`pg_basebackup -R` of the test server, made by the
//! test): it follows the outbox where NOTIFY cannot reach, with the primary's ids, resume and
//! revocations, and refuses writes naming the primary — and, once the replica is promoted, takes
//! over as the primary's kind of gateway without a restart.

use std::time::Duration;

use changegate_e2e::{Replica, TestDb, collection_path, eventually, titles};
use serde_json::json;

#[tokio::test]
async fn a_client_moves_between_the_primarys_and_a_replicas_gateways_and_across_the_replicas_promotion_losing_nothing()
 {
    let Some(replica) = Replica::start().await else { return };
    let db = TestDb::new().await;
    let anon = db.setup(&["acme", "beta"], "anon");
    let publisher = db.key("acme", "publish");
    db.todos().await;
    let replica_db = replica.database(&db).await;
    let primary_gw = db.gateway(&[]).await;
    let replica_gw = replica.gateway(&db, &["--primary-url", "https://primary.example"]).await;
    let todos = collection_path("todos", &anon[0]);

    // A reference subscriber on the primary sees every change; the moving client sees three.
    let mut reference = primary_gw.sse(&todos, &[]).await;
    let mut moving = primary_gw.sse(&todos, &[]).await;
    let mut beta_on_replica = replica_gw.sse(&collection_path("todos", &anon[1]), &[]).await;
    for n in 1..=3 {
        db.client
            .execute("insert into todos (tenant_id, title) values ('acme', $1)", &[&format!("t{n}")])
            .await
            .unwrap();
    }
    let seen = titles(&mut moving, 3).await;
    drop(moving);
    // Written while the client is between gateways; t8 in one transaction of two rows.
    for n in 4..=7 {
        db.client
            .execute("insert into todos (tenant_id, title) values ('acme', $1)", &[&format!("t{n}")])
            .await
            .unwrap();
    }
    db.client
        .batch_execute(
            "begin; insert into todos (tenant_id, title) values ('acme', 't8'), ('acme', 't9'); commit",
        )
        .await
        .unwrap();
    let all = titles(&mut reference, 9).await;
    assert_eq!(seen, all[..3]);

    let mut moved = replica_gw.sse(&todos, &[("last-event-id", &seen[2].0)]).await;
    assert_eq!(titles(&mut moved, 6).await, all[3..], "the replica resumes exactly after t3");
    // Live, after the move: the same ids as on the primary.
    db.client.execute("update todos set title = 't10' where title = 't1'", &[]).await.unwrap();
    let live = titles(&mut reference, 1).await;
    assert_eq!(titles(&mut moved, 1).await, live);
    moved.assert_quiet(Duration::from_millis(300)).await;
    beta_on_replica.assert_quiet(Duration::from_millis(100)).await;
    drop(moved);

    // A lagging replica: the client's id is ahead of what has replicated — more than the 32
    // numbers a sequence logs ahead, so the replica's own sequence is behind it too. It must
    // get what follows once the replica catches up: not a reset, not a gap.
    replica_db.batch_execute("select pg_wal_replay_pause()").await.unwrap();
    db.client
        .batch_execute(
            "insert into todos (tenant_id, title) select 'acme', 't' || n from generate_series(11, 50) n",
        )
        .await
        .unwrap();
    let ahead = titles(&mut reference, 40).await;
    let resume = tokio::spawn({
        let replica_db_url = replica.url(&db.name);
        async move {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let (client, connection) =
                tokio_postgres::connect(&replica_db_url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            client.batch_execute("select pg_wal_replay_resume()").await.unwrap();
        }
    });
    let mut lagging = replica_gw.sse(&todos, &[("last-event-id", &ahead[37].0)]).await;
    assert_eq!(titles(&mut lagging, 2).await, ahead[38..], "t49 and t50, once replicated");
    lagging.assert_quiet(Duration::from_millis(300)).await;
    resume.await.unwrap();

    // Messages published on the primary reach the replica's subscribers, with the same ids.
    let mut messages =
        replica_gw.sse(&format!("/v1/events/subscribe?topic=order.*&apikey={}", anon[0]), &[]).await;
    let id = primary_gw.publish(&publisher, "order.created", json!({"n": 1})).await;
    replica.caught_up(&db.client).await;
    let event = messages.next_event().await;
    assert_eq!((event.id(), &event.json()["data"]), (Some(id.as_str()), &json!({"n": 1})));

    // The replica has the rows, but no gateway there wrote anything: they came by WAL.
    let replicated: i64 = replica_db
        .query_one("select count(*) from realtime.outbox where tenant = 'acme'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(replicated, 51);

    // The region fails over: the replica is promoted. Its own commits are captured into its
    // queue; its gateway must number and deliver them on the streams already open, and accept
    // writes — without a restart. (In this test, on this replica: every replica replays the
    // whole test server's WAL, and a third one made the suite's replication lag flaky.)
    let mut on_replica = replica_gw.sse(&todos, &[]).await;
    db.client.execute("insert into todos (tenant_id, title) values ('acme', 'before')", &[]).await.unwrap();
    let before = titles(&mut on_replica, 1).await;
    assert_eq!(before[0].1, "before");
    replica.promote();
    // Sessions survive a promotion: the one opened on the replica now writes.
    replica_db
        .batch_execute(
            "insert into todos (tenant_id, title) values ('acme', 'after-1'); \
             begin; insert into todos (tenant_id, title) values ('acme', 'after-2'), ('beta', 'b'); commit",
        )
        .await
        .unwrap();
    let after = titles(&mut on_replica, 2).await;
    assert_eq!(after.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(), ["after-1", "after-2"]);
    let seq = |id: &str| id.rsplit_once('-').and_then(|(_, s)| s.parse::<u64>().ok()).unwrap();
    assert!(
        seq(&before[0].0) < seq(&after[0].0) && seq(&after[0].0) < seq(&after[1].0),
        "{before:?} {after:?}"
    );
    on_replica.assert_quiet(Duration::from_millis(300)).await;
    assert_eq!(titles(&mut beta_on_replica, 1).await[0].1, "b");
    // Writes are accepted now, and delivered.
    let published = replica_gw
        .http
        .post(replica_gw.url("/v1/events/publish"))
        .header("apikey", &publisher)
        .json(&json!({"topic": "order.created", "data": {"n": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(published.status(), 202, "{:?}", published.text().await);
    assert_eq!(messages.next_event().await.json()["data"], json!({"n": 2}));
    // A client that left before the failover resumes across it with its Last-Event-ID.
    let mut resumed = replica_gw.sse(&todos, &[("last-event-id", &before[0].0)]).await;
    assert_eq!(titles(&mut resumed, 2).await, after);
}

#[tokio::test]
async fn a_replicas_gateway_refuses_writes_naming_the_primary_and_closes_revoked_keys_streams() {
    let Some(replica) = Replica::start().await else { return };
    let db = TestDb::new().await;
    let anon = db.setup(&["acme"], "anon");
    let publisher = db.key("acme", "publish");
    let service = db.key("acme", "service");
    db.cli(&["environments", "create", "--tenant", "acme", "production"]);
    db.todos().await;
    replica.database(&db).await;
    let named = replica.gateway(&db, &["--primary-url", "https://primary.example"]).await;
    let unnamed = replica.gateway(&db, &[]).await;

    let publish = |gw: &changegate_e2e::Gateway| {
        gw.http
            .post(gw.url("/v1/events/publish"))
            .header("apikey", &publisher)
            .json(&json!({"topic": "order.created", "data": {"n": 1}}))
            .send()
    };
    let refused = publish(&named).await.unwrap();
    assert_eq!(refused.status(), 503);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "read_only_replica");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("https://primary.example"), "{message}");
    // Without --primary-url, the primary database the replica streams from is named.
    let body: serde_json::Value = publish(&unnamed).await.unwrap().json().await.unwrap();
    assert_eq!(body["error"]["code"], "read_only_replica");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("primary database at 127.0.0.1:"), "{message}");
    // Management writes too; reads are served.
    let flag = named
        .http
        .post(named.url("/v1/flags?environment=production"))
        .header("apikey", &service)
        .json(&json!({"key": "dark-mode", "enabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(flag.status(), 503);
    let flags = named
        .http
        .get(named.url("/v1/flags?environment=production"))
        .header("apikey", &service)
        .send()
        .await
        .unwrap();
    assert_eq!(flags.status(), 200);
    let ready = named.http.get(named.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    // Nothing was written by the refused requests (numbered or still queued).
    let written: i64 = db
        .client
        .query_one(
            "select (select count(*) from realtime.outbox) + (select count(*) from realtime.queue)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(written, 0);

    // A flag written through the primary's gateway reaches a flag stream on the replica's.
    let primary = db.gateway(&[]).await;
    let sdk =
        db.cli(&["keys", "create", "--tenant", "acme", "--environment", "production", "--scope", "sdk"]);
    let sdk = sdk.trim().trim_start_matches("key=");
    replica.caught_up(&db.client).await;
    // The key is read from the replica: it is known there once it has replicated.
    let mut flag_stream = eventually("the new key replicated", || async {
        match named.try_sse("/api/v1/flags/events", &[("x-api-key", sdk)]).await {
            Ok(stream) => Ok(stream),
            Err((401, body)) if body["error"]["code"] == "invalid_api_key" => Err("not yet".to_owned()),
            Err((status, body)) => panic!("the flag stream was refused with {status}: {body}"),
        }
    })
    .await;
    let created = primary
        .http
        .post(primary.url("/v1/flags?environment=production"))
        .header("apikey", &service)
        .json(&json!({"key": "dark-mode", "enabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let event = flag_stream.next_event().await;
    assert_eq!((event.event(), &event.json()["flagKey"]), (Some("flag-updated"), &json!("dark-mode")));

    // A key revoked on the primary: the replica's open stream closes, a new one is refused.
    let todos = collection_path("todos", &anon[0]);
    let mut stream = named.sse(&todos, &[]).await;
    let id = db
        .cli(&["keys", "list", "--tenant", "acme"])
        .lines()
        .find(|l| l.contains("scope=anon"))
        .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")))
        .unwrap()
        .to_owned();
    db.cli(&["keys", "revoke", &id]);
    let ended = async { while stream.next_block().await.is_some() {} };
    tokio::time::timeout(Duration::from_secs(5), ended)
        .await
        .expect("the replica closed the revoked key's stream");
    eventually("the replica refuses the revoked key", || async {
        match named.try_sse(&todos, &[]).await {
            Err((401, body)) if body["error"]["code"] == "revoked_api_key" => Ok(()),
            Err((status, body)) => Err(format!("{status} {body}")),
            Ok(_) => Err("still accepted".into()),
        }
    })
    .await;
}
