-- Rollouts and experiments: progressive or fixed changes of one endpoint.
CREATE TABLE IF NOT EXISTS registry.rollouts (
    agent text NOT NULL,
    endpoint text NOT NULL,
    id bigint NOT NULL,
    kind text NOT NULL DEFAULT 'rollout',          -- 'rollout' or 'experiment'
    stable_version bigint NOT NULL,
    candidate_version bigint NOT NULL,
    spec jsonb NOT NULL,                           -- steps, analysis, policy, variants, metrics...
    state text NOT NULL,
    state_reason text NOT NULL DEFAULT '',
    current_step int NOT NULL DEFAULT 0,
    current_weight double precision NOT NULL DEFAULT 0,
    last_analysis jsonb,
    last_check_time timestamptz,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    step_start_time timestamptz NOT NULL DEFAULT now(),
    traffic_start_time timestamptz,
    end_time timestamptz,
    creator text NOT NULL DEFAULT '',
    revision bigint NOT NULL DEFAULT 1,
    PRIMARY KEY (agent, endpoint, kind, id),
    FOREIGN KEY (agent, endpoint) REFERENCES registry.endpoints (agent, id)
);

-- At most one running rollout or experiment per endpoint, whatever replica creates it.
CREATE UNIQUE INDEX IF NOT EXISTS rollouts_one_active ON registry.rollouts (agent, endpoint)
    WHERE state IN ('PROGRESSING', 'PAUSED', 'RUNNING', 'COMPLETE');

-- Every time an endpoint came to serve one version alone: what "the last stable version" means.
CREATE TABLE IF NOT EXISTS registry.stable_history (
    agent text NOT NULL,
    endpoint text NOT NULL,
    seq bigserial,
    version bigint NOT NULL,
    time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent, endpoint, seq)
);

-- Where an endpoint's webhook posts rollout and experiment transitions.
ALTER TABLE registry.endpoints ADD COLUMN IF NOT EXISTS webhook_url text NOT NULL DEFAULT '';
