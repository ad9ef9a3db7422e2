//! Autoscaling decisions as pure functions: from a component's load, its
//! current replicas and the recommendations of the last minutes to the
//! replicas it should have, and why. No I/O here; `reconcile.rs` reads the
//! load from the pods' metrics and applies the decision.
//!
//! As Kubernetes' HPA: the recommendation is `ceil(load / target)` within
//! the bounds; a scale-up takes the lowest recommendation of its
//! stabilisation window (the load must stay high), a scale-down the highest
//! of its window (the load must stay low for the whole window), and
//! missing metrics hold the replicas where they are.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::crd::AutoscalingSpec;

/// The bounds and pace of one component's autoscaling.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub min: i32,
    pub max: i32,
    /// Load one pod should carry.
    pub target: f64,
    pub up_window: Duration,
    pub down_window: Duration,
    /// Pods added at most in one step.
    pub up_step: i32,
    /// Pods removed at most in one step.
    pub down_step: i32,
}

impl Policy {
    /// From the spec; `cap` lowers the maximum (jobs: the partition count);
    /// `down_step` is 1 for comets (each drains before the next goes).
    pub fn from_spec(spec: &AutoscalingSpec, cap: Option<i32>, down_step: i32) -> Policy {
        let max = cap.map_or(spec.max_replicas, |cap| spec.max_replicas.min(cap.max(1)));
        Policy {
            min: spec.min_replicas.min(max),
            max,
            target: spec.target.max(1) as f64,
            up_window: Duration::from_secs(u64::from(spec.scale_up_stabilization_seconds)),
            down_window: Duration::from_secs(u64::from(spec.scale_down_stabilization_seconds)),
            up_step: spec.max_step.max(1),
            down_step: down_step.max(1),
        }
    }
}

/// A component's load as read from its pods.
#[derive(Clone, Debug, PartialEq)]
pub struct Load {
    /// Summed over the pods that answered.
    pub total: f64,
    pub measured: usize,
    /// Ready pods.
    pub pods: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Up,
    Down,
    Hold,
}

