-- Per-tenant ceilings on plugin limits (set by a platform admin); each is
-- capped by the installation's own ceilings. Empty: the installation's.
ALTER TABLE bss.tenants ADD COLUMN plugin_ceilings jsonb NOT NULL DEFAULT '{}';
