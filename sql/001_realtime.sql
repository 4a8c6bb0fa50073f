-- changegate: schema `realtime` — tenants, keys, the outbox, and the capture trigger.
-- Idempotent: every statement can run again on a database that already has it.

create schema if not exists realtime;

-- One row: the epoch of this database's log. Positions (SSE ids) carry it, so an id from
-- another database is recognised and answered with a `reset`.
create table if not exists realtime.meta (
    singleton boolean primary key default true check (singleton),
    epoch     bigint  not null check (epoch >= 0 and epoch < 4294967296)
);
insert into realtime.meta (epoch)
values (floor(random() * 4294967296)::bigint)
on conflict do nothing;

create table if not exists realtime.tenants (
    id         text primary key check (id ~ '^[A-Za-z0-9_.-]{1,128}$'),
    created_at timestamptz not null default now()
);

create table if not exists realtime.environments (
    tenant     text not null references realtime.tenants (id) on delete cascade,
    name       text not null check (name ~ '^[A-Za-z0-9_.-]{1,128}$'),
    created_at timestamptz not null default now(),
    primary key (tenant, name)
);

-- Keys are stored as SHA-256 hashes only; `prefix` is a short non-secret display form.
create table if not exists realtime.api_keys (
    id          text primary key,
    tenant      text not null references realtime.tenants (id) on delete cascade,
    environment text,
    scope       text not null check (scope in ('anon', 'sdk', 'stream', 'publish', 'service')),
    hash        bytea not null unique check (octet_length(hash) = 32),
    prefix      text not null,
    created_at  timestamptz not null default now(),
    revoked_at  timestamptz,
    foreign key (tenant, environment) references realtime.environments (tenant, name)
);

-- The outbox: every captured change and published message, in commit order per channel.
-- `id` is taken at insert time; `seq` is taken at commit time, under a per-channel lock, so
-- that per channel `seq` order IS commit order and a reader of `seq > last` never misses a
-- late-committing transaction.
create sequence if not exists realtime.outbox_seq;
create table if not exists realtime.outbox (
    id           bigserial primary key,
    seq          bigint unique,
    xid          xid8 not null default pg_current_xact_id(),
    channel      text not null,
    tenant       text not null,
    kind         text not null check (kind in ('change', 'message', 'reset')),
    collection   text,
    topic        text,
    op           text check (op in ('insert', 'update', 'delete')),
    document_id  text,
    payload      jsonb not null default 'null',
    committed_at timestamptz not null default clock_timestamp()
);
create index if not exists outbox_channel_seq on realtime.outbox (channel, seq);
create index if not exists outbox_pending on realtime.outbox (xid) where seq is null;
create index if not exists outbox_committed_at on realtime.outbox (committed_at);

-- Per channel: the highest `seq` removed by retention. A client resuming from below it gets
-- a `reset`: events it never saw are gone.
create table if not exists realtime.horizon (
    channel        text primary key,
    pruned_through bigint not null
);

-- Which tables are captured, with the tenant column and the primary key.
create table if not exists realtime.enabled_tables (
    relid         oid primary key,
    name          text not null unique,
    tenant_column text not null,
    key_columns   text[] not null
);

-- A marker row per transaction that wrote to the outbox; its deferred trigger sequences the
-- transaction's outbox rows at commit.
create table if not exists realtime.commit_hook (
    xid xid8 primary key
);

-- 'flc_rt_' || md5('<schema>.<table>:<tenant>'), e.g. realtime.channel('public.todos', 'acme')
-- = 'flc_rt_' || md5('public.todos:acme'). Published messages use the name 'realtime.messages'.
create or replace function realtime.channel(relation text, tenant text) returns text
    language sql immutable strict
    as $$ select 'flc_rt_' || md5(relation || ':' || tenant) $$;

-- One outbox row as the JSON the gateway reads, from NOTIFY payloads and from replay alike.
create or replace function realtime.row_json(r realtime.outbox) returns text
    language sql stable
    as $$
    select jsonb_build_object(
        'seq', r.seq, 'tenant', r.tenant, 'kind', r.kind, 'collection', r.collection,
        'topic', r.topic, 'op', r.op, 'document_id', r.document_id, 'payload', r.payload,
        'at', floor(extract(epoch from r.committed_at) * 1000)::bigint)::text
$$;

-- The NOTIFY payload for one sequenced outbox row: the whole row when it fits comfortably in
-- PostgreSQL's 8000-byte limit, otherwise a reference the gateway resolves from the outbox.
-- Either way the user's transaction never fails because a row is big.
create or replace function realtime.payload(r realtime.outbox) returns text
    language plpgsql stable
    as $$
declare
    full_text text := realtime.row_json(r);
begin
    if octet_length(full_text) <= 7000 then
        return full_text;
    end if;
    return jsonb_build_object('seq', r.seq, 'tenant', r.tenant, 'ref', true)::text;
end
$$;

-- Runs at commit (deferred): lock every channel this transaction wrote, in one global order so
-- two transactions never wait on each other crosswise, then number the rows and notify. The
-- locks are held until the commit completes, so a later `seq` of a channel is never visible
-- before an earlier one.
create or replace function realtime.sequence() returns trigger
    language plpgsql
    as $$
