-- The claim walks orders in runs of 64 tasks instead of one task at a time.
--
-- Ordering by (priority, seq, id) interleaved every order task by task: a claim batch of
-- 1,000 over orders of 100 tasks took the first task of 1,000 different orders, so its
-- completion write updated 1,000 order rows, looked 1,000 orders up and scattered its audit
-- rows over 1,000 places in their index (`tally bench`, many orders: about 60 % of the
-- throughput of one big order). Ordering by (priority, seq / 64, id) takes up to 64
-- consecutive tasks of an order before moving on, so the same batch touches about 16
-- orders. Fairness is kept at the scale that matters: a new order's first 64 tasks still
-- come before every task of a running giant past its first 64, so a small order never
-- waits behind a big one; orders that fit in one run now finish in arrival order instead of
-- all together at the end.
-- `engine::claims_interleave_orders_and_priority_wins` and
-- `engine::a_claim_batch_takes_whole_runs_of_an_order` pin the order.
DROP INDEX order_tasks_claim_idx;
CREATE INDEX order_tasks_claim_idx ON order_tasks (priority DESC, (seq / 64), id)
    WHERE status IN ('PENDING', 'FAILED_RETRYING');
