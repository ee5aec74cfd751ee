-- New work is claimed from a ring of small append-and-delete tables, not from order_tasks.
--
-- The claim used to walk `order_tasks_claim_idx` from its start. While some session holds
-- an old snapshot (a long report, a stuck migration, a forgotten BEGIN: a pinned xmin),
-- every task claimed since the pin leaves its PENDING entry in that index, and those
-- entries can be neither removed by vacuum nor marked dead by the scans that pass them.
-- Every claim walked all of them: at 2,000 single-unit orders/s the claim took 24 ms
-- thirty seconds into a pin, and the queue grew without bound (loadtest/RESULTS.md,
-- "Pinned xmin").
--
-- Now a task that becomes PENDING also gets a row in `task_ready`, in the partition
-- (slot) of the current half second; the claim takes rows from `task_ready` (and deletes
-- them) and locks the tasks by primary key. The sweeper leader empties each slot that has
-- no rows left with TRUNCATE, which a pinned xmin cannot hold back (it waits only for
-- locks, and gives up after a few milliseconds when it cannot have one). So a claim walks
-- at most the rows claimed in the last second or two, pin or not.
--
-- order_tasks stays the record: status, fence, counters and the per-task audit. A ready
-- row is only a pointer; the claim re-checks the task itself (PENDING, due, attempts
-- left), so a stale pointer claims nothing. Tasks waiting for a retry (FAILED_RETRYING)
-- are not in the ring: the claim takes the due ones through `order_tasks_retry_idx`, in
-- retry_after order, so retries scheduled for later are never walked.
CREATE TABLE task_ready (
    slot      smallint NOT NULL,
    task_id   bigint   NOT NULL,
    priority  smallint NOT NULL,
    -- seq / 64: the claim order of migration 0004 (runs of 64 tasks per order).
    run       integer  NOT NULL,
    kind      text     NOT NULL,
    order_id  uuid     NOT NULL
) PARTITION BY LIST (slot);

DO $$
BEGIN
    FOR s IN 0..7 LOOP
        EXECUTE format(
            'CREATE TABLE task_ready_%s PARTITION OF task_ready FOR VALUES IN (%s)', s, s);
    END LOOP;
END
$$;

-- The claim order (priority, then runs, then id), and the lookup by task for the delete.
CREATE INDEX task_ready_claim_idx ON task_ready (priority DESC, run, task_id);
CREATE INDEX task_ready_task_idx ON task_ready (task_id);

-- The slot a ready row goes to now: half-second buckets of the database clock, 8 slots
-- (a 4 s ring). Writers and the reclaimer agree on it without any shared row.
CREATE FUNCTION tally_ready_slot() RETURNS smallint
    LANGUAGE sql VOLATILE PARALLEL SAFE
    AS $$ SELECT (floor(extract(epoch FROM clock_timestamp()) * 2)::bigint % 8)::smallint $$;

-- Due retries, oldest due first; retries scheduled for later are past the scan's end.
CREATE INDEX order_tasks_retry_idx ON order_tasks (retry_after) WHERE status = 'FAILED_RETRYING';

-- Work queued before this migration.
INSERT INTO task_ready (slot, task_id, priority, run, kind, order_id)
SELECT tally_ready_slot(), id, priority, seq / 64, kind, order_id
FROM order_tasks
WHERE status = 'PENDING';
