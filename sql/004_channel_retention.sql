-- Retention per channel (issue #13): a row cap per channel instead of one for the whole outbox,
-- so one tenant writing flat out can no longer evict every other tenant's history (and send
-- their resuming clients `reset`). Rows are counted per channel as they are numbered, so the
-- prune finds the channels over their cap without counting or OFFSET-scanning the outbox.

create table if not exists realtime.channel_rows (
    channel text primary key,
    rows    bigint not null
);

insert into realtime.channel_rows (channel, rows)
select channel, count(*) from realtime.outbox where seq is not null group by channel
on conflict (channel) do update set rows = excluded.rows;

-- The sequencer's pass, now also counting what it numbered per channel.
create or replace function realtime.sequence_batch(batch integer) returns integer
    language plpgsql
    as $$
declare
    r realtime.outbox;
    numbered bigint[] := '{}';
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
        numbered := numbered || r.id;
    end loop;
    insert into realtime.channel_rows (channel, rows)
    select channel, count(*) from realtime.outbox where id = any(numbered) group by channel
    on conflict (channel) do update set rows = realtime.channel_rows.rows + excluded.rows;
    return cardinality(numbered);
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
