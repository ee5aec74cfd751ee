-- Every completion batch moves the counters of the orders it touches (delivered, version,
-- updated_at). Those updates are HOT (a new row version on the same page, no index entries)
-- only while no index covers a column they change. 0002 keyed the callback index on
-- updated_at, which made every counter update non-HOT: a new entry in each of the orders
-- indexes, and bloat for vacuum (`tally bench`: 0 HOT updates of orders out of 371).
-- Key it on id instead: the rows it covers (a callback due and not yet enqueued) are a
-- handful at any time, and the enqueue statement sorts them by updated_at itself.
-- `engine::order_counter_updates_stay_hot` guards this.
DROP INDEX orders_callback_due_idx;
CREATE INDEX orders_callback_due_idx ON orders (id)
    WHERE callback_url IS NOT NULL
      AND (status IN ('COMPLETED', 'PARTIAL', 'CANCELLED') OR (status = 'PROCESSING' AND needs_attention))
      AND notified_event IS DISTINCT FROM (CASE WHEN status = 'PROCESSING' THEN 'NEEDS_ATTENTION'
                                                ELSE status END);
