-- Keystores and their cluster bindings. Times are epoch milliseconds.
-- Constraint names match the PostgreSQL schema so both backends can map
-- violations by name.
CREATE TABLE keystores (
    id                   TEXT    NOT NULL,
    domain_id            TEXT    NOT NULL,
    project_id           TEXT    NOT NULL,
    alias                TEXT    NOT NULL,
    type                 TEXT    NOT NULL,
    cluster_id           TEXT    NOT NULL,
    state                TEXT    NOT NULL,
    token_serial         TEXT    NOT NULL,
    token_label          TEXT    NOT NULL,
    ca_fingerprint       TEXT    NOT NULL,
    identity_fingerprint TEXT    NOT NULL,
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL,
    CONSTRAINT keystores_pkey PRIMARY KEY (id),
    CONSTRAINT keystores_state_check
        CHECK (state IN ('CREATING', 'DISABLED', 'ENABLED', 'DELETING'))
);

-- One alias per domain and one keystore per cluster, whatever the state:
-- a cluster stays bound until its row is deleted.
CREATE UNIQUE INDEX keystores_domain_alias_key ON keystores (domain_id, alias);
CREATE UNIQUE INDEX keystores_cluster_key ON keystores (cluster_id);

-- Serves ListKeystores' filter and ORDER BY created_at, id.
CREATE INDEX keystores_domain_created_idx ON keystores (domain_id, created_at, id);
