-- The gateway's own bookkeeping lives in schema walcast.
CREATE SCHEMA IF NOT EXISTS walcast;

-- Publications walcast created and therefore keeps in step with the `tables` setting.
CREATE TABLE IF NOT EXISTS walcast.owned_publications (
    name       text PRIMARY KEY,
    tables     text[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
