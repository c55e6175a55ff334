-- Tenants' plugins. Control-plane tables (not in the tenant schemas) so
-- the relay can tell with one indexed lookup which tenants have enrichers;
-- every query names the tenant, taken from the verified token.
CREATE TABLE bss.plugins (
    tenant_id       text NOT NULL REFERENCES bss.tenants (id) ON DELETE CASCADE,
    name            text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('validation-hook', 'event-enricher', 'webhook-transformer')),
    active_version  integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, name)
);

CREATE INDEX plugins_enrichers ON bss.plugins (tenant_id)
    WHERE kind = 'event-enricher' AND active_version IS NOT NULL;

-- Every uploaded version is kept (rollback), with the module as uploaded;
-- compiled artifacts live in the host's cache, never here.
CREATE TABLE bss.plugin_versions (
    tenant_id   text NOT NULL,
    name        text NOT NULL,
    version     integer NOT NULL,
    manifest    jsonb NOT NULL,
    sha256      text NOT NULL,
    size        integer NOT NULL,
    module      bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text NOT NULL,
    PRIMARY KEY (tenant_id, name, version),
    FOREIGN KEY (tenant_id, name) REFERENCES bss.plugins (tenant_id, name) ON DELETE CASCADE
);

-- Events of tenants with enrichers are sequenced only once enriched.
ALTER TABLE bss.outbox ADD COLUMN enriched boolean NOT NULL DEFAULT false;
