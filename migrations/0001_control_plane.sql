-- The control plane: which tenants exist and where their data lives.
-- Tenant data itself lives in one Postgres schema per tenant, created by the
-- service (see host/src/storage/tenants.rs), not by migrations.
CREATE SCHEMA IF NOT EXISTS bss;

CREATE TABLE bss.tenants (
    id              text PRIMARY KEY,
    name            text NOT NULL,
    -- Derived from id (TenantId::schema_name); unique so that two tenants can
    -- never share a schema, whatever the derivation.
    schema_name     text NOT NULL UNIQUE,
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'archived')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    archived_at     timestamptz,
    -- While archived the schema is renamed, so no query for the tenant can
    -- reach it; it is dropped once drop_after has passed.
    archived_schema text UNIQUE,
    drop_after      timestamptz
);

CREATE INDEX tenants_drop_after ON bss.tenants (drop_after) WHERE status = 'archived';
