//! The task and order state machines: one pure, deterministic function each.
//!
//! ```text
//! PENDING ──claim──► EXECUTING ──delivered──► COMPLETED
//!    ▲                  │ │ └──handed back / lease expired (attempts left)──┐
//!    │                  │ └─failure, retryable, attempts left─► FAILED_RETRYING ──claim──► EXECUTING
//!    │                  └─attempts exhausted / ValidationError─► FAILED_PERMANENT (dead letter)
//!    └───────────── handed back before any attempt counted ◄──────────┘
//! FAILED_PERMANENT ──replayed (operator)──► FAILED_RETRYING
//! any non-final state ──cancelled──► CANCELLED
//! ```
//!
//! [`decide`] returns everything the store must write for a transition (next status,
//! attempt count, unit deltas for the order's counters, when the task may be claimed next,
//! the audit reason), so the store applies a decision and never makes one.

use std::fmt;
use std::time::Duration;

use super::retry::Backoff;

/// A task's status, stored upper-case exactly as operators query it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskStatus {
    Pending,
    Executing,
    Completed,
    FailedRetrying,
    FailedPermanent,
    Cancelled,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 6] = [
        TaskStatus::Pending,
        TaskStatus::Executing,
        TaskStatus::Completed,
        TaskStatus::FailedRetrying,
        TaskStatus::FailedPermanent,
        TaskStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "PENDING",
            TaskStatus::Executing => "EXECUTING",
            TaskStatus::Completed => "COMPLETED",
            TaskStatus::FailedRetrying => "FAILED_RETRYING",
            TaskStatus::FailedPermanent => "FAILED_PERMANENT",
            TaskStatus::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// No event but an operator's replay leaves a final state.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::FailedPermanent | TaskStatus::Cancelled
        )
    }

    /// Units of a task in this state still count as outstanding.
    pub fn is_open(self) -> bool {
        matches!(
            self,
            TaskStatus::Pending | TaskStatus::Executing | TaskStatus::FailedRetrying
        )
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error classes from the runbooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Connection refused/reset, 5xx: retryable.
    NetworkError,
    /// The attempt ran past its timeout: retryable.
    TimeoutError,
    /// The handler rejected the task as invalid: permanent at once.
    ValidationError,
    /// The receiver asked us to slow down: retry at its Retry-After.
    RateLimited,
    /// Infrastructure trouble on our side: the task is handed back, no attempt burned.
    DatabaseError,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 5] = [
        ErrorClass::NetworkError,
        ErrorClass::TimeoutError,
        ErrorClass::ValidationError,
        ErrorClass::RateLimited,
        ErrorClass::DatabaseError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::NetworkError => "NetworkError",
            ErrorClass::TimeoutError => "TimeoutError",
            ErrorClass::ValidationError => "ValidationError",
            ErrorClass::RateLimited => "RateLimited",
            ErrorClass::DatabaseError => "DatabaseError",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`decide`] needs to know about a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskSnapshot {
    pub status: TaskStatus,
    /// Attempts started so far, including the one executing now.
    pub attempts: u32,
    pub max_attempts: u32,
    pub quantity: u32,
    /// Units delivered by earlier (partial) attempts.
    pub delivered: u32,
}

impl TaskSnapshot {
    pub fn remaining(&self) -> u32 {
        self.quantity.saturating_sub(self.delivered)
    }
}

/// Something that happened to a task.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskEvent {
    /// A worker claimed it.
    Claimed,
    /// The handler delivered `units` of the remaining units (fewer means a partial delivery).
    Delivered { units: u32 },
    /// The handler failed; `retry_in` is the receiver's Retry-After, if it sent one.
    Failed {
        class: ErrorClass,
        retry_in: Option<Duration>,
    },
    /// The worker is shutting down and did not run (or finish) the attempt.
    HandedBack,
    /// The sweeper found the claim's lease expired: the worker is presumed dead.
    LeaseExpired,
    /// The order was cancelled (or an operator accepted a shortfall).
    Cancelled,
    /// An operator replays a dead-lettered task with a fresh set of attempts.
    Replayed,
}

