-- Writers append to a narrow queue; the sequencer moves committed rows into the numbered log
-- in one set-based statement and NOTIFYs each channel once per pass (issue #13).
--
-- Before: a writer's row went straight into `realtime.outbox` — five index entries (id, seq,
-- channel+seq, commit time, the pending index) — and the sequencer then UPDATEd it row by row
-- in a plpgsql loop (a new tuple and four more index entries each, since `seq` is indexed),
-- sending one NOTIFY per row. Now a writer's row costs one heap tuple and one index entry
-- (`queue_order`); the sequencer deletes a batch from the queue and inserts it, numbered, into
-- the outbox with one statement, and sends one NOTIFY per channel per pass: the rows themselves
-- when they fit comfortably in PostgreSQL's 8000-byte limit, else a reference to the range
-- the gateway reads with one keyset query.
--
-- Order is unchanged: rows of a transaction still in flight are invisible to the sequencer and
-- wait for a later pass; within a pass rows are numbered by transaction id, then insert order.
-- A row keeps its `id` (and transaction id) from queue to outbox.

create table if not exists realtime.queue (
    id          bigint not null default nextval('realtime.outbox_id_seq'),
    xid         xid8 not null default pg_current_xact_id(),
    channel     text not null,
    tenant      text not null,
    kind        text not null check (kind in ('change', 'message', 'reset', 'flag', 'config')),
    collection  text,
    topic       text,
    op          text check (op in ('insert', 'update', 'delete')),
    document_id text,
    payload     jsonb not null default 'null'
);
-- The sequencer's scan, in its order; the only index a writer pays for.
create index if not exists queue_order on realtime.queue (xid, id);
-- Every row is deleted within milliseconds: vacuum by dead-row count, not by table size, so
-- the sequencer's scan never wades through a long tail of dead rows.
alter table realtime.queue set (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
                                autovacuum_vacuum_cost_delay = 0);

-- Rows queued under the previous version (appended, not yet numbered) move to the queue.
with pending as (
    delete from realtime.outbox where seq is null
    returning id, xid, channel, tenant, kind, collection, topic, op, document_id, payload
)
insert into realtime.queue (id, xid, channel, tenant, kind, collection, topic, op, document_id, payload)
select * from pending;
drop index if exists realtime.outbox_pending_order;

-- Queue one outbox row in the current transaction: an append, nothing else.
create or replace function realtime.enqueue(
    p_channel text, p_tenant text, p_kind text, p_collection text, p_topic text,
    p_op text, p_document_id text, p_payload jsonb
) returns bigint
    language sql
    as $$
    insert into realtime.queue (channel, tenant, kind, collection, topic, op, document_id, payload)
    values (p_channel, p_tenant, p_kind, p_collection, p_topic, p_op, p_document_id, p_payload)
    returning id
$$;

-- The row trigger on every realtime table (as in 001, but appending to the queue itself: a
-- plpgsql statement's plan is cached, while `perform realtime.enqueue(…)` — an SQL function —
-- was planned again for every row, which cost a fifth of the writers' commit rate).
create or replace function realtime.capture() returns trigger
    language plpgsql
    as $$
declare
    doc jsonb;
    tenant text;
    key_columns text[] := TG_ARGV[2:];
    document_id text;
begin
    if TG_OP = 'DELETE' then
        doc := to_jsonb(OLD);
    else
        doc := to_jsonb(NEW);
    end if;
    tenant := doc ->> TG_ARGV[1];
    if tenant is null then
        return null;
    end if;
    if array_length(key_columns, 1) = 1 then
        document_id := doc ->> key_columns[1];
    else
        select jsonb_agg(doc -> c order by ord)::text into document_id
        from unnest(key_columns) with ordinality as k(c, ord);
    end if;
    insert into realtime.queue (channel, tenant, kind, collection, op, document_id, payload)
    values (realtime.channel(TG_ARGV[0], tenant), tenant, 'change', TG_ARGV[0], lower(TG_OP), document_id, doc);
    return null;
end
$$;

-- The NOTIFY payload for one channel's rows of a pass: a JSON array of the rows (as
-- `realtime.row_json` renders them) when it fits in 7000 bytes, else (or when the rows were
-- not rendered, `p_rows` empty: they could not fit) a reference
-- `{"tenant","ref":true,"from","through"}` to read with one keyset query. Never over the limit.
create or replace function realtime.batch_payload(
    p_tenant text, p_from bigint, p_through bigint, p_rows text[]
) returns text
    language plpgsql immutable
    as $$