declare
    lock_key bigint;
    r realtime.outbox;
begin
    for lock_key in
        select distinct hashtextextended(channel, 0) as k
        from realtime.outbox
        where xid = pg_current_xact_id() and seq is null
        order by k
    loop
        perform pg_advisory_xact_lock(lock_key);
    end loop;
    for r in
        select * from realtime.outbox
        where xid = pg_current_xact_id() and seq is null
        order by id
    loop
        update realtime.outbox
        set seq = nextval('realtime.outbox_seq'), committed_at = clock_timestamp()
        where id = r.id
        returning * into r;
        perform pg_notify(r.channel, realtime.payload(r));
    end loop;
    delete from realtime.commit_hook where xid = pg_current_xact_id();
    return null;
end
$$;

do $$
begin
    if not exists (select 1 from pg_trigger where tgname = 'realtime_sequence'
                   and tgrelid = 'realtime.commit_hook'::regclass) then
        create constraint trigger realtime_sequence
            after insert on realtime.commit_hook
            deferrable initially deferred
            for each row execute function realtime.sequence();
    end if;
end
$$;

-- Queue one outbox row in the current transaction (sequenced at commit).
create or replace function realtime.enqueue(
    p_channel text, p_tenant text, p_kind text, p_collection text, p_topic text,
    p_op text, p_document_id text, p_payload jsonb
) returns bigint
    language plpgsql
    as $$
declare
    new_id bigint;
begin
    insert into realtime.outbox (channel, tenant, kind, collection, topic, op, document_id, payload)
    values (p_channel, p_tenant, p_kind, p_collection, p_topic, p_op, p_document_id, p_payload)
    returning id into new_id;
    insert into realtime.commit_hook (xid) values (pg_current_xact_id()) on conflict do nothing;
    return new_id;
end
$$;

-- The row trigger on every realtime table. TG_ARGV: the table's name ('schema.table'), its
-- tenant column, then its primary-key columns. A row whose tenant is NULL is not published.
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
    perform realtime.enqueue(realtime.channel(TG_ARGV[0], tenant), tenant, 'change', TG_ARGV[0],
                             null, lower(TG_OP), document_id, doc);
    return null;
end
$$;

-- TRUNCATE removes rows without row triggers: every tenant that had rows gets a `reset`.
create or replace function realtime.capture_truncate() returns trigger
    language plpgsql
    as $$
declare
    tenant text;
begin
    for tenant in execute format('select distinct %I::text from %s where %I is not null',
                                 TG_ARGV[1], TG_RELID::regclass, TG_ARGV[1])
    loop
        perform realtime.enqueue(realtime.channel(TG_ARGV[0], tenant), tenant, 'reset', TG_ARGV[0],
                                 null, null, null, '{"reason":"truncated"}');
    end loop;
    return null;
end
$$;

-- select realtime.enable('public.todos', 'tenant_id'): capture a table. Needs a primary key.
create or replace function realtime.enable(relation regclass, tenant_column text default 'tenant_id')
    returns void
    language plpgsql
    as $$
declare
    name text;
    keys text[];
begin
    select n.nspname || '.' || c.relname into name
    from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where c.oid = relation;
    if not exists (select 1 from pg_attribute where attrelid = relation and attname = tenant_column
                   and attnum > 0 and not attisdropped) then
        raise exception 'table % has no column %', name, tenant_column using errcode = 'undefined_column';
    end if;
    select array_agg(a.attname::text order by k.ord) into keys
    from pg_index i
    cross join unnest(i.indkey) with ordinality as k(attnum, ord)
    join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
    where i.indrelid = relation and i.indisprimary;
    if keys is null then
        raise exception 'table % has no primary key; realtime needs one for documentId', name
            using errcode = 'invalid_table_definition';
    end if;
    execute format('drop trigger if exists realtime_capture on %s', relation);
    execute format('drop trigger if exists realtime_capture_truncate on %s', relation);
    execute format('create trigger realtime_capture after insert or update or delete on %s '
                   'for each row execute function realtime.capture(%L, %L, %s)',
                   relation, name, tenant_column,
                   (select string_agg(quote_literal(k), ', ') from unnest(keys) k));
    execute format('create trigger realtime_capture_truncate before truncate on %s '
                   'for each statement execute function realtime.capture_truncate(%L, %L)',
                   relation, name, tenant_column);
    insert into realtime.enabled_tables (relid, name, tenant_column, key_columns)
    values (relation, name, tenant_column, keys)
    on conflict (relid) do update
        set name = excluded.name, tenant_column = excluded.tenant_column, key_columns = excluded.key_columns;
end
$$;

-- select realtime.disable('public.todos'): stop capturing a table.
create or replace function realtime.disable(relation regclass) returns void
    language plpgsql
    as $$
begin
    execute format('drop trigger if exists realtime_capture on %s', relation);
    execute format('drop trigger if exists realtime_capture_truncate on %s', relation);
    delete from realtime.enabled_tables where relid = relation;
end
$$;

-- Publish an application message. It is numbered at once under the tenant's message-channel
-- lock (held until commit), so the caller learns its position; call it in its own transaction.
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
    perform pg_notify(ch, realtime.payload(r));
    return r.seq;
end
$$;
