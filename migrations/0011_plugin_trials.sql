-- A plugin version on trial beside the active one: a shadow (runs on real
-- calls, its verdicts compared with the active version's and counted, never
-- applied) or a canary (answers `trial_percent` percent of calls). One trial
-- at a time per plugin; promoting makes it the active version, ending it
-- leaves the active one alone. A version on trial is never pruned.
ALTER TABLE bss.plugins
    ADD COLUMN trial_version integer,
    ADD COLUMN trial_mode text CHECK (trial_mode IN ('shadow', 'canary')),
    ADD COLUMN trial_percent smallint CHECK (trial_percent BETWEEN 1 AND 100),
    ADD CONSTRAINT plugins_trial_whole CHECK (
        (trial_version IS NULL AND trial_mode IS NULL AND trial_percent IS NULL)
        OR (trial_version IS NOT NULL AND trial_mode = 'shadow' AND trial_percent IS NULL)
        OR (trial_version IS NOT NULL AND trial_mode = 'canary' AND trial_percent IS NOT NULL));
