-- Tenant exports and imports run through the API (`POST /v1/tenants/{id}/export`,
-- `POST /v1/tenants/import`) as jobs. A job's row is its progress, seen by
-- every replica; `updated_at` is its heartbeat (a running job whose replica
-- stopped is reported failed once it goes stale). An export's archive is
-- kept in parts in the database, so any replica serves its download, until
-- the job expires.
CREATE TABLE bss.archive_jobs (
    id            uuid PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('export', 'import')),
    tenant_id     text NOT NULL,
    status        text NOT NULL DEFAULT 'running'
                  CHECK (status IN ('running', 'done', 'failed')),
    options       jsonb NOT NULL DEFAULT '{}',
    records_done  bigint NOT NULL DEFAULT 0,
    records_total bigint,
    bytes         bigint,
    sha256        text,
    result        jsonb,
    error         text,
    created_by    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);
CREATE INDEX archive_jobs_created ON bss.archive_jobs (created_at);

CREATE TABLE bss.archive_parts (
    job_id  uuid NOT NULL REFERENCES bss.archive_jobs ON DELETE CASCADE,
    part    integer NOT NULL,
    bytes   bytea NOT NULL,
    PRIMARY KEY (job_id, part)
);

-- Events brought in by an import (`--with-events`): in the tenant's log for
-- reading and replay, never published to the broker again nor matched
-- against webhook endpoints.
ALTER TABLE bss.outbox ADD COLUMN imported boolean NOT NULL DEFAULT false;