declare
    rows_text text;
begin
    if cardinality(p_rows) > 0 then
        rows_text := '[' || array_to_string(p_rows, ',') || ']';
        if octet_length(rows_text) <= 7000 then
            return rows_text;
        end if;
    end if;
    return jsonb_build_object('tenant', p_tenant, 'ref', true, 'from', p_from, 'through', p_through)::text;
end
$$;

-- One pass of the sequencer: move up to `batch` rows of committed transactions from the queue
-- into the outbox, numbered in transaction-id then insert order and stamped with their commit
-- time; count them per channel; NOTIFY each channel once. Returns how many rows it numbered.
-- Run by one session at a time (the gateway holding the sequencer's lock). plpgsql, not sql:
-- an SQL function's statement is planned again on every call (0.7 ms, most of an empty pass),
-- plpgsql keeps the plan. One statement: the
-- queue has no key but its order, so rows are taken by `ctid`; `nextval` in the select list is
-- evaluated after its ORDER BY (PostgreSQL computes volatile output expressions above the sort).
create or replace function realtime.sequence_batch(batch integer) returns integer
    language plpgsql
    as $$
declare
    numbered integer;
begin
    with taken as (
        delete from realtime.queue q
        where q.ctid = any (array(select ctid from realtime.queue order by xid, id limit batch))
        returning q.*
    ), numbered_rows as (
        insert into realtime.outbox
            (seq, id, xid, channel, tenant, kind, collection, topic, op, document_id, payload, committed_at)
        select nextval('realtime.outbox_seq'), id, xid, channel, tenant, kind, collection, topic, op,
               document_id, payload, clock_timestamp()
        from taken
        order by xid, id
        returning *
    ), counted as (
        insert into realtime.channel_rows (channel, rows)
        select channel, count(*) from numbered_rows group by channel
        on conflict (channel) do update set rows = realtime.channel_rows.rows + excluded.rows
    ),
    -- A channel's rows are rendered (`realtime.row_json`, the costliest step of a pass) only
    -- when they may fit in the payload: under load a channel's batch is a reference anyway,
    -- and its readers render the rows themselves. `est` over-estimates the text by the
    -- fixed fields; `batch_payload` checks the real size.
    sized as (
        select o.*, sum(pg_column_size(o.payload) + 200) over (partition by o.channel) as est
        from numbered_rows o
    )
    -- `0 * count(pg_notify(…))`: the NOTIFYs are sent as the groups are aggregated.
    select coalesce(sum(n), 0)::integer + 0 * count(pg_notify(channel, realtime.batch_payload(tenant, first, last, rows)))
    from (
        select channel, min(tenant) as tenant, min(seq) as first, max(seq) as last, count(*) as n,
               coalesce(array_agg(realtime.row_json(
                   row(id, seq, xid, channel, tenant, kind, collection, topic, op, document_id, payload,
                       committed_at)::realtime.outbox) order by seq) filter (where est <= 7000),
                   '{}') as rows
        from sized
        group by channel
    ) per_channel
    into numbered;
    return numbered;
end
$$;

-- A published message goes the same way as a captured change: queued, numbered after its
-- commit by the sequencer, NOTIFYed in its batch. Returns the row's id (its `seq`, the SSE id,
-- is given when the sequencer numbers it: `select seq from realtime.outbox where id = …`).
create or replace function realtime.publish(p_tenant text, p_topic text, p_data jsonb)
    returns bigint
    language sql
    as $$
    select realtime.enqueue(realtime.channel('realtime.messages', p_tenant), p_tenant, 'message', null,
                            p_topic, null, null, p_data)
$$;