impl Direction {
    pub fn label(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
            Direction::Hold => "hold",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub replicas: i32,
    pub direction: Direction,
    pub reason: String,
}

/// Recommendations of the last windows, oldest first, and since when
/// they have been collected.
#[derive(Debug, Default)]
pub struct History {
    since: Option<Instant>,
    recommendations: VecDeque<(Instant, i32)>,
}

/// Decides a component's replicas. `unit` names the load in reasons
/// ("connections"); `draining` says a removed pod has not finished
/// leaving, so no further scale-down starts.
pub fn decide(
    policy: &Policy,
    current: i32,
    load: Option<&Load>,
    draining: bool,
    history: &mut History,
    now: Instant,
    unit: &str,
) -> Decision {
    let hold = |reason: String| Decision {
        replicas: current,
        direction: Direction::Hold,
        reason,
    };
    if current < policy.min {
        return Decision {
            replicas: policy.min,
            direction: Direction::Up,
            reason: format!("{current} is below minReplicas {}", policy.min),
        };
    }
    if current > policy.max {
        return Decision {
            replicas: policy.max,
            direction: Direction::Down,
            reason: format!("{current} is above maxReplicas {}", policy.max),
        };
    }
    let Some(load) = load else {
        return hold("no metrics yet: holding".into());
    };
    if load.pods == 0 || load.measured < load.pods {
        return hold(format!(
            "metrics from {} of {} ready pods: holding",
            load.measured, load.pods
        ));
    }
    let wanted = ((load.total / policy.target).ceil() as i64).clamp(1, i64::from(i32::MAX)) as i32;
    let recommended = wanted.clamp(policy.min, policy.max);
    let keep = policy.up_window.max(policy.down_window);
    let since = *history.since.get_or_insert(now);
    history.recommendations.push_back((now, recommended));
    while history
        .recommendations
        .front()
        .is_some_and(|(at, _)| now.duration_since(*at) > keep)
    {
        history.recommendations.pop_front();
    }
    let within = |window: Duration| {
        history
            .recommendations
            .iter()
            .filter(move |(at, _)| now.duration_since(*at) <= window)
            .map(|(_, r)| *r)
    };
    let seen = format!(
        "{} {unit} over {} pods, target {} per pod",
        load.total, load.pods, policy.target
    );
    // How long recommendations have been collected: a window is judged
    // only once it is full, not on what was seen since a restart.
    let observed_for = now.duration_since(since);
    let up = within(policy.up_window).min().unwrap_or(recommended);
    if up > current {
        if observed_for < policy.up_window {
            return hold(format!(
                "{seen}: {up} wanted, waiting out the {:?} window",
                policy.up_window
            ));
        }
        let replicas = up.min(current + policy.up_step);
        return Decision {
            replicas,
            direction: Direction::Up,
            reason: format!("{seen}: {current} → {replicas}"),
        };
    }
    let down = within(policy.down_window).max().unwrap_or(recommended);
    if down < current {
        if observed_for < policy.down_window {
            return hold(format!(
                "{seen}: {down} would do, waiting out the {:?} window",
                policy.down_window
            ));
        }
        if draining {
            return hold(format!(
                "{seen}: {down} would do, a removed pod is still draining"
            ));
        }
        let replicas = down.max(current - policy.down_step);
        return Decision {
            replicas,
            direction: Direction::Down,
            reason: format!("{seen}: {current} → {replicas}"),
        };
    }
    if recommended < current {
        return hold(format!(
            "{seen}: {recommended} would do, but the last {:?} wanted {down}",
            policy.down_window
        ));
    }
    hold(format!("{seen}: {current} fit"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            min: 2,
            max: 6,
            target: 100.0,
            up_window: Duration::ZERO,
            down_window: Duration::from_secs(60),
            up_step: 2,
            down_step: 1,
        }
    }

    fn load(total: f64) -> Load {
        Load {
            total,
            measured: 3,
            pods: 3,
        }
    }

    /// Feeds loads at 10 s intervals; returns every decision's replicas.
    fn run(policy: &Policy, start: i32, steps: &[(f64, bool)]) -> Vec<i32> {
        run_every(Duration::from_secs(10), policy, start, steps)
    }

    fn run_every(
        interval: Duration,
        policy: &Policy,
        start: i32,
        steps: &[(f64, bool)],
    ) -> Vec<i32> {
        let mut history = History::default();
        let t0 = Instant::now();
        let mut current = start;
        steps
            .iter()
            .enumerate()
            .map(|(i, (total, draining))| {
                let now = t0 + interval * i as u32;
                let decision = decide(
                    policy,
                    current,
                    Some(&load(*total)),
                    *draining,
                    &mut history,
                    now,
                    "connections",
                );
                current = decision.replicas;
                current
            })
            .collect()
    }

    #[test]
    fn table() {
        // (name, policy, replicas at start, (load, draining) per decision,
        // replicas after each decision)
        type Case<'a> = (&'a str, Policy, i32, &'a [(f64, bool)], &'a [i32]);
        let cases: &[Case] = &[
            (
                "up at once, by at most the step",
                policy(),
                2,
                &[(550.0, false), (550.0, false), (550.0, false)],
                &[4, 6, 6],
            ),
            (
                "bounded by maxReplicas",
                policy(),
                2,
                &[(5000.0, false), (5000.0, false), (5000.0, false)],
                &[4, 6, 6],
            ),
            (
                "never below minReplicas",
                Policy {
                    down_window: Duration::ZERO,
                    ..policy()
                },
                3,
                &[(0.0, false), (0.0, false)],
                &[2, 2],
            ),
            (
                "down only after a whole window of low load, one at a time",
                policy(),
                4,
                &[
                    (150.0, false),
                    (150.0, false),
                    (150.0, false),
                    (150.0, false),
                    (150.0, false),
                    (150.0, false),
                    (150.0, false),
                    (150.0, false),
                ],
                &[4, 4, 4, 4, 4, 4, 3, 2],
            ),
            (
                "a spike inside the window holds the scale-down",
                policy(),
                4,
                &[
                    (150.0, false),
                    (150.0, false),
                    (150.0, false),
                    (390.0, false),
                    (150.0, false),
                    (150.0, false),
                    (150.0, false),
                    (150.0, false),
                    (150.0, false),
                    (150.0, false),
                    (150.0, false),
                ],
                &[4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 3],
            ),
            (
                "no flapping around the target",
                Policy {
                    down_window: Duration::from_secs(30),
                    ..policy()
                },
                3,
                &[
                    (290.0, false),
                    (310.0, false),
                    (290.0, false),
                    (310.0, false),
                    (290.0, false),
                    (290.0, false),
                ],
                &[3, 4, 4, 4, 4, 4],
            ),
            (
                "the up window wants a lasting rise",
                Policy {
                    up_window: Duration::from_secs(20),
                    ..policy()
                },
                2,
                &[
                    (350.0, false),
                    (150.0, false),
                    (350.0, false),
                    (350.0, false),
                    (350.0, false),
                ],
                &[2, 2, 2, 2, 4],
            ),
            (
                "no new scale-down while a removed comet drains",
                Policy {
                    down_window: Duration::ZERO,
                    ..policy()
                },
                4,
                &[
                    (100.0, true),
                    (100.0, true),
                    (100.0, false),
                    (100.0, true),
                    (100.0, false),
                ],
                &[4, 4, 3, 3, 2],
            ),
        ];
        for (name, policy, start, steps, want) in cases {
            assert_eq!(run(policy, *start, steps), want.to_vec(), "{name}");
        }
    }

