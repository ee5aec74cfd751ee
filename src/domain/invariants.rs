//! Per-order invariants, checked by the sweeper's auditor against one consistent snapshot
//! of an order row and the totals of its tasks.
//!
//! - Conservation: the generated tasks' quantities sum to the order's quantity, and
//!   delivered + failed_permanent + cancelled + outstanding = quantity.
//! - Accounting: the order's live counters equal what its tasks say.
//! - Completion: COMPLETED implies every unit delivered and no task open; an order whose
//!   units are all delivered is COMPLETED.

use serde::Serialize;

use super::state::OrderStatus;

/// An order's counters and the totals of its tasks, read in one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderLedger {
    pub status: OrderStatus,
    pub quantity: i64,
    /// The order row's live counters.
    pub delivered: i64,
    pub failed: i64,
    pub cancelled: i64,
    /// What the chunk plan says the order fans out into.
    pub planned_tasks: i64,
    /// Totals over the order's tasks.
    pub tasks: TaskTotals,
}

/// Sums over one order's tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TaskTotals {
    pub count: i64,
    pub quantity: i64,
    pub delivered: i64,
    /// Undelivered units of FAILED_PERMANENT tasks.
    pub failed: i64,
    /// Undelivered units of CANCELLED tasks.
    pub cancelled: i64,
    /// Undelivered units of PENDING, EXECUTING and FAILED_RETRYING tasks.
    pub outstanding: i64,
    /// Tasks in PENDING, EXECUTING or FAILED_RETRYING.
    pub open: i64,
}

/// One broken invariant, with the figures that show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "invariant", rename_all = "snake_case")]
pub enum Violation {
    /// The generated tasks do not add up to the order.
    TaskQuantity {
        expected: i64,
        tasks_sum: i64,
    },
    TaskCount {
        planned: i64,
        generated: i64,
    },
    /// delivered + failed + cancelled + outstanding differs from quantity.
    Conservation {
        quantity: i64,
        accounted: i64,
    },
    /// The order's live counters disagree with its tasks.
    Accounting {
        counter: &'static str,
        order: i64,
        tasks: i64,
    },
    /// COMPLETED without every unit delivered, or with open tasks.
    CompletedShort {
        delivered: i64,
        open_tasks: i64,
    },
    /// Every unit is delivered but the order was not finalised.
    NotFinalised,
    /// An order not yet generated already has tasks.
    TasksBeforeGeneration {
        tasks: i64,
    },
}

impl OrderLedger {
    /// Whether the order's tasks have been generated yet.
    fn generated(&self) -> bool {
        self.status != OrderStatus::Pending
    }

    /// Every invariant this ledger breaks; empty means the order is sound.
    pub fn check(&self) -> Vec<Violation> {
        let mut v = Vec::new();
        let t = &self.tasks;
        if !self.generated() {
            if t.count != 0 {
                v.push(Violation::TasksBeforeGeneration { tasks: t.count });
            }
            return v;
        }
        // A cancelled order may have been cancelled before generation: no tasks at all.
        let cancelled_before_generation = self.status == OrderStatus::Cancelled && t.count == 0;
        if !cancelled_before_generation {
            if t.quantity != self.quantity {
                v.push(Violation::TaskQuantity {
                    expected: self.quantity,
                    tasks_sum: t.quantity,
                });
            }
            if t.count != self.planned_tasks {
                v.push(Violation::TaskCount {
                    planned: self.planned_tasks,
                    generated: t.count,
                });
            }
            for (counter, order, tasks) in [
                ("delivered", self.delivered, t.delivered),
                ("failed_permanent_units", self.failed, t.failed),
                ("cancelled_units", self.cancelled, t.cancelled),
            ] {
                if order != tasks {
                    v.push(Violation::Accounting {
                        counter,
                        order,
                        tasks,
                    });
                }
            }
            let accounted = self.delivered + self.failed + self.cancelled + t.outstanding;
            if accounted != self.quantity {
                v.push(Violation::Conservation {
                    quantity: self.quantity,
                    accounted,
                });
            }
        }
        match self.status {
            OrderStatus::Completed if self.delivered != self.quantity || t.open != 0 => {
                v.push(Violation::CompletedShort {
                    delivered: self.delivered,
                    open_tasks: t.open,
                })
            }
            OrderStatus::Processing if self.delivered == self.quantity => {
                v.push(Violation::NotFinalised)
            }
            _ => {}
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sound() -> OrderLedger {
        OrderLedger {
            status: OrderStatus::Processing,
            quantity: 1000,
            delivered: 600,
            failed: 100,
            cancelled: 0,
            planned_tasks: 3,
            tasks: TaskTotals {
                count: 3,
                quantity: 1000,
                delivered: 600,
                failed: 100,
                cancelled: 0,
                outstanding: 300,
                open: 1,
            },
        }
    }

    #[test]
    fn a_sound_order_passes() {
        assert!(sound().check().is_empty());
    }

    #[test]
    fn a_double_counted_unit_is_caught_twice() {
        let mut l = sound();
        l.delivered += 1;
        let v = l.check();
        assert!(v.contains(&Violation::Accounting {
            counter: "delivered",
            order: 601,
            tasks: 600
        }));
        assert!(v.contains(&Violation::Conservation {
            quantity: 1000,
            accounted: 1001
        }));
    }

    #[test]
    fn a_lost_task_breaks_conservation() {
        let mut l = sound();
        l.tasks.count = 2;
        l.tasks.quantity = 700;
        l.tasks.outstanding = 0;
        l.tasks.open = 0;
        let v = l.check();
        assert!(
            v.iter()
                .any(|x| matches!(x, Violation::TaskQuantity { .. }))
        );
        assert!(v.iter().any(|x| matches!(x, Violation::TaskCount { .. })));
        assert!(
            v.iter()
                .any(|x| matches!(x, Violation::Conservation { .. }))
        );
    }

    #[test]
    fn completed_must_be_whole_and_whole_must_be_completed() {
        let mut l = sound();
        l.status = OrderStatus::Completed;
        assert!(
            l.check()
                .iter()
                .any(|x| matches!(x, Violation::CompletedShort { .. }))
        );
        let mut l = sound();
        l.delivered = 1000;
        l.failed = 0;
        l.tasks = TaskTotals {
            delivered: 1000,
            failed: 0,
            outstanding: 0,
            open: 0,
            ..l.tasks
        };
        assert_eq!(l.check(), vec![Violation::NotFinalised]);
        l.status = OrderStatus::Completed;
        assert!(l.check().is_empty());
    }

    #[test]
    fn pending_orders_have_no_tasks() {
        let mut l = sound();
        l.status = OrderStatus::Pending;
        assert_eq!(
            l.check(),
            vec![Violation::TasksBeforeGeneration { tasks: 3 }]
        );
        l.tasks = TaskTotals::default();
        assert!(l.check().is_empty());
    }

    #[test]
    fn violations_serialise_with_their_name() {
        let j = serde_json::to_string(&Violation::NotFinalised).unwrap();
        assert_eq!(j, r#"{"invariant":"not_finalised"}"#);
    }
}
