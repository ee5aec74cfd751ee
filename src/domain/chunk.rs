//! The chunk planner: an order of `quantity` units becomes `task_count` tasks whose sizes
//! differ by at most one unit and sum exactly to `quantity`.
//!
//! The plan is three numbers, so the generator can expand it set-based in SQL
//! (`generate_series`) without shipping millions of sizes over the wire: task `seq`
//! (0-based) carries `base + 1` units when `seq < remainder`, else `base`.

/// Largest chunk a task may carry (tasks store their size as a 32-bit integer).
pub const CHUNK_SIZE_MAX: u32 = 1_000_000;
/// Largest order accepted, in units.
pub const QUANTITY_MAX: u64 = 1_000_000_000_000;
/// Largest number of tasks one order may fan out into.
pub const TASKS_PER_ORDER_MAX: u64 = 5_000_000;

/// How an order is cut into tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPlan {
    /// Number of tasks: `ceil(quantity / chunk_size)`.
    pub task_count: u32,
    /// Units in every task, before the remainder is spread.
    pub base: u32,
    /// The first `remainder` tasks carry one unit more than `base`.
    pub remainder: u32,
}

/// Why a quantity/chunk size pair cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("quantity must be between 1 and {QUANTITY_MAX}, got {0}")]
    Quantity(u64),
    #[error("chunk_size must be between 1 and {CHUNK_SIZE_MAX}, got {0}")]
    ChunkSize(u64),
    #[error(
        "quantity {quantity} at chunk_size {chunk_size} makes {tasks} tasks; at most {TASKS_PER_ORDER_MAX} are allowed (raise chunk_size)"
    )]
    TooManyTasks {
        quantity: u64,
        chunk_size: u64,
        tasks: u64,
    },
}

impl ChunkPlan {
    /// Plans `quantity` units in chunks of at most `chunk_size`.
    pub fn new(quantity: u64, chunk_size: u64) -> Result<Self, PlanError> {
        if quantity == 0 || quantity > QUANTITY_MAX {
            return Err(PlanError::Quantity(quantity));
        }
        if chunk_size == 0 || chunk_size > u64::from(CHUNK_SIZE_MAX) {
            return Err(PlanError::ChunkSize(chunk_size));
        }
        let tasks = quantity.div_ceil(chunk_size);
        if tasks > TASKS_PER_ORDER_MAX {
            return Err(PlanError::TooManyTasks {
                quantity,
                chunk_size,
                tasks,
            });
        }
        let base = quantity / tasks;
        let remainder = quantity % tasks;
        // base <= chunk_size <= CHUNK_SIZE_MAX and remainder < tasks <= TASKS_PER_ORDER_MAX.
        Ok(Self {
            task_count: u32::try_from(tasks).expect("bounded by TASKS_PER_ORDER_MAX"),
            base: u32::try_from(base).expect("bounded by CHUNK_SIZE_MAX"),
            remainder: u32::try_from(remainder).expect("bounded by task count"),
        })
    }

    /// Units carried by task `seq` (0-based). Panics if `seq` is outside the plan.
    pub fn size_of(&self, seq: u32) -> u32 {
        assert!(
            seq < self.task_count,
            "seq {seq} outside plan of {}",
            self.task_count
        );
        if seq < self.remainder {
            self.base + 1
        } else {
            self.base
        }
    }

    /// All task sizes in `seq` order.
    pub fn sizes(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.task_count).map(|seq| self.size_of(seq))
    }

    /// Total units planned; equals the order's quantity by construction.
    pub fn total(&self) -> u64 {
        u64::from(self.task_count) * u64::from(self.base) + u64::from(self.remainder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fifteen_thousand_units_make_38_tasks_of_about_400() {
        let plan = ChunkPlan::new(15_000, 400).unwrap();
        assert_eq!(plan.task_count, 38);
        let sizes: Vec<u32> = plan.sizes().collect();
        assert_eq!(sizes.iter().map(|&s| u64::from(s)).sum::<u64>(), 15_000);
        assert_eq!(*sizes.iter().max().unwrap(), 395);
        assert_eq!(*sizes.iter().min().unwrap(), 394);
        assert_eq!(sizes.iter().filter(|&&s| s == 395).count(), 28);
    }

    #[test]
    fn one_unit_is_one_task() {
        let plan = ChunkPlan::new(1, 400).unwrap();
        assert_eq!((plan.task_count, plan.base, plan.remainder), (1, 1, 0));
    }

    #[test]
    fn a_billion_units_plan_without_overflow() {
        let plan = ChunkPlan::new(1_000_000_000, 400).unwrap();
        assert_eq!(plan.task_count, 2_500_000);
        assert_eq!(plan.total(), 1_000_000_000);
        assert_eq!(plan.size_of(plan.task_count - 1), 400);
    }

    #[test]
    fn bad_inputs_are_named() {
        assert_eq!(ChunkPlan::new(0, 400), Err(PlanError::Quantity(0)));
        assert_eq!(ChunkPlan::new(10, 0), Err(PlanError::ChunkSize(0)));
        assert!(matches!(
            ChunkPlan::new(1_000_000_000, 1),
            Err(PlanError::TooManyTasks { .. })
        ));
        assert!(
            ChunkPlan::new(10, 0)
                .unwrap_err()
                .to_string()
                .contains("chunk_size")
        );
    }

    proptest! {
        #[test]
        fn sizes_sum_exactly_and_differ_by_at_most_one(
            quantity in 1u64..=1_000_000_000,
            chunk in 1u64..=CHUNK_SIZE_MAX as u64,
        ) {
            prop_assume!(quantity.div_ceil(chunk) <= 200_000);
            let plan = ChunkPlan::new(quantity, chunk).unwrap();
            let sizes: Vec<u32> = plan.sizes().collect();
            prop_assert_eq!(sizes.len() as u64, quantity.div_ceil(chunk));
            prop_assert_eq!(sizes.iter().map(|&s| u64::from(s)).sum::<u64>(), quantity);
            let max = *sizes.iter().max().unwrap();
            let min = *sizes.iter().min().unwrap();
            prop_assert!(max - min <= 1);
            prop_assert!(u64::from(max) <= chunk);
            prop_assert!(min >= 1);
            // Larger chunks first: the plan is a deterministic, sorted layout.
            prop_assert!(sizes.windows(2).all(|w| w[0] >= w[1]));
        }

        #[test]
        fn totals_hold_for_huge_orders_without_materialising(
            quantity in 1u64..=QUANTITY_MAX,
            chunk in 1u64..=CHUNK_SIZE_MAX as u64,
        ) {
            match ChunkPlan::new(quantity, chunk) {
                Ok(plan) => {
                    prop_assert_eq!(plan.total(), quantity);
                    prop_assert!(plan.remainder < plan.task_count);
                    prop_assert!(u64::from(plan.base) + u64::from(plan.remainder > 0) <= chunk);
                }
                Err(PlanError::TooManyTasks { tasks, .. }) => prop_assert!(tasks > TASKS_PER_ORDER_MAX),
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }
}