    #[test]
    fn a_window_that_is_no_multiple_of_the_interval_still_ends() {
        // Decisions every 3 s, a 10 s window: down at the first decision
        // after 10 s of low load (12 s), not never; then a step a decision.
        let policy = Policy {
            down_window: Duration::from_secs(10),
            ..policy()
        };
        let low = [(150.0, false); 8];
        assert_eq!(
            run_every(Duration::from_secs(3), &policy, 4, &low),
            [4, 4, 4, 4, 3, 2, 2, 2]
        );
    }

    #[test]
    fn missing_metrics_hold() {
        let mut history = History::default();
        let now = Instant::now();
        let partial = Load {
            total: 10_000.0,
            measured: 2,
            pods: 3,
        };
        for load in [None, Some(&partial)] {
            let decision = decide(&policy(), 3, load, false, &mut history, now, "connections");
            assert_eq!(
                (decision.replicas, decision.direction),
                (3, Direction::Hold)
            );
        }
    }

    #[test]
    fn bounds_apply_even_without_metrics() {
        let mut history = History::default();
        let now = Instant::now();
        let up = decide(&policy(), 1, None, false, &mut history, now, "connections");
        assert_eq!((up.replicas, up.direction), (2, Direction::Up));
        let down = decide(&policy(), 9, None, false, &mut history, now, "connections");
        assert_eq!((down.replicas, down.direction), (6, Direction::Down));
    }

    #[test]
    fn jobs_are_capped_by_the_partitions() {
        let spec = AutoscalingSpec {
            enabled: true,
            min_replicas: 2,
            max_replicas: 50,
            target: 1000,
            scale_up_stabilization_seconds: 0,
            scale_down_stabilization_seconds: 300,
            max_step: 4,
        };
        let policy = Policy::from_spec(&spec, Some(16), 4);
        assert_eq!((policy.min, policy.max), (2, 16));
        let policy = Policy::from_spec(&spec, Some(1), 4);
        assert_eq!((policy.min, policy.max), (1, 1));
    }
}
