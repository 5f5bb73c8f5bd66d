//! The root rotation's state machine, kept pure so each rule is tested on
//! its own. Its phase is read off the CA's stored state, so a control
//! plane that restarts in the middle of a rotation carries on with it:
//!
//! - **idle**: one root, which signs;
//! - **distributing**: a newer root is in the bundle but the older one
//!   still signs (the newest root is not the signer); it starts signing
//!   once every connected proxy acknowledged the bundle, or after a wait;
//! - **promoted**: the newest root signs and older ones remain, until
//!   `retire` removes them, which it refuses while a proxy still uses a
//!   certificate one of them signed (unless forced).

use std::time::Duration;

use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Idle,
    Distributing,
    Promoted,
    /// Promotion failed (the store refused it); `rotate` may start over.
    Failed,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rotation {
    pub phase: Phase,
    /// The root being rotated to.
    pub new_root: Option<String>,
    /// Proxies that have not acknowledged the new bundle yet.
    pub pending: Vec<String>,
}

/// What to do while distributing.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Wait,
    /// Every connected proxy has the new bundle.
    Promote,
    /// The wait is over; these proxies did not acknowledge in time.
    PromoteAnyway(Vec<String>),
}

impl Rotation {
    /// The phase of a CA with these roots (bundle order: oldest first) and
    /// this signing root.
    pub fn of(roots: &[String], signer: &str) -> Rotation {
        match roots.last() {
            Some(newest) if newest != signer => Rotation {
                phase: Phase::Distributing,
                new_root: Some(newest.clone()),
                pending: Vec::new(),
            },
            Some(_) if roots.len() > 1 => Rotation {
                phase: Phase::Promoted,
                new_root: Some(signer.to_string()),
                pending: Vec::new(),
            },
            _ => Rotation::default(),
        }
    }

    /// Whether a rotation may start now.
    pub fn can_start(&self) -> Result<(), String> {
        if self.phase == Phase::Distributing {
            return Err("a rotation is already in progress".into());
        }
        Ok(())
    }

    /// While distributing: promote once nobody is `pending`, or anyway
    /// after `limit` has passed since the rotation began.
    pub fn step(&mut self, pending: Vec<String>, waited: Duration, limit: Duration) -> Step {
        let step = if pending.is_empty() {
            Step::Promote
        } else if waited > limit {
            Step::PromoteAnyway(pending.clone())
        } else {
            Step::Wait
        };
        self.pending = pending;
        step
    }

    /// Whether the old roots may be retired, given the proxies whose
    /// certificates they signed.
    pub fn can_retire(&self, users: &[String], force: bool) -> Result<(), String> {
        if self.phase == Phase::Distributing {
            return Err("a rotation is in progress; retire once the new root signs".into());
        }
        if !users.is_empty() && !force {
            return Err(format!(
                "proxies still use certificates signed by a root to retire: {}; wait for them to renew (or force)",
                users.join(", ")
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_phase_is_read_off_the_roots() {
        assert_eq!(Rotation::of(&ids(&["a"]), "a").phase, Phase::Idle);
        let d = Rotation::of(&ids(&["a", "b"]), "a");
        assert_eq!(
            (d.phase, d.new_root.as_deref()),
            (Phase::Distributing, Some("b"))
        );
        let p = Rotation::of(&ids(&["a", "b"]), "b");
        assert_eq!(
            (p.phase, p.new_root.as_deref()),
            (Phase::Promoted, Some("b"))
        );
    }

    #[test]
    fn one_rotation_at_a_time_and_promotion_waits_for_acknowledgements() {
        let mut r = Rotation::of(&ids(&["a", "b"]), "a");
        assert!(r.can_start().is_err());
        let limit = Duration::from_secs(30);
        assert_eq!(
            r.step(ids(&["p1"]), Duration::from_secs(1), limit),
            Step::Wait
        );
        assert_eq!(r.pending, ids(&["p1"]));
        assert_eq!(r.step(vec![], Duration::from_secs(2), limit), Step::Promote);
        assert_eq!(
            r.step(ids(&["p2"]), Duration::from_secs(31), limit),
            Step::PromoteAnyway(ids(&["p2"]))
        );
        assert!(Rotation::of(&ids(&["a", "b"]), "b").can_start().is_ok());
    }

    #[test]
    fn retiring_waits_for_renewals_unless_forced() {
        let promoted = Rotation::of(&ids(&["a", "b"]), "b");
        assert!(promoted.can_retire(&[], false).is_ok());
        let users = ids(&["default/web/w1"]);
        let e = promoted.can_retire(&users, false).expect_err("in use");
        assert!(e.contains("default/web/w1"), "{e}");
        assert!(promoted.can_retire(&users, true).is_ok());
        let distributing = Rotation::of(&ids(&["a", "b"]), "a");
        assert!(distributing.can_retire(&[], true).is_err());
    }
}
