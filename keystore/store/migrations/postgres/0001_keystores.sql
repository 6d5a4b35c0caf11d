-- Keystores and their cluster bindings. Times are epoch milliseconds.
-- Table, column, constraint and index names match the SQLite schema so both
-- backends can map violations by name.
--
-- Every text column is COLLATE "C": comparisons and ORDER BY are then byte
-- order, as with SQLite's BINARY collation, whatever the database's default
-- collation, so both backends list and page in the same order.
CREATE TABLE keystores (
    id                   TEXT COLLATE "C" NOT NULL,
    domain_id            TEXT COLLATE "C" NOT NULL,
    project_id           TEXT COLLATE "C" NOT NULL,
    alias                TEXT COLLATE "C" NOT NULL,
    type                 TEXT COLLATE "C" NOT NULL,
    cluster_id           TEXT COLLATE "C" NOT NULL,
    state                TEXT COLLATE "C" NOT NULL,
    token_serial         TEXT COLLATE "C" NOT NULL,
    token_label          TEXT COLLATE "C" NOT NULL,
    ca_fingerprint       TEXT COLLATE "C" NOT NULL,
    identity_fingerprint TEXT COLLATE "C" NOT NULL,
    created_at           BIGINT NOT NULL,
    updated_at           BIGINT NOT NULL,
    CONSTRAINT keystores_pkey PRIMARY KEY (id),
    CONSTRAINT keystores_state_check
        CHECK (state IN ('CREATING', 'DISABLED', 'ENABLED', 'DELETING'))
);

-- One alias per domain and one keystore per cluster, whatever the state:
-- a cluster stays bound until its row is deleted. A violation names the
-- index as the constraint.
CREATE UNIQUE INDEX keystores_domain_alias_key ON keystores (domain_id, alias);
CREATE UNIQUE INDEX keystores_cluster_key ON keystores (cluster_id);

-- Serves ListKeystores' filter and ORDER BY created_at, id.
CREATE INDEX keystores_domain_created_idx ON keystores (domain_id, created_at, id);