impl TaskEvent {
    fn name(&self) -> &'static str {
        match self {
            TaskEvent::Claimed => "claimed",
            TaskEvent::Delivered { .. } => "delivered",
            TaskEvent::Failed { .. } => "failed",
            TaskEvent::HandedBack => HANDED_BACK,
            TaskEvent::LeaseExpired => "lease_expired",
            TaskEvent::Cancelled => "cancelled",
            TaskEvent::Replayed => "replayed",
        }
    }
}

/// When a task may next be claimed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RetryAt {
    /// Leave `retry_after` as it is.
    Unchanged,
    /// Claimable at once.
    Now,
    /// Claimable after this delay, measured from the database's `now()`.
    After(Duration),
}

/// Everything the store writes for one transition.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub from: TaskStatus,
    pub to: TaskStatus,
    /// The task's attempt count after the transition.
    pub attempts: u32,
    /// Units newly delivered (added to the task and to the order).
    pub delivered_delta: u32,
    /// Change of the order's `failed_permanent_units`.
    pub failed_units_delta: i64,
    /// Change of the order's `cancelled_units`.
    pub cancelled_units_delta: i64,
    pub retry_at: RetryAt,
    /// Audit `transition_reason`.
    pub reason: &'static str,
    pub error_class: Option<ErrorClass>,
}

impl Transition {
    /// A hand-back returns the claim without counting the attempt: not a processed outcome.
    pub fn is_hand_back(&self) -> bool {
        self.reason == HANDED_BACK
    }
}

const HANDED_BACK: &str = "handed_back";

/// An event that cannot happen in the task's state: a programming or fencing error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task in state {from} cannot take event {event}")]
pub struct InvalidTransition {
    pub from: &'static str,
    pub event: &'static str,
}

/// The task state machine. `draw` is a uniform random number in `[0, 1)` for jitter.
pub fn decide(
    task: &TaskSnapshot,
    event: &TaskEvent,
    backoff: &Backoff,
    draw: f64,
) -> Result<Transition, InvalidTransition> {
    use TaskStatus::*;
    let invalid = || InvalidTransition {
        from: task.status.as_str(),
        event: event.name(),
    };
    let base = Transition {
        from: task.status,
        to: task.status,
        attempts: task.attempts,
        delivered_delta: 0,
        failed_units_delta: 0,
        cancelled_units_delta: 0,
        retry_at: RetryAt::Unchanged,
        reason: event.name(),
        error_class: None,
    };
    let remaining = task.remaining();
    let exhausted = task.attempts >= task.max_attempts;
    // A failed attempt: retry later, or dead-letter what is still outstanding.
    let retry_or_dead =
        |t: Transition, delivered_now: u32, class: Option<ErrorClass>, delay: Duration| {
            if exhausted || class == Some(ErrorClass::ValidationError) {
                Transition {
                    to: FailedPermanent,
                    failed_units_delta: i64::from(remaining - delivered_now),
                    retry_at: RetryAt::Unchanged,
                    reason: "dead_lettered",
                    error_class: class,
                    ..t
                }
            } else {
                Transition {
                    to: FailedRetrying,
                    retry_at: RetryAt::After(delay),
                    reason: "retry_scheduled",
                    error_class: class,
                    ..t
                }
            }
        };

    match (task.status, event) {
        (Pending | FailedRetrying, TaskEvent::Claimed) => {
            if exhausted {
                return Err(invalid());
            }
            Ok(Transition {
                to: Executing,
                attempts: task.attempts + 1,
                reason: "claimed",
                ..base
            })
        }
        (Executing, TaskEvent::Delivered { units }) => {
            let units = (*units).min(remaining);
            let t = Transition {
                delivered_delta: units,
                ..base
            };
            if units == remaining {
                Ok(Transition {
                    to: Completed,
                    reason: "delivered",
                    ..t
                })
            } else {
                // Partial delivery: the remainder is re-queued like a retryable failure.
                let mut t = retry_or_dead(t, units, None, backoff.delay(task.attempts, draw));
                if t.to == FailedRetrying {
                    t.reason = "partial_delivery";
                }
                Ok(t)
            }
        }
        (Executing, TaskEvent::Failed { class, retry_in }) => match class {
            ErrorClass::DatabaseError => Ok(hand_back(task, base)),
            _ => {
                let delay = match (class, retry_in) {
                    (ErrorClass::RateLimited, Some(d)) => (*d).min(backoff.cap()),
                    _ => backoff.delay(task.attempts, draw),
                };
                Ok(retry_or_dead(base, 0, Some(*class), delay))
            }
        },
        (Executing, TaskEvent::HandedBack) => Ok(hand_back(task, base)),
        (Executing, TaskEvent::LeaseExpired) => {
            // The attempt counts (the handler may have run, and a task that kills its
            // worker must not loop forever), but the retry is immediate: it was not the
            // receiver that failed.
            let mut t = retry_or_dead(base, 0, None, Duration::ZERO);
            if t.to == FailedRetrying {
                t.retry_at = RetryAt::Now;
            }
            t.reason = "orphan_recovered";
            Ok(t)
        }
        (Pending | Executing | FailedRetrying, TaskEvent::Cancelled) => Ok(Transition {
            to: Cancelled,
            cancelled_units_delta: i64::from(remaining),
            reason: "cancelled",
            ..base
        }),
        (FailedPermanent, TaskEvent::Replayed) => Ok(Transition {
            to: FailedRetrying,
            attempts: 0,
            failed_units_delta: -i64::from(remaining),
            retry_at: RetryAt::Now,
            reason: "replayed",
            ..base
        }),
        _ => Err(invalid()),
    }
}

