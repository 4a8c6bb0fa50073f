//! PostgreSQL delivery guarantees: commit order, no loss across reconnects, restarts and
//! instances, retention resets, and tenant isolation under attack.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use changegate_e2e::{TestDb, collection_path, eventually, rss_bytes, seq, titles};
use serde_json::json;

/// T1 inserts before T2, but T2 commits first. The client sees T2's commit, disconnects, and
/// T1 commits while it is away: on resume it must receive T1 — which a replay of
/// `id > last seen` over insertion-ordered ids would skip.
#[tokio::test]
async fn transactions_committing_out_of_insert_order_are_delivered_in_commit_order_across_a_resume() {
    let db = TestDb::new().await;
    let keys = db.setup(&["acme"], "anon");
    db.todos().await;
    let gw = db.gateway(&[]).await;
    let mut sse = gw.sse(&collection_path("todos", &keys[0]), &[]).await;

    let t1 = db.connect().await;
    let t2 = db.connect().await;
    t1.batch_execute("begin; insert into todos (tenant_id, title) values ('acme', 'T1')").await.unwrap();
    t2.batch_execute("begin; insert into todos (tenant_id, title) values ('acme', 'T2')").await.unwrap();
    t2.batch_execute("commit").await.unwrap();
    let seen = titles(&mut sse, 1).await;
    assert_eq!(seen[0].1, "T2");
    drop(sse);
    t1.batch_execute("commit").await.unwrap();

    let mut resumed = gw.sse(&collection_path("todos", &keys[0]), &[("last-event-id", &seen[0].0)]).await;
    let after = titles(&mut resumed, 1).await;
    assert_eq!(after[0].1, "T1");
    assert!(seq(&after[0].0) > seq(&seen[0].0), "commit order is id order");
    resumed.assert_quiet(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn another_tenant_never_sees_inserts_updates_deletes_or_large_rows() {
    let db = TestDb::new().await;
    let keys = db.setup(&["acme", "beta"], "anon");
    db.todos().await;
    let gw = db.gateway(&[]).await;
    let mut beta = gw.sse(&collection_path("todos", &keys[1]), &[]).await;
    let mut beta_by_schema =
        gw.sse("/v1/events/subscribe?collection=public.todos", &[("apikey", &keys[1])]).await;
    let mut acme = gw.sse(&collection_path("todos", &keys[0]), &[]).await;
    let big = "s".repeat(200_000);
    db.client
        .execute("insert into todos (tenant_id, title) values ('acme', 'secret'), ('acme', $1)", &[&big])
        .await
        .unwrap();
    db.client.batch_execute("update todos set title = 'secret2' where tenant_id = 'acme'").await.unwrap();
    db.client.batch_execute("delete from todos where tenant_id = 'acme'").await.unwrap();
    db.client.batch_execute("insert into todos (tenant_id, title) values ('beta', 'mine')").await.unwrap();
    let acme_seen = titles(&mut acme, 6).await;
    for sse in [&mut beta, &mut beta_by_schema] {
        let only = titles(sse, 1).await;
        assert_eq!(only[0].1, "mine");
        sse.assert_quiet(Duration::from_millis(300)).await;
    }
    // Resuming from acme's positions replays nothing of acme's.
    let mut resumed =
        gw.sse(&collection_path("todos", &keys[1]), &[("last-event-id", &acme_seen[0].0)]).await;
    assert_eq!(titles(&mut resumed, 1).await[0].1, "mine");
    resumed.assert_quiet(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_revoked_key_is_refused_and_its_open_streams_close_on_every_instance() {
    let db = TestDb::new().await;
    let keys = db.setup(&["acme"], "anon");
    db.todos().await;
    let one = db.gateway(&[]).await;
    let two = db.gateway(&[]).await;
    let mut on_one = one.sse(&collection_path("todos", &keys[0]), &[]).await;
    let mut on_two = two.sse(&collection_path("todos", &keys[0]), &[]).await;
    let id =
        db.cli(&["keys", "list"]).split_whitespace().find_map(|f| f.strip_prefix("id=")).unwrap().to_owned();
    db.cli(&["keys", "revoke", &id]);
    for sse in [&mut on_one, &mut on_two] {
        let ended = async { while sse.next_block().await.is_some() {} };
        tokio::time::timeout(Duration::from_secs(3), ended).await.expect("the stream closed promptly");
    }
    let (status, body) = one.try_sse(&collection_path("todos", &keys[0]), &[]).await.err().expect("refused");
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("revoked_api_key")));
}

#[tokio::test]
async fn publish_on_one_instance_reaches_subscribers_of_another_and_resumes_there() {
    let db = TestDb::new().await;
    let anon = db.setup(&["acme"], "anon");
    let publisher = db.key("acme", "publish");
    let a = db.gateway(&[]).await;
    let b = db.gateway(&[]).await;
    let mut on_b = b.sse(&format!("/v1/events/subscribe?topic=order.*&apikey={}", anon[0]), &[]).await;
    let first = a.publish(&publisher, "order.created", json!({"n": 1})).await;
    let event = on_b.next_event().await;
    assert_eq!((event.id(), &event.json()["data"]), (Some(first.as_str()), &json!({"n": 1})));
    drop(on_b);
    let second = a.publish(&publisher, "order.shipped", json!({"n": 2})).await;
    a.publish(&publisher, "user.created", json!({"n": 3})).await;
    // Resume on B with the id first seen through A.
    let mut resumed = b
        .sse(&format!("/v1/events/subscribe?topic=order.*&apikey={}", anon[0]), &[("last-event-id", &first)])
        .await;
    assert_eq!(resumed.next_event().await.id(), Some(second.as_str()));
    resumed.assert_quiet(Duration::from_millis(300)).await;
}

/// Writes rows one by one until told to stop; returns how many.
fn writer(db: &TestDb, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    let url = db.url.clone();
    tokio::spawn(async move {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            client
                .execute("insert into todos (tenant_id, title) values ('acme', $1)", &[&n.to_string()])
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        n
    })
}

async fn wait_for_listener(db: &TestDb) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if db.listen_backends(false).await == 1 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the LISTEN connection never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn killing_the_listen_backend_while_rows_are_written_loses_and_repeats_nothing() {
    let db = TestDb::new().await;
    let keys = db.setup(&["acme"], "anon");
    db.todos().await;
    let gw = db.gateway(&[]).await;
    let mut sse = gw.sse(&collection_path("todos", &keys[0]), &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writing = writer(&db, stop.clone());
    for _ in 0..3 {
        wait_for_listener(&db).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let killed = db.listen_backends(true).await;
        assert_eq!(killed, 1, "the gateway's LISTEN backend was found and killed");
        // Keep writing while it is down.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for_listener(&db).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    stop.store(true, Ordering::SeqCst);
    let written = writing.await.unwrap();
    let received = titles(&mut sse, written).await;
    let expected: Vec<String> = (1..=written).map(|n| n.to_string()).collect();
    assert_eq!(received.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>(), expected);
    sse.assert_quiet(Duration::from_millis(300)).await;
    // And the gateway reports itself ready again.
    let ready = gw.http.get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
}

#[tokio::test]
async fn restarting_the_gateway_mid_stream_loses_nothing_for_a_resuming_client() {
    let db = TestDb::new().await;
    let keys = db.setup(&["acme"], "anon");
    db.todos().await;
    let first = db.gateway(&[]).await;
    let mut sse = first.sse(&collection_path("todos", &keys[0]), &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writing = writer(&db, stop.clone());
    let mut received = titles(&mut sse, 20).await;
    let status = first.terminate().await;
    assert!(status.success());
    let second = db.gateway(&[]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let written = writing.await.unwrap();
    let last = received.last().unwrap().0.clone();
    let mut resumed = second.sse(&collection_path("todos", &keys[0]), &[("last-event-id", &last)]).await;
    received.extend(titles(&mut resumed, written - received.len()).await);
    let expected: Vec<String> = (1..=written).map(|n| n.to_string()).collect();
    assert_eq!(received.into_iter().map(|(_, t)| t).collect::<Vec<_>>(), expected);
}

#[tokio::test]
async fn a_position_pruned_by_retention_yields_reset_and_a_kept_one_replays() {
    let db = TestDb::new().await;
    let keys = db.setup(&["acme"], "anon");
    db.todos().await;
    let gw = db.gateway(&["--outbox-max-rows-per-channel", "3", "--prune-every", "100ms"]).await;
    let mut sse = gw.sse(&collection_path("todos", &keys[0]), &[]).await;
    for n in 0..6 {
        db.client
            .execute("insert into todos (tenant_id, title) values ('acme', $1)", &[&n.to_string()])
            .await
            .unwrap();
    }
    let seen = titles(&mut sse, 6).await;
    // Wait until retention has run.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rows: i64 =
            db.client.query_one("select count(*) from realtime.outbox", &[]).await.unwrap().get(0);
        if rows <= 3 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "retention never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut expired = gw.sse(&collection_path("todos", &keys[0]), &[("last-event-id", &seen[0].0)]).await;
    let reset = expired.next_event().await;
    assert_eq!((reset.event(), reset.json()), (Some("reset"), json!({"reason": "position-expired"})));
    assert_eq!(reset.id(), Some(seen[5].0.as_str()), "continue from the newest committed change");
    let mut kept = gw.sse(&collection_path("todos", &keys[0]), &[("last-event-id", &seen[3].0)]).await;
    let replayed = titles(&mut kept, 2).await;
    assert_eq!(replayed, seen[4..].to_vec());
}

#[tokio::test]
async fn readiness_is_red_while_the_listen_connection_is_down_and_green_after() {
    let db = TestDb::new().await;
    db.setup(&["acme"], "anon");
    let gw = db.gateway(&[]).await;
    wait_for_listener(&db).await;
    let ready = |gw: &changegate_e2e::Gateway| {
        let request = gw.http.get(gw.url("/readyz"));
        async move { request.send().await.unwrap() }
    };
    // The backend shows in pg_stat_activity a moment before its LISTENs are in place and
    // readiness turns green: wait for green first (the same deadline as below).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ready(&gw).await.status() != 200 {
        assert!(tokio::time::Instant::now() < deadline, "readiness never turned green");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Refuse new connections to the database, then cut the LISTEN connection.
    let admin = db.admin().await;
    admin.batch_execute(&format!("alter database {} allow_connections false", db.name)).await.unwrap();
    db.listen_backends(true).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let red = loop {
        let response = ready(&gw).await;
        if response.status() == 503 {
            break response.json::<serde_json::Value>().await.unwrap();
        }
        assert!(tokio::time::Instant::now() < deadline, "readiness never turned red");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(red["error"]["code"], "unavailable");
    assert!(red["error"]["message"].as_str().unwrap().contains("LISTEN"), "{red}");
    admin.batch_execute(&format!("alter database {} allow_connections true", db.name)).await.unwrap();
    wait_for_listener(&db).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ready(&gw).await.status() != 200 {
        assert!(tokio::time::Instant::now() < deadline, "readiness never turned green again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads raw SSE bytes until `wanted` events arrived (or the stream ends), checking that the
/// ids are consecutive from `first`: returns how many arrived and when the first did.
async fn read_consecutive(response: reqwest::Response, first: u64, wanted: u64) -> (u64, Duration) {
    use futures_util::StreamExt;
    let started = tokio::time::Instant::now();
    let mut first_at = None;
    let mut body = response.bytes_stream();
    let (mut next, mut buffer) = (first, Vec::new());
    while next < first + wanted {
        let Some(Ok(bytes)) = tokio::time::timeout(Duration::from_secs(60), body.next()).await.unwrap()
        else {
            break;
        };
        buffer.extend_from_slice(&bytes);
        let complete = buffer.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        for line in buffer[..complete].split(|&b| b == b'\n') {
            if let Some(id) = line.strip_prefix(b"id: ") {
                assert_eq!(seq(std::str::from_utf8(id).unwrap()), next, "ids follow each other");
                first_at.get_or_insert_with(|| started.elapsed());
                next += 1;
            }
        }
        buffer.drain(..complete);
    }
    (next - first, first_at.unwrap_or(Duration::MAX))
}

/// A public key with a very old `Last-Event-ID` must not make the gateway load the history into
/// memory: 50 clients resuming from 1 000 000 events back start receiving at once, in order,
/// while the gateway's resident memory stays flat.
#[tokio::test]
async fn fifty_clients_resuming_a_million_events_back_stream_it_in_pages_with_flat_memory() {
    const BACKLOG: u64 = 1_000_000;
    let db = TestDb::new().await;
    let keys = db.setup(&["acme"], "anon");
    let publisher = db.key("acme", "publish");
    let gw = db.gateway(&["--replay-max", "2000000"]).await;
    let from = gw.publish(&publisher, "bulk", json!(0)).await;
    db.client
        .batch_execute(&format!(
            "insert into realtime.outbox (seq, channel, tenant, kind, topic, payload)
             select nextval('realtime.outbox_seq'), realtime.channel('realtime.messages', 'acme'),
                    'acme', 'message', 'bulk', jsonb_build_object('n', g, 'pad', repeat('x', 100))
             from generate_series(1, {BACKLOG}) g;
             analyze realtime.outbox"
        ))
        .await
        .unwrap();
    let url = gw.url(&format!("/v1/events/subscribe?topic=bulk&apikey={}", keys[0]));
    // Warm up (pool connections, allocator arenas) before the baseline.
    let warm = gw.http.get(&url).header("last-event-id", &from).send().await.unwrap();
    read_consecutive(warm, seq(&from) + 1, 10_000).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = rss_bytes(gw.pid());

    let mut clients = Vec::new();
    let first = seq(&from) + 1;
    for _ in 0..50 {
        let request = gw.http.get(&url).header("last-event-id", &from);
        clients.push(tokio::spawn(async move {
            read_consecutive(request.send().await.unwrap(), first, 20_000).await
        }));
    }
    let pid = gw.pid();
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        for _ in 0..40 {
            peak = peak.max(rss_bytes(pid));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        peak
    });
    let mut slowest_first = Duration::ZERO;
    for client in clients {
        let (read, first) = client.await.unwrap();
        assert_eq!(read, 20_000);
        slowest_first = slowest_first.max(first);
    }
    let peak = sampler.await.unwrap().max(rss_bytes(pid));
    let growth = peak.saturating_sub(baseline);
    println!(
        "50 resumes of {BACKLOG} events: slowest first event after {slowest_first:?}, RSS {} MiB -> peak {} MiB",
        baseline >> 20,
        peak >> 20
    );
    // Loaded whole, one backlog is ~150 MB of JSON; 50 of them would be gigabytes. Paged, the
    // gateway holds one page per client plus socket buffers.
    assert!(growth < 150 << 20, "RSS grew by {} MiB", growth >> 20);
    assert!(slowest_first < Duration::from_secs(5), "first event after {slowest_first:?}");

    // One client reads on across 400 pages: every event once, in order (the ids are checked
    // to follow each other). All million take ~30 s on a debug build: too long for CI.
    let all = gw.http.get(&url).header("last-event-id", &from).send().await.unwrap();
    let (read, _) = read_consecutive(all, first, 200_000).await;
    assert_eq!(read, 200_000);
}

/// The backend of the gateway that holds the sequencer lock (what a standby waits for).
async fn sequencer_backends(db: &TestDb) -> i64 {
    db.client
        .query_one(
            "select count(*) from pg_stat_activity
             where datname = current_database() and application_name = 'changegate-sequencer'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// One gateway of two numbers the outbox; when it dies mid-write the other takes over within a
/// second, and a subscriber on the survivor gets every row once, in order.
#[tokio::test]
async fn killing_the_sequencing_gateway_mid_write_hands_over_and_loses_nothing() {
    let db = TestDb::new().await;
    let keys = db.setup(&["acme"], "anon");
    db.todos().await;
    let leader = db.gateway(&[]).await;
    let standby = db.gateway(&[]).await;
    // Both have a sequencer session; one holds the lock, the other waits.
    eventually("two sequencer sessions", || async {
        let n = sequencer_backends(&db).await;
        if n == 2 { Ok(()) } else { Err(format!("{n}")) }
    })
    .await;
    let mut sse = standby.sse(&collection_path("todos", &keys[0]), &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writing = writer(&db, stop.clone());
    let mut received = titles(&mut sse, 20).await;
    // SIGKILL: no goodbye, the lock goes only when PostgreSQL sees the connection die.
    let killed_at = tokio::time::Instant::now();
    std::process::Command::new("kill").args(["-9", &leader.pid().to_string()]).status().unwrap();
    let more = titles(&mut sse, 1).await;
    let handed_over = killed_at.elapsed();
    received.extend(more);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let written = writing.await.unwrap();
    received.extend(titles(&mut sse, written - received.len()).await);
    let expected: Vec<String> = (1..=written).map(|n| n.to_string()).collect();
    assert_eq!(received.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>(), expected);
    sse.assert_quiet(Duration::from_millis(300)).await;
    assert!(handed_over < Duration::from_secs(2), "the standby took over in {handed_over:?}");
}

/// Delivery never waits for transactions that did not write to the outbox: a session left idle
/// in a transaction on another table (holding back the database's xmin horizon) changes nothing.
#[tokio::test]
async fn a_transaction_left_open_on_another_table_does_not_hold_back_delivery() {
    let db = TestDb::new().await;
    let keys = db.setup(&["acme"], "anon");
    db.todos().await;
    let gw = db.gateway(&[]).await;
    let mut sse = gw.sse(&collection_path("todos", &keys[0]), &[]).await;
    let idle = db.connect().await;
    idle.batch_execute("create table report (n int); begin; insert into report values (1)").await.unwrap();
    for n in 1..=3 {
        db.client
            .execute("insert into todos (tenant_id, title) values ('acme', $1)", &[&n.to_string()])
            .await
            .unwrap();
    }
    let received =
        tokio::time::timeout(Duration::from_secs(2), titles(&mut sse, 3)).await.expect("delivered");
    assert_eq!(received.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(), ["1", "2", "3"]);
    // And a captured transaction left open holds back only its own row.
    idle.batch_execute("insert into todos (tenant_id, title) values ('acme', 'late')").await.unwrap();
    db.client.execute("insert into todos (tenant_id, title) values ('acme', '4')", &[]).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(2), titles(&mut sse, 1)).await.expect("delivered");
    assert_eq!(next[0].1, "4");
    idle.batch_execute("commit").await.unwrap();
    assert_eq!(titles(&mut sse, 1).await[0].1, "late");
    sse.assert_quiet(Duration::from_millis(300)).await;
}

/// Many writers, transactions of random length held open for random times, subscribers that
/// drop and resume at random points: every subscriber sees the same sequence, each row exactly
/// once, and a transaction that began after another committed comes after it.
#[tokio::test]
async fn randomized_concurrent_transactions_arrive_once_in_one_order_consistent_with_commits() {
    let db = TestDb::new().await;
    let keys = db.setup(&["acme"], "anon");
    db.todos().await;
    let gw = db.gateway(&[]).await;
    let path = collection_path("todos", &keys[0]);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    println!("seed {seed}");
    // A small xorshift: the test needs variety, not quality.
    let random = move |state: &mut u64, below: u64| {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state % below
    };
    let steady = gw.sse(&path, &[]).await;
    let resumer = gw.sse(&path, &[]).await;
    let started = tokio::time::Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..6_u64 {
        let client = db.connect().await;
        let mut state = seed.wrapping_add(w.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
        writers.spawn(async move {
            // (rows, began, committed), times since `started`.
            let mut transactions = Vec::new();
            for t in 0..25 {
                let rows = 1 + random(&mut state, 4);
                let began = started.elapsed();
                client.batch_execute("begin").await.unwrap();
                let mut titles = Vec::new();
                for r in 0..rows {
                    let title = format!("w{w}-t{t}-r{r}");
                    client
                        .execute("insert into todos (tenant_id, title) values ('acme', $1)", &[&title])
                        .await
                        .unwrap();
                    titles.push(title);
                    tokio::time::sleep(Duration::from_millis(random(&mut state, 4))).await;
                }
                client.batch_execute("commit").await.unwrap();
                transactions.push((titles, began, started.elapsed()));
            }
            transactions
        });
    }
    // The resumer drops its stream at random points and resumes from the last id it saw,
    // until it has as many rows as the writers committed (known once they are done).
    let (total_tx, total_rx) = tokio::sync::watch::channel(usize::MAX);
    let resuming = {
        let (gw, path) = (&gw, path.clone());
        let mut state = seed | 1;
        async move {
            let mut sse = resumer;
            let mut seen: Vec<(String, String)> = Vec::new();
            let mut total_rx = total_rx;
            loop {
                for _ in 0..1 + random(&mut state, 40) {
                    if seen.len() >= *total_rx.borrow_and_update() {
                        return seen;
                    }
                    // Wakes for a row, or once for the total becoming known (then nothing was
                    // arriving: every row committed so far had been read).
                    tokio::select! {
                        row = titles(&mut sse, 1) => seen.extend(row),
                        _ = total_rx.changed() => {}
                    }
                }
                let last = seen.last().map(|(id, _)| id.clone());
                let headers: Vec<(&str, &str)> =
                    last.iter().map(|id| ("last-event-id", id.as_str())).collect();
                sse = gw.sse(&path, &headers).await;
            }
        }
    };
    let committing = async {
        let mut transactions = Vec::new();
        while let Some(done) = writers.join_next().await {
            transactions.extend(done.unwrap());
        }
        let total: usize = transactions.iter().map(|(rows, _, _): &(Vec<String>, _, _)| rows.len()).sum();
        total_tx.send_replace(total);
        (transactions, total)
    };
    let (resumer_seen, (transactions, total)) = tokio::join!(resuming, committing);
    let mut steady = steady;
    let steady_seen = titles(&mut steady, total).await;
    // Same order, same ids, on both; each row once.
    assert_eq!(resumer_seen, steady_seen, "seed {seed}");
    let order: Vec<&str> = steady_seen.iter().map(|(_, t)| t.as_str()).collect();
    let mut unique = order.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), total, "every row exactly once (seed {seed})");
    // Commit order: if B began after A committed, all of A comes before any of B.
    let place: std::collections::HashMap<&str, usize> =
        order.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    for (a_rows, _, a_committed) in &transactions {
        for (b_rows, b_began, _) in &transactions {
            if b_began > a_committed {
                let a_last = a_rows.iter().map(|t| place[t.as_str()]).max().unwrap();
                let b_first = b_rows.iter().map(|t| place[t.as_str()]).min().unwrap();
                assert!(a_last < b_first, "{a_rows:?} committed before {b_rows:?} began (seed {seed})");
            }
        }
    }
    steady.assert_quiet(Duration::from_millis(300)).await;
}

/// The row cap is per channel: a tenant writing far past it loses its own oldest history (its
/// stale client gets `reset`), while a quiet tenant's history is untouched and replays.
#[tokio::test]
async fn a_noisy_tenant_cannot_evict_another_tenants_history() {
    let db = TestDb::new().await;
    let keys = db.setup(&["acme", "beta"], "anon");
    db.todos().await;
    let gw = db.gateway(&["--outbox-max-rows-per-channel", "5", "--prune-every", "100ms"]).await;
    let mut quiet = gw.sse(&collection_path("todos", &keys[1]), &[]).await;
    let mut noisy = gw.sse(&collection_path("todos", &keys[0]), &[]).await;
    for n in 0..3 {
        db.client
            .execute("insert into todos (tenant_id, title) values ('beta', $1)", &[&format!("b{n}")])
            .await
            .unwrap();
    }
    let beta_seen = titles(&mut quiet, 3).await;
    for n in 0..40 {
        db.client
            .execute("insert into todos (tenant_id, title) values ('acme', $1)", &[&format!("a{n}")])
            .await
            .unwrap();
    }
    let acme_seen = titles(&mut noisy, 40).await;
    eventually("retention trimmed the noisy channel", || async {
        let rows: i64 = db
            .client
            .query_one(
                "select count(*) from realtime.outbox o join realtime.channel_rows c using (channel)",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if rows <= 5 + 3 { Ok(()) } else { Err(format!("{rows} rows")) }
    })
    .await;
    // The quiet tenant resumes from its first event: nothing of its history went.
    let mut resumed =
        gw.sse(&collection_path("todos", &keys[1]), &[("last-event-id", &beta_seen[0].0)]).await;
    assert_eq!(titles(&mut resumed, 2).await, beta_seen[1..].to_vec());
    resumed.assert_quiet(Duration::from_millis(300)).await;
    // The noisy one's stale client is told to refetch; a recent position still replays.
    let mut stale = gw.sse(&collection_path("todos", &keys[0]), &[("last-event-id", &acme_seen[0].0)]).await;
    assert_eq!(stale.next_event().await.event(), Some("reset"));
    let mut recent =
        gw.sse(&collection_path("todos", &keys[0]), &[("last-event-id", &acme_seen[36].0)]).await;
    assert_eq!(titles(&mut recent, 3).await, acme_seen[37..].to_vec());
}
