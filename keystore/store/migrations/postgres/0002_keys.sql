-- Customer master keys, each living in one keystore. Times are epoch
-- milliseconds. Names match the SQLite schema so both backends can map
-- violations by name; text columns are COLLATE "C" as in 0001.
--
-- sequence is NULL when the create request carried none, and deletion_at is
-- NULL unless the key is PENDING_DELETION (then it is required, or the key
-- would never come due). public_key is NULL for symmetric keys.
CREATE TABLE keys (
    id          TEXT COLLATE "C" NOT NULL,
    domain_id   TEXT COLLATE "C" NOT NULL,
    project_id  TEXT COLLATE "C" NOT NULL,
    keystore_id TEXT COLLATE "C" NOT NULL,
    alias       TEXT COLLATE "C" NOT NULL,
    spec        TEXT COLLATE "C" NOT NULL,
    usage       TEXT COLLATE "C" NOT NULL,
    description TEXT COLLATE "C" NOT NULL,
    origin      TEXT COLLATE "C" NOT NULL,
    state       TEXT COLLATE "C" NOT NULL,
    public_key  BYTEA  NULL,
    sequence    TEXT COLLATE "C" NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    deletion_at BIGINT NULL,
    CONSTRAINT keys_pkey PRIMARY KEY (id),
    -- A keystore cannot be deleted while it holds keys.
    CONSTRAINT keys_keystore_fkey FOREIGN KEY (keystore_id)
        REFERENCES keystores (id) ON DELETE RESTRICT,
    CONSTRAINT keys_state_check
        CHECK (state IN ('CREATING', 'ENABLED', 'DISABLED', 'PENDING_DELETION')),
    CONSTRAINT keys_deletion_check
        CHECK ((state = 'PENDING_DELETION') = (deletion_at IS NOT NULL)),
    CONSTRAINT keys_sequence_check
        CHECK (sequence IS NULL OR sequence <> '')
);

-- Key aliases are their own namespace per domain, apart from keystore
-- aliases, whatever the state.
CREATE UNIQUE INDEX keys_domain_alias_key ON keys (domain_id, alias);
-- One key per (domain, sequence) for idempotent retries; NULLs never collide.
CREATE UNIQUE INDEX keys_domain_sequence_key ON keys (domain_id, sequence);

-- Serves ListKeys' filter and ORDER BY created_at, id.
CREATE INDEX keys_domain_created_idx ON keys (domain_id, created_at, id);
-- Serves CountKeys and the foreign-key check when a keystore is deleted.
CREATE INDEX keys_keystore_idx ON keys (keystore_id);
-- Serves DueDeletions.
CREATE INDEX keys_state_deletion_idx ON keys (state, deletion_at);
