-- Capture without a lock in the user's commit, and retention per channel (issue #13).
--
-- Before: every captured commit took a per-channel advisory lock held through its fsync,
-- UPDATEd its own outbox rows and called pg_notify — and PostgreSQL serialises every commit
-- with a pending NOTIFY behind one instance-wide lock. Captured single-row commits ran at
-- 15 % of plain ones, and one hot tenant slowed every other tenant's commits by a third.
--
-- Now a writer only appends its outbox row (`seq` null). The sequencer — one per database,
-- run by whichever gateway holds its session advisory lock — numbers the rows of committed
-- transactions in batches, after the fact, and sends their NOTIFYs from its own transaction:
-- only it pays the NOTIFY lock, once per batch.
--
-- Order: rows of a transaction still in flight are invisible to the sequencer and are numbered
-- in a later pass, after everything that committed before them. Within one pass rows are
-- numbered by transaction id, then insert order: if one transaction began after another
-- committed, its id is the larger and it is numbered later. Nothing waits on the database's
-- xmin horizon: a long transaction elsewhere holds nothing back, and one that writes to the
-- outbox holds back only its own rows.

-- Rows committed under the old trigger are already numbered; queued ones now wait for the
-- sequencer. (The commit trigger can fire for no transaction after this: the table goes.)
drop trigger if exists realtime_sequence on realtime.commit_hook;
drop function if exists realtime.sequence();
drop table if exists realtime.commit_hook;

-- Queue one outbox row in the current transaction: an append, nothing else.
create or replace function realtime.enqueue(
    p_channel text, p_tenant text, p_kind text, p_collection text, p_topic text,
    p_op text, p_document_id text, p_payload jsonb
) returns bigint
    language sql
    as $$
    insert into realtime.outbox (channel, tenant, kind, collection, topic, op, document_id, payload)
    values (p_channel, p_tenant, p_kind, p_collection, p_topic, p_op, p_document_id, p_payload)
    returning id
$$;

-- The sequencer's scan, in its order.
create index if not exists outbox_pending_order on realtime.outbox (xid, id) where seq is null;
drop index if exists realtime.outbox_pending;

-- Retention per channel: a row cap per channel instead of one for the whole outbox, so one
-- tenant writing flat out can no longer evict every other tenant's history (and send their
-- resuming clients `reset`). Rows are counted per channel as they are numbered, so the prune
-- finds the channels over their cap without counting or OFFSET-scanning the outbox.
create table if not exists realtime.channel_rows (
    channel text primary key,
    rows    bigint not null
);

insert into realtime.channel_rows (channel, rows)
select channel, count(*) from realtime.outbox where seq is not null group by channel
on conflict (channel) do update set rows = excluded.rows;

-- One pass of the sequencer: number up to `batch` rows of committed transactions (in
-- transaction-id, then insert order), stamp their commit time, NOTIFY each, count them per
-- channel, and say how many. Run by one session at a time (the gateway holding the lock).
create or replace function realtime.sequence_batch(batch integer) returns integer
    language plpgsql
    as $$
declare
    r realtime.outbox;
    -- The channel of every row numbered (counted from this array: re-reading the rows by id
    -- cost a third of the writers' throughput).
    channels text[] := '{}';
begin
    for r in
        select * from realtime.outbox
        where seq is null
        order by xid, id
        limit batch
    loop
        update realtime.outbox
        set seq = nextval('realtime.outbox_seq'), committed_at = clock_timestamp()
        where id = r.id
        returning * into r;
        perform pg_notify(r.channel, realtime.payload(r));
        channels := channels || r.channel;
    end loop;
    insert into realtime.channel_rows (channel, rows)
    select c, count(*) from unnest(channels) as c group by c
    on conflict (channel) do update set rows = realtime.channel_rows.rows + excluded.rows;
    return cardinality(channels);
end
$$;

-- Published messages are numbered at once (their id is the answer); count them the same way.
create or replace function realtime.publish(p_tenant text, p_topic text, p_data jsonb)
    returns bigint
    language plpgsql
    as $$
declare
    ch text := realtime.channel('realtime.messages', p_tenant);
    r realtime.outbox;
begin
    perform pg_advisory_xact_lock(hashtextextended(ch, 0));
    insert into realtime.outbox (seq, channel, tenant, kind, topic, payload)
    values (nextval('realtime.outbox_seq'), ch, p_tenant, 'message', p_topic, p_data)
    returning * into r;
    insert into realtime.channel_rows (channel, rows) values (ch, 1)
    on conflict (channel) do update set rows = realtime.channel_rows.rows + 1;
    perform pg_notify(ch, realtime.payload(r));
    return r.seq;
end
$$;