/// Give a claimed task back without counting the attempt.
fn hand_back(task: &TaskSnapshot, base: Transition) -> Transition {
    let attempts = task.attempts.saturating_sub(1);
    Transition {
        to: if attempts == 0 {
            TaskStatus::Pending
        } else {
            TaskStatus::FailedRetrying
        },
        attempts,
        retry_at: RetryAt::Now,
        reason: HANDED_BACK,
        ..base
    }
}

/// An order's status, stored upper-case exactly as operators query it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OrderStatus {
    Pending,
    Processing,
    Completed,
    Partial,
    Cancelled,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 5] = [
        OrderStatus::Pending,
        OrderStatus::Processing,
        OrderStatus::Completed,
        OrderStatus::Partial,
        OrderStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "PENDING",
            OrderStatus::Processing => "PROCESSING",
            OrderStatus::Completed => "COMPLETED",
            OrderStatus::Partial => "PARTIAL",
            OrderStatus::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            OrderStatus::Completed | OrderStatus::Partial | OrderStatus::Cancelled
        )
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An order's unit counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OrderUnits {
    pub quantity: u64,
    pub delivered: u64,
    pub failed: u64,
    pub cancelled: u64,
}

/// Something that happened to an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderEvent {
    /// Its tasks were generated.
    Generated,
    /// Its counters changed to these values.
    Progress(OrderUnits),
    /// An operator accepted the shortfall.
    AcceptPartial,
    /// Cancelled by a client or an operator.
    Cancel,
}

/// The order state machine. `Ok(None)` means the event changes nothing.
pub fn decide_order(
    status: OrderStatus,
    event: OrderEvent,
) -> Result<Option<OrderStatus>, InvalidTransition> {
    use OrderStatus::*;
    let invalid = || InvalidTransition {
        from: status.as_str(),
        event: match event {
            OrderEvent::Generated => "generated",
            OrderEvent::Progress(_) => "progress",
            OrderEvent::AcceptPartial => "accept_partial",
            OrderEvent::Cancel => "cancel",
        },
    };
    match (status, event) {
        (Pending, OrderEvent::Generated) => Ok(Some(Processing)),
        (Processing, OrderEvent::Progress(u)) if u.delivered == u.quantity => Ok(Some(Completed)),
        (Processing, OrderEvent::Progress(_)) => Ok(None),
        // Late progress on a finished order (a cancelled order's last in-flight task) is recorded
        // in the counters but does not reopen the order.
        (Completed | Partial | Cancelled, OrderEvent::Progress(_)) => Ok(None),
        (Processing, OrderEvent::AcceptPartial) => Ok(Some(Partial)),
        (Pending | Processing, OrderEvent::Cancel) => Ok(Some(Cancelled)),
        _ => Err(invalid()),
    }
}

