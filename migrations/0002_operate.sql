-- Operating Tally: kinds, API keys, the admin audit trail, order callbacks, order pause and
-- fault injection.

-- A kind names the handler that delivers its units and the policy its tasks follow.
CREATE TABLE kinds (
    name                text        PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_-]{0,62}$'),
    handler             text        NOT NULL CHECK (handler IN ('simulate', 'webhook')),
    -- Webhook settings: {url, timeout_ms, signing_secret, headers, allowed_hosts}.
    webhook             jsonb,
    max_attempts        integer     NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 100),
    backoff_base_sec    float8      NOT NULL DEFAULT 5 CHECK (backoff_base_sec > 0),
    backoff_multiplier  float8      NOT NULL DEFAULT 2 CHECK (backoff_multiplier BETWEEN 1 AND 10),
    backoff_max_sec     float8      NOT NULL DEFAULT 3600 CHECK (backoff_max_sec >= backoff_base_sec),
    default_chunk_size  integer     NOT NULL DEFAULT 400 CHECK (default_chunk_size BETWEEN 1 AND 1000000),
    -- Most attempts of this kind running at once in one worker process (NULL: no limit).
    concurrency_limit   integer     CHECK (concurrency_limit IS NULL OR concurrency_limit BETWEEN 1 AND 10000),
    -- A paused kind's tasks are not claimed.
    paused              boolean     NOT NULL DEFAULT false,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT kinds_webhook_config CHECK ((handler = 'webhook') = (webhook IS NOT NULL))
);
-- Out of the box a fresh install accepts orders (TALLY_SIMULATE_KIND=false removes it).
INSERT INTO kinds (name, handler) VALUES ('simulate', 'simulate');

-- API keys: only the SHA-256 digest of the secret is stored.
CREATE TABLE api_keys (
    id            uuid        PRIMARY KEY,
    name          text        NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    scope         text        NOT NULL CHECK (scope IN ('read', 'operate', 'admin')),
    digest        text        NOT NULL UNIQUE,
    -- The first characters of the secret, to tell keys apart in listings.
    prefix        text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_by    uuid,
    revoked_at    timestamptz,
    last_used_at  timestamptz,
    -- Set by `bootstrap`: the key from TALLY_ADMIN_API_KEY.
    bootstrap     boolean     NOT NULL DEFAULT false
);

-- One row for every mutating API call, with the key that made it.
CREATE TABLE admin_audit (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at  timestamptz NOT NULL DEFAULT now(),
    key_id       uuid,
    key_name     text,
    action       text        NOT NULL,
    target       text,
    status       integer     NOT NULL,
    detail       jsonb
);

-- Orders: where to report the outcome, whether claims are held back, what was last reported.
ALTER TABLE orders
    ADD COLUMN callback_url     text CHECK (callback_url IS NULL OR length(callback_url) BETWEEN 1 AND 2048),
    ADD COLUMN callback_format  text NOT NULL DEFAULT 'json' CHECK (callback_format IN ('json', 'slack')),
    -- No new claims for this order's tasks (operator pause; also set on cancel/force-complete
    -- until its last in-flight attempt has finished).
    ADD COLUMN paused           boolean NOT NULL DEFAULT false,
    -- The last event enqueued for the callback (COMPLETED, PARTIAL, CANCELLED, NEEDS_ATTENTION).
    ADD COLUMN notified_event   text;
-- The claim excludes paused orders through this (usually empty) index.
CREATE INDEX orders_paused_idx ON orders (id) WHERE paused;
-- Orders whose callback is due: reaching a final state or needing attention.
CREATE INDEX orders_callback_due_idx ON orders (updated_at)
    WHERE callback_url IS NOT NULL
      AND (status IN ('COMPLETED', 'PARTIAL', 'CANCELLED') OR (status = 'PROCESSING' AND needs_attention))
      AND notified_event IS DISTINCT FROM (CASE WHEN status = 'PROCESSING' THEN 'NEEDS_ATTENTION'
                                                ELSE status END);

-- Outgoing order notifications: a small queue of its own, delivered by the workers.
CREATE TABLE order_callbacks (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id         uuid        NOT NULL REFERENCES orders (id),
    event            text        NOT NULL CHECK (event IN ('COMPLETED', 'PARTIAL', 'CANCELLED', 'NEEDS_ATTENTION')),
    url              text        NOT NULL,
    format           text        NOT NULL CHECK (format IN ('json', 'slack')),
    payload          jsonb       NOT NULL,
    status           text        NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'DELIVERED', 'FAILED')),
    attempts         integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL DEFAULT 8,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    -- Fences a delivery attempt like a task's claim token.
    claim_token      uuid,
    locked_until     timestamptz,
    last_error       text,
    response_status  integer,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    CONSTRAINT order_callbacks_attempts_bounded CHECK (attempts BETWEEN 0 AND max_attempts)
);
CREATE INDEX order_callbacks_due_idx ON order_callbacks (next_attempt_at) WHERE status = 'PENDING';
CREATE INDEX order_callbacks_order_idx ON order_callbacks (order_id);

-- Fault injection (the runbook's /api/admin/testing): workers fail this fraction of attempts
-- with a NetworkError before calling the handler. Refused unless configuration allows it.
ALTER TABLE tally_control
    ADD COLUMN fault_injection_enabled boolean NOT NULL DEFAULT false,
    ADD COLUMN fault_injection_rate    float8  NOT NULL DEFAULT 0.1
        CHECK (fault_injection_rate BETWEEN 0 AND 1);

-- Slots each process offers (capacity planning).
ALTER TABLE workers ADD COLUMN concurrency integer NOT NULL DEFAULT 0;

-- Throughput over recent minutes (capacity, progress ETA): the audit table is append-only
-- and time-ordered, so a BRIN index is a few pages and costs the hot path almost nothing.
CREATE INDEX order_task_transitions_time_brin ON order_task_transitions USING brin (occurred_at);
