-- What plugin authors read back: the lines their plugins logged, and the
-- calls they asked to have recorded (manifest `record`: the inputs, the
-- outcome, what the call cost). Both are bounded per plugin and in time
-- (the host prunes them); `x-encrypted` values are redacted before they
-- are written. Rows go with their tenant, and with their plugin when it is
-- deleted (storage/plugins.rs).
CREATE TABLE bss.plugin_logs (
    id          bigserial PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES bss.tenants (id) ON DELETE CASCADE,
    plugin      text NOT NULL,
    version     integer NOT NULL,
    at          timestamptz NOT NULL,
    level       text NOT NULL,
    message     text NOT NULL,
    request_id  text NOT NULL
);

CREATE INDEX plugin_logs_by_plugin ON bss.plugin_logs (tenant_id, plugin, id);
CREATE INDEX plugin_logs_by_time ON bss.plugin_logs (at);

CREATE TABLE bss.plugin_calls (
    -- UUIDv7: time-ordered.
    id          uuid PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES bss.tenants (id) ON DELETE CASCADE,
    plugin      text NOT NULL,
    version     integer NOT NULL,
    kind        text NOT NULL,
    at          timestamptz NOT NULL,
    request_id  text NOT NULL,
    -- resource, operation, actor, config
    context     jsonb NOT NULL,
    -- {record, previous} | {event} | {event, request}
    input       jsonb NOT NULL,
    verdict     text NOT NULL,
    outcome     jsonb NOT NULL,
    took_us     bigint NOT NULL,
    fuel_used   bigint NOT NULL,
    memory_peak bigint NOT NULL,
    logs        jsonb NOT NULL,
    stderr      text NOT NULL
);

CREATE INDEX plugin_calls_by_plugin ON bss.plugin_calls (tenant_id, plugin, id);
CREATE INDEX plugin_calls_by_time ON bss.plugin_calls (at);
