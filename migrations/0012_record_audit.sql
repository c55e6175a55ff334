-- no-transaction
-- Every record version keeps what it owes to the write that made it (the
-- `audit` column of each resource table: operation, actor, request id, the
-- validation hook versions that passed it). Tables created from now on have
-- the column; this adds it to every existing resource table of every tenant
-- (archived ones too), committing after each table so that no lock is held
-- longer than one table's ALTER (adding a nullable column rewrites nothing)
-- and the lock table never fills however many tenants there are.
-- Re-runnable.
DO $$
DECLARE
    s name;
    r text;
BEGIN
    FOR s IN
        SELECT n.nspname FROM pg_namespace n
          JOIN pg_class c ON c.relnamespace = n.oid
         WHERE c.relname = '_resources' AND c.relkind = 'r'
           AND (n.nspname LIKE 't\_%' OR n.nspname LIKE 'h\_%' OR n.nspname LIKE 'a\_%')
         ORDER BY n.nspname
    LOOP
        FOR r IN EXECUTE format('SELECT resource FROM %I._resources ORDER BY resource', s) LOOP
            EXECUTE format('ALTER TABLE %I.%I ADD COLUMN IF NOT EXISTS audit jsonb', s, r);
            COMMIT;
        END LOOP;
    END LOOP;
END
$$;
