-- Tools an agent may call, per tenant. The secret is AES-256-GCM ciphertext (format byte, nonce,
-- ciphertext and tag) bound to tenant/name, so a row's secret cannot be moved to another tool.
CREATE TABLE IF NOT EXISTS registry.tools (
    tenant text NOT NULL,
    name text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('http', 'grpc')),
    address text NOT NULL,
    timeout_ms integer NOT NULL CHECK (timeout_ms > 0 AND timeout_ms <= 300000),
    description text NOT NULL DEFAULT '',
    secret_ciphertext bytea NULL,
    revision bigint NOT NULL DEFAULT 1,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    creator text NOT NULL DEFAULT '',
    PRIMARY KEY (tenant, name)
);
