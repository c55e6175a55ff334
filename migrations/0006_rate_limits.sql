-- Per-tenant rate limits (set by a platform admin), each replacing the
-- installation's setting of the same name. Empty: the installation's.
ALTER TABLE bss.tenants ADD COLUMN rate_limits jsonb NOT NULL DEFAULT '{}';
