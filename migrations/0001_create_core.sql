-- Tally core schema. Names and status strings are the operators' vocabulary (DESIGN.md);
-- every invariant the schema can hold is a CHECK constraint.

-- Orders: "deliver `quantity` units of `kind` to `target`".
CREATE TABLE orders (
    id                      uuid PRIMARY KEY,
    kind                    text        NOT NULL CHECK (kind ~ '^[a-z][a-z0-9_-]{0,62}$'),
    target                  text        NOT NULL CHECK (length(target) BETWEEN 1 AND 2048),
    quantity                bigint      NOT NULL CHECK (quantity > 0),
    chunk_size              integer     NOT NULL CHECK (chunk_size > 0),
    -- Number of tasks the chunk planner fans this order into: ceil(quantity / chunk_size).
    task_count              integer     NOT NULL,
    priority                smallint    NOT NULL DEFAULT 0,
    max_attempts            integer     NOT NULL CHECK (max_attempts BETWEEN 1 AND 100),
    status                  text        NOT NULL DEFAULT 'PENDING'
        CHECK (status IN ('PENDING', 'PROCESSING', 'COMPLETED', 'PARTIAL', 'CANCELLED')),
    delivered               bigint      NOT NULL DEFAULT 0,
    failed_permanent_units  bigint      NOT NULL DEFAULT 0,
    cancelled_units         bigint      NOT NULL DEFAULT 0,
    -- Every remaining task is dead-lettered: an operator has to look (DESIGN.md).
    needs_attention         boolean     NOT NULL DEFAULT false,
    -- Client-supplied intake key (order intake is idempotent, see idempotency_ledger).
    client_key              text,
    -- W3C traceparent of the request that created the order.
    trace_context           text,
    version                 bigint      NOT NULL DEFAULT 1,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    generated_at            timestamptz,
    finished_at             timestamptz,
    audited_at              timestamptz,
    archived_at             timestamptz,
    CONSTRAINT orders_task_count_matches_plan
        CHECK (task_count = ((quantity + chunk_size - 1) / chunk_size)),
    CONSTRAINT orders_units_nonnegative
        CHECK (delivered >= 0 AND failed_permanent_units >= 0 AND cancelled_units >= 0),
    CONSTRAINT orders_units_conserved
        CHECK (delivered + failed_permanent_units + cancelled_units <= quantity),
    CONSTRAINT orders_completed_means_delivered
        CHECK (status <> 'COMPLETED' OR delivered = quantity),
    CONSTRAINT orders_finished_has_time
        CHECK ((status IN ('COMPLETED', 'PARTIAL', 'CANCELLED')) = (finished_at IS NOT NULL)),
    CONSTRAINT orders_generated_has_time
        CHECK (status = 'PENDING' OR status = 'CANCELLED' OR generated_at IS NOT NULL)
);
-- The generator's queue, and the sweeper's view of unfinished orders.
CREATE INDEX orders_pending_idx ON orders (created_at) WHERE status = 'PENDING';
CREATE INDEX orders_processing_idx ON orders (created_at) WHERE status = 'PROCESSING';
CREATE INDEX orders_retention_idx ON orders (finished_at) WHERE finished_at IS NOT NULL AND archived_at IS NULL;
-- Counter updates are HOT updates; leave room on the page for them.
ALTER TABLE orders SET (fillfactor = 80);