/// An order whose remaining tasks are all dead-lettered stays PROCESSING and needs an operator.
pub fn needs_attention(status: OrderStatus, u: OrderUnits) -> bool {
    status == OrderStatus::Processing
        && u.failed > 0
        && u.delivered + u.failed + u.cancelled == u.quantity
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn snap(status: TaskStatus, attempts: u32) -> TaskSnapshot {
        TaskSnapshot {
            status,
            attempts,
            max_attempts: 3,
            quantity: 400,
            delivered: 0,
        }
    }

    fn events() -> Vec<TaskEvent> {
        let mut v = vec![
            TaskEvent::Claimed,
            TaskEvent::Delivered { units: 400 },
            TaskEvent::Delivered { units: 150 },
            TaskEvent::Delivered { units: 0 },
            TaskEvent::HandedBack,
            TaskEvent::LeaseExpired,
            TaskEvent::Cancelled,
            TaskEvent::Replayed,
        ];
        for class in ErrorClass::ALL {
            v.push(TaskEvent::Failed {
                class,
                retry_in: None,
            });
            v.push(TaskEvent::Failed {
                class,
                retry_in: Some(Duration::from_secs(7)),
            });
        }
        v
    }

    fn go(s: TaskSnapshot, e: TaskEvent) -> Transition {
        decide(&s, &e, &Backoff::DEFAULT, 0.0).unwrap()
    }

    /// Every (state, attempts, event) pair: either a documented transition or an error,
    /// and every transition keeps the task's units conserved.
    #[test]
    fn exhaustive_table_conserves_units_and_respects_the_diagram() {
        let allowed: &[(TaskStatus, TaskStatus)] = &[
            (TaskStatus::Pending, TaskStatus::Executing),
            (TaskStatus::FailedRetrying, TaskStatus::Executing),
            (TaskStatus::Executing, TaskStatus::Completed),
            (TaskStatus::Executing, TaskStatus::FailedRetrying),
            (TaskStatus::Executing, TaskStatus::FailedPermanent),
            (TaskStatus::Executing, TaskStatus::Pending),
            (TaskStatus::FailedPermanent, TaskStatus::FailedRetrying),
            (TaskStatus::Pending, TaskStatus::Cancelled),
            (TaskStatus::Executing, TaskStatus::Cancelled),
            (TaskStatus::FailedRetrying, TaskStatus::Cancelled),
        ];
        let mut seen = std::collections::HashSet::new();
        for status in TaskStatus::ALL {
            for attempts in 0..=3 {
                if status == TaskStatus::Executing && attempts == 0 {
                    continue; // the schema forbids it
                }
                for event in events() {
                    let s = snap(status, attempts);
                    match decide(&s, &event, &Backoff::DEFAULT, 0.5) {
                        Ok(t) => {
                            assert!(
                                allowed.contains(&(t.from, t.to)),
                                "{status} --{event:?}--> {}",
                                t.to
                            );
                            seen.insert((t.from, t.to));
                            assert!(t.attempts <= s.max_attempts);
                            // Units: delivered + failed + cancelled + outstanding is unchanged.
                            let before_out = if status.is_open() {
                                i64::from(s.remaining())
                            } else {
                                0
                            };
                            let after_out = if t.to.is_open() {
                                i64::from(s.remaining() - t.delivered_delta)
                            } else {
                                0
                            };
                            let before_failed = if status == TaskStatus::FailedPermanent {
                                i64::from(s.remaining())
                            } else {
                                0
                            };
                            assert_eq!(
                                before_out + before_failed,
                                after_out
                                    + i64::from(t.delivered_delta)
                                    + before_failed
                                    + t.failed_units_delta
                                    + t.cancelled_units_delta,
                                "{status} --{event:?}--> {}",
                                t.to
                            );
                        }
                        Err(e) => assert_eq!(e.from, status.as_str()),
                    }
                }
            }
        }
        assert_eq!(
            seen.len(),
            allowed.len(),
            "every documented edge is reachable"
        );
    }

    #[test]
    fn final_states_accept_nothing_but_replay() {
        let finals: Vec<TaskStatus> = TaskStatus::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .collect();
        assert_eq!(
            finals,
            [
                TaskStatus::Completed,
                TaskStatus::FailedPermanent,
                TaskStatus::Cancelled
            ]
        );
        for status in finals {
            for event in events() {
                let r = decide(&snap(status, 2), &event, &Backoff::DEFAULT, 0.0);
                assert_eq!(
                    r.is_ok(),
                    status == TaskStatus::FailedPermanent && event == TaskEvent::Replayed
                );
            }
        }
    }

    #[test]
    fn claim_counts_an_attempt_and_refuses_exhausted_tasks() {
        let t = go(snap(TaskStatus::Pending, 0), TaskEvent::Claimed);
        assert_eq!((t.to, t.attempts), (TaskStatus::Executing, 1));
        assert!(
            decide(
                &snap(TaskStatus::FailedRetrying, 3),
                &TaskEvent::Claimed,
                &Backoff::DEFAULT,
                0.0
            )
            .is_err()
        );
    }

    #[test]
    fn transient_failure_backs_off_then_dead_letters() {
        let t = go(
            snap(TaskStatus::Executing, 1),
            TaskEvent::Failed {
                class: ErrorClass::NetworkError,
                retry_in: None,
            },
        );
        assert_eq!(t.to, TaskStatus::FailedRetrying);
        assert_eq!(t.retry_at, RetryAt::After(Duration::from_secs(5)));
        let t = go(
            snap(TaskStatus::Executing, 2),
            TaskEvent::Failed {
                class: ErrorClass::TimeoutError,
                retry_in: None,
            },
        );
        assert_eq!(t.retry_at, RetryAt::After(Duration::from_secs(10)));
        let t = go(
            snap(TaskStatus::Executing, 3),
            TaskEvent::Failed {
                class: ErrorClass::NetworkError,
                retry_in: None,
            },
        );
        assert_eq!(
            (t.to, t.failed_units_delta, t.reason),
            (TaskStatus::FailedPermanent, 400, "dead_lettered")
        );
    }

    #[test]
    fn validation_error_is_permanent_at_once() {
        let t = go(
            snap(TaskStatus::Executing, 1),
            TaskEvent::Failed {
                class: ErrorClass::ValidationError,
                retry_in: None,
            },
        );
        assert_eq!(t.to, TaskStatus::FailedPermanent);
        assert_eq!(t.error_class, Some(ErrorClass::ValidationError));
    }

    #[test]
    fn rate_limited_honours_retry_after() {
        let t = go(
            snap(TaskStatus::Executing, 1),
            TaskEvent::Failed {
                class: ErrorClass::RateLimited,
                retry_in: Some(Duration::from_secs(42)),
            },
        );
        assert_eq!(t.retry_at, RetryAt::After(Duration::from_secs(42)));
    }

    #[test]
    fn hand_back_and_database_errors_refund_the_attempt() {
        for e in [
            TaskEvent::HandedBack,
            TaskEvent::Failed {
                class: ErrorClass::DatabaseError,
                retry_in: None,
            },
        ] {
            let t = go(snap(TaskStatus::Executing, 1), e.clone());
            assert_eq!(
                (t.to, t.attempts, t.retry_at),
                (TaskStatus::Pending, 0, RetryAt::Now)
            );
            let t = go(snap(TaskStatus::Executing, 3), e);
            assert_eq!((t.to, t.attempts), (TaskStatus::FailedRetrying, 2));
        }
    }

    #[test]
    fn orphan_retries_at_once_until_attempts_run_out() {
        let t = go(snap(TaskStatus::Executing, 1), TaskEvent::LeaseExpired);
        assert_eq!(
            (t.to, t.retry_at, t.reason),
            (TaskStatus::FailedRetrying, RetryAt::Now, "orphan_recovered")
        );
        let t = go(snap(TaskStatus::Executing, 3), TaskEvent::LeaseExpired);
        assert_eq!(
            (t.to, t.reason),
            (TaskStatus::FailedPermanent, "orphan_recovered")
        );
    }

    #[test]
    fn partial_delivery_records_units_and_requeues_the_rest() {
        let t = go(
            snap(TaskStatus::Executing, 1),
            TaskEvent::Delivered { units: 150 },
        );
        assert_eq!(
            (t.to, t.delivered_delta, t.reason),
            (TaskStatus::FailedRetrying, 150, "partial_delivery")
        );
        let s = TaskSnapshot {
            delivered: 150,
            ..snap(TaskStatus::Executing, 3)
        };
        let t = go(s, TaskEvent::Delivered { units: 50 });
        assert_eq!(
            (t.to, t.delivered_delta, t.failed_units_delta),
            (TaskStatus::FailedPermanent, 50, 200)
        );
        // Over-delivery is clamped: units cannot be counted twice.
        let t = go(s, TaskEvent::Delivered { units: 10_000 });
        assert_eq!((t.to, t.delivered_delta), (TaskStatus::Completed, 250));
    }

    #[test]
    fn order_completes_only_when_every_unit_is_delivered() {
        let u = |d, f| OrderUnits {
            quantity: 100,
            delivered: d,
            failed: f,
            cancelled: 0,
        };
        assert_eq!(
            decide_order(OrderStatus::Processing, OrderEvent::Progress(u(100, 0))),
            Ok(Some(OrderStatus::Completed))
        );
        assert_eq!(
            decide_order(OrderStatus::Processing, OrderEvent::Progress(u(99, 1))),
            Ok(None)
        );
        assert!(needs_attention(OrderStatus::Processing, u(99, 1)));
        assert!(!needs_attention(OrderStatus::Processing, u(98, 1)));
        assert_eq!(
            decide_order(OrderStatus::Pending, OrderEvent::Generated),
            Ok(Some(OrderStatus::Processing))
        );
        assert!(decide_order(OrderStatus::Completed, OrderEvent::Cancel).is_err());
        assert!(decide_order(OrderStatus::Processing, OrderEvent::Generated).is_err());
        assert_eq!(
            decide_order(OrderStatus::Processing, OrderEvent::AcceptPartial),
            Ok(Some(OrderStatus::Partial))
        );
    }

    #[test]
    fn statuses_round_trip_their_strings() {
        for s in TaskStatus::ALL {
            assert_eq!(TaskStatus::parse(s.as_str()), Some(s));
        }
        for s in OrderStatus::ALL {
            assert_eq!(OrderStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(TaskStatus::parse("pending"), None);
    }

    proptest! {
        /// Random event sequences from a fresh task: units are conserved, attempts stay bounded,
        /// and the task ends final only through documented edges.
        #[test]
        fn random_histories_conserve_units(
            quantity in 1u32..=1000,
            max_attempts in 1u32..=5,
            script in proptest::collection::vec((0usize..9, 0u32..=1200, 0.0f64..1.0), 0..40),
        ) {
            let mut s = TaskSnapshot { status: TaskStatus::Pending, attempts: 0, max_attempts, quantity, delivered: 0 };
            let (mut delivered, mut failed, mut cancelled) = (0i64, 0i64, 0i64);
            for (pick, units, draw) in script {
                let event = match pick {
                    0 | 1 => TaskEvent::Claimed,
                    2 => TaskEvent::Delivered { units },
                    3 => TaskEvent::Failed { class: ErrorClass::NetworkError, retry_in: None },
                    4 => TaskEvent::Failed { class: ErrorClass::ValidationError, retry_in: None },
                    5 => TaskEvent::HandedBack,
                    6 => TaskEvent::LeaseExpired,
                    7 => TaskEvent::Replayed,
                    _ => TaskEvent::Cancelled,
                };
                if let Ok(t) = decide(&s, &event, &Backoff::DEFAULT, draw) {
                    delivered += i64::from(t.delivered_delta);
                    failed += t.failed_units_delta;
                    cancelled += t.cancelled_units_delta;
                    s = TaskSnapshot { status: t.to, attempts: t.attempts, delivered: s.delivered + t.delivered_delta, ..s };
                    prop_assert!(s.attempts <= s.max_attempts);
                    prop_assert!(s.delivered <= s.quantity);
                }
                let outstanding = if s.status.is_open() { i64::from(s.remaining()) } else { 0 };
                prop_assert_eq!(delivered + failed + cancelled + outstanding, i64::from(quantity));
                prop_assert_eq!(delivered, i64::from(s.delivered));
                prop_assert!(failed >= 0 && cancelled >= 0);
            }
        }
    }
}
