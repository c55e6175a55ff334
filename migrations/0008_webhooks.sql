-- Webhooks: tenants' endpoints, and one delivery per (event, endpoint).
--
-- Deliveries come from the event log: a dispatcher (any replica, one at a
-- time: it holds the row of bss.webhook_state) reads sequenced events after
-- `dispatched_seq` and writes a pending delivery for each matching, enabled
-- endpoint, moving `dispatched_seq` in the same transaction, so an event is
-- matched exactly once and a crash loses nothing. Every replica then works
-- due deliveries under a lease (`FOR UPDATE SKIP LOCKED`): a delivery is in
-- flight in one place at a time, and a dead replica's leases run out.
CREATE TABLE bss.webhooks (
    id                  uuid PRIMARY KEY,
    tenant_id           text NOT NULL REFERENCES bss.tenants (id) ON DELETE CASCADE,
    url                 text NOT NULL,
    events              text[] NOT NULL,
    -- NULL: every resource.
    resources           text[],
    transformer         text,
    description         text NOT NULL DEFAULT '',
    fifo                boolean NOT NULL DEFAULT false,
    rate_limit_per_sec  integer,
    enabled             boolean NOT NULL DEFAULT true,
    disabled_reason     text,
    -- {"current", "previous"?, "previousUntil"?}, the secrets sealed with
    -- the tenant's data-encryption key (never stored in clear).
    secrets             jsonb NOT NULL,
    -- Since when every attempt has failed (NULL after a success).
    failing_since       timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhooks_by_tenant ON bss.webhooks (tenant_id, id);

CREATE TABLE bss.webhook_deliveries (
    id               uuid PRIMARY KEY,
    tenant_id        text NOT NULL,
    webhook_id       uuid NOT NULL REFERENCES bss.webhooks (id) ON DELETE CASCADE,
    event_seq        bigint NOT NULL,
    event_id         uuid NOT NULL,
    event_type       text NOT NULL,
    event_time       timestamptz NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'succeeded', 'failed', 'cancelled')),
    -- Attempts in all; `step`: attempts since the delivery was last
    -- (re)queued, its place in the retry schedule.
    attempts         integer NOT NULL DEFAULT 0,
    step             integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    leased_until     timestamptz,
    lease            uuid,
    last_status_code integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- One delivery per event and endpoint (a log position is one event);
    -- also the delivery log's order.
    UNIQUE (webhook_id, event_seq)
);
-- The claim's order (longest-due first, then log order), read from the index
-- with its limit: a claim never sorts an endpoint's backlog.
CREATE INDEX webhook_deliveries_due ON bss.webhook_deliveries (webhook_id, next_attempt_at, event_seq)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_head ON bss.webhook_deliveries (webhook_id, event_seq)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_finished ON bss.webhook_deliveries (updated_at)
    WHERE status <> 'pending';

CREATE TABLE bss.webhook_attempts (
    delivery_id  uuid NOT NULL REFERENCES bss.webhook_deliveries (id) ON DELETE CASCADE,
    n            integer NOT NULL,
    at           timestamptz NOT NULL,
    duration_ms  integer NOT NULL,
    status_code  integer,
    -- The start of the answer's body (at most 20 kB).
    response     text,
    -- timeout, connect, refused-address, redirect, status, body, request,
    -- transformer, event-gone.
    error_kind   text,
    error        text,
    PRIMARY KEY (delivery_id, n)
);

-- Everything up to dispatched_seq has been matched against the endpoints.
CREATE TABLE bss.webhook_state (
    id              integer PRIMARY KEY CHECK (id = 1),
    dispatched_seq  bigint NOT NULL
);
INSERT INTO bss.webhook_state (id, dispatched_seq)
SELECT 1, coalesce(max(seq), 0) FROM bss.outbox;
