-- The transactional outbox and the tenants' event log, in one table.
--
-- Writers insert a row in the same transaction as the change. The relay
-- leader then (1) sequences committed rows: `seq` is the position in the
-- event log, assigned in `id` order, so readers that follow `seq` never miss
-- an event that committed late; and (2) publishes sequenced rows to the
-- broker in `seq` order, setting `published_at` only after the broker
-- acknowledged them. Rows stay as the replayable log until retention.
CREATE TABLE bss.outbox (
    id            bigserial PRIMARY KEY,
    event_id      uuid NOT NULL UNIQUE,
    tenant_id     text NOT NULL,
    resource      text NOT NULL,
    type          text NOT NULL,
    kafka_key     text NOT NULL,
    envelope      jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    seq           bigint UNIQUE,
    sequenced_at  timestamptz,
    published_at  timestamptz
);

CREATE INDEX outbox_unsequenced ON bss.outbox (id) WHERE seq IS NULL;
CREATE INDEX outbox_unpublished ON bss.outbox (seq) WHERE seq IS NOT NULL AND published_at IS NULL;
CREATE INDEX outbox_log ON bss.outbox (tenant_id, seq) WHERE seq IS NOT NULL;

-- Wakes the relay (on any replica) as soon as a write commits.
CREATE FUNCTION bss.outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bss_outbox', '');
    RETURN NULL;
END $$;

CREATE TRIGGER outbox_notify AFTER INSERT ON bss.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION bss.outbox_notify();
