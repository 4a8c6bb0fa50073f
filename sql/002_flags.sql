-- changegate: feature flags in schema `realtime`. Idempotent.

-- The outbox also carries flag and configuration events.
alter table realtime.outbox drop constraint if exists outbox_kind_check;
alter table realtime.outbox add constraint outbox_kind_check
    check (kind in ('change', 'message', 'reset', 'flag', 'config'));

-- One document per environment: its flags, segments and version tombstones, exactly as the
-- management API's state machine (crates/flags) reads and writes them.
create table if not exists realtime.flag_state (
    tenant      text not null,
    environment text not null,
    state       jsonb not null default '{}',
    primary key (tenant, environment),
    foreign key (tenant, environment) references realtime.environments (tenant, name) on delete cascade
);

-- A flag edited directly with SQL streams too: the API marks its own transactions
-- (`set local realtime.flag_api = 'on'`) and emits precise events itself; any other change to a
-- flag document is published here as flag.created / flag.updated / flag.deleted.
create or replace function realtime.capture_flags() returns trigger
    language plpgsql
    as $$
declare
    k text;
    old_flag jsonb;
    new_flag jsonb;
    kind text;
    version bigint;
begin
    if coalesce(current_setting('realtime.flag_api', true), '') = 'on' then
        return null;
    end if;
    for k in
        select jsonb_object_keys(coalesce(OLD.state -> 'flags', '{}'))
        union
        select jsonb_object_keys(coalesce(NEW.state -> 'flags', '{}'))
    loop
        old_flag := OLD.state -> 'flags' -> k;
        new_flag := NEW.state -> 'flags' -> k;
        continue when old_flag is not distinct from new_flag;
        if old_flag is null then
            kind := 'flag.created';
            version := coalesce((new_flag ->> 'version')::bigint, 1);
        elsif new_flag is null then
            kind := 'flag.deleted';
            version := coalesce((old_flag ->> 'version')::bigint, 0) + 1;
        else
            kind := 'flag.updated';
            version := coalesce((new_flag ->> 'version')::bigint, 0);
        end if;
        perform realtime.enqueue(realtime.channel('realtime.flags', NEW.tenant), NEW.tenant, 'flag', null, null,
                                 null, null,
                                 jsonb_build_object('environment', NEW.environment, 'type', kind, 'flag_key', k,
                                                    'version', version, 'flag', coalesce(new_flag, 'null'::jsonb)));
    end loop;
    return null;
end
$$;

drop trigger if exists realtime_capture_flags on realtime.flag_state;
create trigger realtime_capture_flags after update on realtime.flag_state
    for each row execute function realtime.capture_flags();