-- Tasks: one chunk of an order. The hot table; finished tasks move to the archive.
CREATE TABLE order_tasks (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id          uuid        NOT NULL REFERENCES orders (id),
    seq               integer     NOT NULL CHECK (seq >= 0),
    kind              text        NOT NULL,
    quantity          integer     NOT NULL CHECK (quantity > 0),
    delivered         integer     NOT NULL DEFAULT 0,
    status            text        NOT NULL DEFAULT 'PENDING'
        CHECK (status IN ('PENDING', 'EXECUTING', 'COMPLETED', 'FAILED_RETRYING', 'FAILED_PERMANENT', 'CANCELLED')),
    priority          smallint    NOT NULL DEFAULT 0,
    attempts          integer     NOT NULL DEFAULT 0,
    max_attempts      integer     NOT NULL CHECK (max_attempts >= 1),
    -- When a PENDING or FAILED_RETRYING task may next be claimed (database time).
    retry_after       timestamptz NOT NULL DEFAULT now(),
    claimed_by        uuid,
    claimed_at        timestamptz,
    -- Fences every finishing write: a fresh token per claim.
    claim_token       uuid,
    lease_expires_at  timestamptz,
    executed_at       timestamptz,
    last_error        text,
    last_error_class  text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT order_tasks_order_seq_unique UNIQUE (order_id, seq),
    CONSTRAINT order_tasks_delivered_bounded CHECK (delivered BETWEEN 0 AND quantity),
    CONSTRAINT order_tasks_attempts_bounded CHECK (attempts BETWEEN 0 AND max_attempts),
    CONSTRAINT order_tasks_completed_means_delivered CHECK (status <> 'COMPLETED' OR delivered = quantity),
    CONSTRAINT order_tasks_executing_has_claim CHECK (
        (status = 'EXECUTING') = (claim_token IS NOT NULL AND claimed_by IS NOT NULL
                                  AND claimed_at IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CONSTRAINT order_tasks_executing_has_attempt CHECK (status <> 'EXECUTING' OR attempts >= 1)
);
-- The claim: matches the claim's ORDER BY exactly; only claimable rows are in it, so
-- finished tasks never slow the claim down however many the table holds.
CREATE INDEX order_tasks_claim_idx ON order_tasks (priority DESC, seq, id)
    WHERE status IN ('PENDING', 'FAILED_RETRYING');
-- Heartbeat lease renewal and orphan rescue: only in-flight rows (a few per worker slot).
-- claimed_by never changes while a lease is renewed, so renewals stay HOT updates.
CREATE INDEX order_tasks_executing_idx ON order_tasks (claimed_by) WHERE status = 'EXECUTING';
-- Dead-letter queue browsing, per order.
CREATE INDEX order_tasks_dead_idx ON order_tasks (order_id) WHERE status = 'FAILED_PERMANENT';
ALTER TABLE order_tasks SET (
    fillfactor = 70,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

-- Audit: one row for every transition of a task (task_id set) or an order (task_id NULL).
-- Append-only and written on the hot path (two rows per task lifecycle), so it carries a
-- single index: by order, then task (tracing a task looks its order up first).
CREATE TABLE order_task_transitions (
    id                 bigint      GENERATED ALWAYS AS IDENTITY,
    task_id            bigint,
    order_id           uuid        NOT NULL,
    occurred_at        timestamptz NOT NULL DEFAULT now(),
    from_state         text,
    to_state           text        NOT NULL,
    transition_reason  text        NOT NULL,
    error_class        text,
    actor_id           text        NOT NULL,
    correlation_id     text,
    attempt            integer
);
CREATE INDEX order_task_transitions_order_task_idx ON order_task_transitions (order_id, task_id);
ALTER TABLE order_task_transitions SET (autovacuum_vacuum_scale_factor = 0.05);

-- REL-style ledger of idempotent operations, keyed by the client's idempotency key:
-- order intake records here first, so a repeated key finds its order (or its conflict).
CREATE TABLE idempotency_ledger (
    operation_key        text        PRIMARY KEY CHECK (length(operation_key) BETWEEN 1 AND 255),
    order_id             uuid        NOT NULL,
    state                text        NOT NULL,
    -- SHA-256 of the canonical request: same key with another body is a conflict.
    request_hash         text        NOT NULL,
    attempt_count        integer     NOT NULL DEFAULT 0,
    first_seen_at        timestamptz NOT NULL DEFAULT now(),
    last_seen_at         timestamptz NOT NULL DEFAULT now(),
    error_snapshot_json  jsonb
);
CREATE INDEX idempotency_ledger_order_idx ON idempotency_ledger (order_id);

-- Every invariant check the sweeper ran, pass or fail.
CREATE TABLE invariant_check_log (
    id                  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id            uuid        NOT NULL,
    check_timestamp     timestamptz NOT NULL DEFAULT now(),
    passed              boolean     NOT NULL,
    order_status        text        NOT NULL,
    expected_units      bigint      NOT NULL,
    delivered_units     bigint      NOT NULL,
    failed_units        bigint      NOT NULL,
    cancelled_units     bigint      NOT NULL,
    outstanding_units   bigint      NOT NULL,
    violations          jsonb       NOT NULL DEFAULT '[]'::jsonb,
    checked_by          text        NOT NULL
);
CREATE INDEX invariant_check_log_order_idx ON invariant_check_log (order_id, check_timestamp DESC);
CREATE INDEX invariant_check_log_failed_idx ON invariant_check_log (check_timestamp) WHERE NOT passed;

-- The latest verdict per order, and how many checks ever failed.
CREATE VIEW v_invariant_health AS
SELECT o.id AS order_id,
       o.status AS order_status,
       o.quantity AS expected_units,
       o.delivered AS delivered_units,
       o.failed_permanent_units AS failed_units,
       last.check_timestamp AS last_check_at,
       last.passed AS last_check_passed,
       last.violations AS last_violations,
       (SELECT count(*) FROM invariant_check_log l WHERE l.order_id = o.id) AS checks_total,
       (SELECT count(*) FROM invariant_check_log l WHERE l.order_id = o.id AND NOT l.passed) AS checks_failed
FROM orders o
LEFT JOIN LATERAL (
    SELECT l.check_timestamp, l.passed, l.violations
    FROM invariant_check_log l
    WHERE l.order_id = o.id
    ORDER BY l.check_timestamp DESC
    LIMIT 1
) last ON true;

-- One row per running Tally process: heartbeats, roles and lifetime counters.
CREATE TABLE workers (
    id                 uuid        PRIMARY KEY,
    hostname           text        NOT NULL,
    pid                integer     NOT NULL,
    roles              text        NOT NULL,
    version            text        NOT NULL,
    started_at         timestamptz NOT NULL DEFAULT now(),
    heartbeat_at       timestamptz NOT NULL DEFAULT now(),
    lease_expires_at   timestamptz NOT NULL,
    stopped_at         timestamptz,
    total_processed    bigint      NOT NULL DEFAULT 0,
    total_completed    bigint      NOT NULL DEFAULT 0,
    total_failed       bigint      NOT NULL DEFAULT 0,
    total_retries      bigint      NOT NULL DEFAULT 0,
    recovered_orphans  bigint      NOT NULL DEFAULT 0
);

-- Leader lease: one row per elected role. `term` increases on every change of holder.
CREATE TABLE leader_lease (
    name         text        PRIMARY KEY,
    holder       uuid        NOT NULL,
    term         bigint      NOT NULL CHECK (term >= 1),
    acquired_at  timestamptz NOT NULL DEFAULT now(),
    renewed_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);

-- Cluster-wide operator controls: a single row.
CREATE TABLE tally_control (
    id                    boolean     PRIMARY KEY DEFAULT true CHECK (id),
    paused                boolean     NOT NULL DEFAULT false,
    batch_size_override   integer     CHECK (batch_size_override IS NULL OR batch_size_override BETWEEN 1 AND 10000),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    updated_by            text
);
INSERT INTO tally_control (id) VALUES (true);

-- Archive tables: finished orders' tasks and audit rows, moved by the retention service.
CREATE TABLE order_tasks_archive (LIKE order_tasks INCLUDING DEFAULTS);
ALTER TABLE order_tasks_archive ADD PRIMARY KEY (id);
CREATE INDEX order_tasks_archive_order_idx ON order_tasks_archive (order_id);
CREATE TABLE order_task_transitions_archive (LIKE order_task_transitions INCLUDING DEFAULTS);
ALTER TABLE order_task_transitions_archive ADD PRIMARY KEY (id);
CREATE INDEX order_task_transitions_archive_order_idx ON order_task_transitions_archive (order_id);
