//! Named fault points on the write path. Tests arm a point in a shared `FaultPlan` to make it fail in-process;
//! crash tests set `BOS_CRASH_POINT=<name>` so the process aborts there (no unwinding, no destructors: the closest
//! thing to a power cut the test can cause).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};

/// Where a unit of work or the relay can be made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// The inbox row is inserted, nothing else yet.
    AfterInbox,
    /// The batch compare-and-set succeeded; child rows and the outbox are not written yet.
    AfterCas,
    /// Every row of the unit is written; the commit has not been sent.
    BeforeCommit,
    /// The unit committed; the caller has not been answered.
    AfterCommit,
    /// The relay claimed outbox rows and has not published them.
    AfterClaim,
    /// The relay published a row and has not marked it published.
    AfterPublishBeforeMark,
}

impl FaultPoint {
    pub const ALL: [FaultPoint; 6] = [
        FaultPoint::AfterInbox,
        FaultPoint::AfterCas,
        FaultPoint::BeforeCommit,
        FaultPoint::AfterCommit,
        FaultPoint::AfterClaim,
        FaultPoint::AfterPublishBeforeMark,
    ];

    /// The name `BOS_CRASH_POINT` takes.
    pub fn name(self) -> &'static str {
        match self {
            FaultPoint::AfterInbox => "AfterInbox",
            FaultPoint::AfterCas => "AfterCas",
            FaultPoint::BeforeCommit => "BeforeCommit",
            FaultPoint::AfterCommit => "AfterCommit",
            FaultPoint::AfterClaim => "AfterClaim",
            FaultPoint::AfterPublishBeforeMark => "AfterPublishBeforeMark",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name.trim())
    }
}

/// The error an armed point returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("injected fault at {}", .0.name())]
pub struct InjectedFault(pub FaultPoint);

static CRASH_POINT: LazyLock<Option<FaultPoint>> = LazyLock::new(|| {
    std::env::var("BOS_CRASH_POINT")
        .ok()
        .and_then(|v| FaultPoint::from_name(&v))
});

/// `BOS_CRASH_AFTER_HITS=N` lets the crash point pass N times before aborting, so a crash test can aim at the
/// middle of a flow rather than its first unit of work.
static CRASH_AFTER_HITS: LazyLock<u64> = LazyLock::new(|| {
    std::env::var("BOS_CRASH_AFTER_HITS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
});

static CRASH_POINT_HITS: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Default)]
struct PlanState {
    /// How many more times each point fails; `u32::MAX` means always.
    armed: HashMap<FaultPoint, u32>,
    hits: HashMap<FaultPoint, u64>,
}

/// Shared by the store and the relay; unarmed it only counts hits.
#[derive(Debug, Default)]
pub struct FaultPlan {
    state: Mutex<PlanState>,
}

impl FaultPlan {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the next `times` passes through `point` fail.
    pub fn fail_times(&self, point: FaultPoint, times: u32) {
        self.with_state(|s| {
            s.armed.insert(point, times);
        });
    }

    pub fn fail_always(&self, point: FaultPoint) {
        self.fail_times(point, u32::MAX);
    }

    pub fn disarm(&self, point: FaultPoint) {
        self.with_state(|s| {
            s.armed.remove(&point);
        });
    }

    /// How often execution passed `point` (failing or not).
    pub fn hits(&self, point: FaultPoint) -> u64 {
        self.with_state(|s| s.hits.get(&point).copied().unwrap_or(0))
    }

    /// Called by the code at `point`: aborts the process if `BOS_CRASH_POINT` names it, fails if armed.
    pub fn hit(&self, point: FaultPoint) -> Result<(), InjectedFault> {
        if *CRASH_POINT == Some(point)
            && CRASH_POINT_HITS.fetch_add(1, Ordering::SeqCst) >= *CRASH_AFTER_HITS
        {
            eprintln!("BOS_CRASH_POINT={}: aborting", point.name());
            std::process::abort();
        }
        self.with_state(|s| {
            *s.hits.entry(point).or_default() += 1;
            match s.armed.get_mut(&point) {
                Some(0) | None => Ok(()),
                Some(n) => {
                    if *n != u32::MAX {
                        *n -= 1;
                    }
                    Err(InjectedFault(point))
                }
            }
        })
    }

    fn with_state<R>(&self, f: impl FnOnce(&mut PlanState) -> R) -> R {
        // A panic while holding this lock cannot leave the maps inconsistent, so a poisoned lock is still usable.
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn armed_point_fails_the_given_number_of_times_then_passes() {
        let plan = FaultPlan::new();
        assert_eq!(plan.hit(FaultPoint::AfterCas), Ok(()));
        plan.fail_times(FaultPoint::AfterCas, 2);
        assert_eq!(
            plan.hit(FaultPoint::AfterCas),
            Err(InjectedFault(FaultPoint::AfterCas))
        );
        assert_eq!(plan.hit(FaultPoint::BeforeCommit), Ok(()));
        assert_eq!(
            plan.hit(FaultPoint::AfterCas),
            Err(InjectedFault(FaultPoint::AfterCas))
        );
        assert_eq!(plan.hit(FaultPoint::AfterCas), Ok(()));
        assert_eq!(plan.hits(FaultPoint::AfterCas), 4);
    }

    #[test]
    fn names_round_trip() {
        for point in FaultPoint::ALL {
            assert_eq!(FaultPoint::from_name(point.name()), Some(point));
        }
        assert_eq!(FaultPoint::from_name("Nowhere"), None);
    }
}
