-- The relay finds the events waiting for enrichers per tenant, without
-- scanning every unsequenced event.
CREATE INDEX outbox_unenriched ON bss.outbox (tenant_id, id) WHERE seq IS NULL AND NOT enriched;
