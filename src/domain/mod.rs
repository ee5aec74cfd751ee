//! Pure domain rules: no I/O, no clocks, no randomness of their own.
//!
//! Everything here is deterministic so that it can be tested exhaustively:
//! the task and order state machines ([`state`]), the chunk planner ([`chunk`]),
//! the retry-delay function ([`retry`]) and the per-order invariants ([`invariants`]).
//! The store applies what these functions decide; it never decides on its own.

pub mod chunk;
pub mod invariants;
pub mod retry;
pub mod state;

pub use chunk::{ChunkPlan, PlanError};
pub use invariants::{OrderLedger, Violation};
pub use retry::Backoff;
pub use state::{
    ErrorClass, InvalidTransition, OrderStatus, TaskEvent, TaskSnapshot, TaskStatus, Transition,
};
