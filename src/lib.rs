//! # Tally
//!
//! A PostgreSQL-native order delivery engine. An order says "deliver N units of kind K to
//! target T"; Tally fans it out into chunked tasks, workers claim batches of them with
//! `FOR UPDATE SKIP LOCKED`, run each through its kind's handler, retry transient failures
//! with backoff, dead-letter permanent ones, and a leader-elected sweeper rescues orphans
//! and keeps proving, per order, that delivered equals expected.
//!
//! ## Map of the crate
//!
//! Dependencies flow one way: `domain → store → {generator, worker, leader → sweeper} → app`.
//!
//! - [`domain`]: pure rules — task/order state machines, chunk planner, retry delay,
//!   invariants. No I/O.
//! - [`store`]: the only place with SQL; every statement bounded, fenced, and timed out.
//! - [`intake`]: validates and plans an order request.
//! - [`generator`]: PENDING orders → tasks, set-based.
//! - [`worker`]: claim loop, executor (no SQL) and batched, fenced completer.
//! - [`handler`]: the `Handler` trait and the built-in `simulate` handler.
//! - [`leader`] and [`sweeper`]: election, and leader-only maintenance (rescue, audit,
//!   finalise, stuck orders, retention).
//! - [`app`]: composition root; [`config`]: every setting; [`demo`], [`bench`]: the
//!   `tally demo` and `tally bench` commands; [`pgtemp`]: throwaway PostgreSQL clusters.

pub mod api;
pub mod app;
pub mod bench;
pub mod callbacks;
pub mod cli;
pub mod config;
pub mod demo;
pub mod domain;
pub mod generator;
pub mod handler;
pub mod http;
pub mod intake;
pub mod kinds;
pub mod leader;
pub mod metrics;
pub mod pgtemp;
pub mod shutdown;
pub mod stats;
pub mod store;
pub mod sweeper;
pub mod telemetry;
pub mod worker;
