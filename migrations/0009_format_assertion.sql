-- `format` became an annotation, as JSON Schema 2020-12 says, unless a
-- schema asks for assertion with "x-format-assertion": true. The schema
-- versions stored before asserted it: they now say so, and their records
-- are checked exactly as before.
DO $migration$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT schema_name FROM bss.tenants WHERE status = 'active' LOOP
        IF to_regclass(format('%I._schemas', t.schema_name)) IS NOT NULL THEN
            EXECUTE format(
                $q$UPDATE %I._schemas
                      SET schema = schema || '{"x-format-assertion": true}'::jsonb
                    WHERE jsonb_typeof(schema) = 'object'
                      AND NOT schema ? 'x-format-assertion'
                      AND schema::text LIKE '%%"format"%%'$q$,
                t.schema_name);
        END IF;
    END LOOP;
END
$migration$;
