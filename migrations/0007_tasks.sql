-- The durable task queue. A task is written in the same transaction as the
-- change that causes it (a schema change, a key rotation) or by an enricher
-- with its event, and is done exactly once per (tenant, idempotency key):
--   kind 'remote': handed to the Task Execution Service
--     (POST /api/task/schedule, `Idempotency-Key: <id>`), retried with
--     backoff until accepted; status pending → scheduled, or → failed
--     (parked) after task_max_attempts.
--   kind 'reseal': the built-in re-encryption job, run by the replicas
--     themselves under a lease, batch by batch; `progress` is saved with
--     each batch, so a killed replica's job resumes where it stopped.
--     status pending → running → done, or → failed.
CREATE TABLE bss.tasks (
    id               uuid PRIMARY KEY,
    tenant_id        text NOT NULL REFERENCES bss.tenants (id) ON DELETE CASCADE,
    kind             text NOT NULL CHECK (kind IN ('remote', 'reseal')),
    name             text NOT NULL,
    idempotency_key  text NOT NULL,
    source           text NOT NULL,
    payload          jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'scheduled', 'done', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    leased_until     timestamptz,
    lease            uuid,
    last_error       text,
    remote_id        text,
    progress         jsonb NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, idempotency_key)
);
CREATE INDEX tasks_due ON bss.tasks (next_attempt_at) WHERE status IN ('pending', 'running');
CREATE INDEX tasks_by_tenant ON bss.tasks (tenant_id, id);
CREATE INDEX tasks_by_tenant_status ON bss.tasks (tenant_id, status, id);
-- One running re-encryption job per tenant (two at once could undo each
-- other's work).
CREATE UNIQUE INDEX tasks_one_job ON bss.tasks (tenant_id) WHERE kind = 'reseal' AND status = 'running';

-- The built-in keyring's current key of each tenant is `local-<key_version>`;
-- a rotation raises it. `key_id`: the current key id last seen (from either
-- keyring); a different one queues the tenant's re-encryption.
ALTER TABLE bss.tenants ADD COLUMN key_version integer NOT NULL DEFAULT 1;
ALTER TABLE bss.tenants ADD COLUMN key_id text;
