-- The transactional outbox and the tenants' event log, in one table.
--
-- Writers insert a row in the same transaction as the change. The relay
-- leader then (1) sequences committed rows: `seq` is the position in the
-- event log, assigned in `id` order, so readers that follow `seq` never miss
-- an event that committed late; and (2) publishes sequenced rows to the
-- broker in `seq` order, moving `bss.relay_state.published_seq` only after
-- the broker acknowledged them (one row updated per batch, not one per
-- event). Rows stay as the replayable log until retention.
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
    sequenced_at  timestamptz
);

CREATE INDEX outbox_unsequenced ON bss.outbox (id) WHERE seq IS NULL;
CREATE INDEX outbox_log ON bss.outbox (tenant_id, seq) WHERE seq IS NOT NULL;

-- Everything up to published_seq has been acknowledged by the broker.
CREATE TABLE bss.relay_state (
    id             integer PRIMARY KEY CHECK (id = 1),
    published_seq  bigint NOT NULL DEFAULT 0,
    published_at   timestamptz
);
INSERT INTO bss.relay_state (id) VALUES (1);
