//! Rise/fall hysteresis of a checked backend (or of a farm node's own check).

use super::Health;

/// HAProxy-style hysteresis: an up backend goes down after `fall` consecutive failures, a down
/// one comes up after `rise` consecutive successes. A backend starts up; until it has passed
/// one check ("unproven") a single failure takes it down, so a backend that is dead when the
/// daemon starts (or when it is added) never receives flows for `fall` intervals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    up: bool,
    proven: bool,
    /// Consecutive results contradicting the current state.
    streak: u32,
}

impl Tracker {
    pub fn new(rise: u32, fall: u32, up: bool, proven: bool) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            up,
            proven: proven && up,
            streak: 0,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    pub fn health(&self) -> Health {
        if self.up {
            Health::Up
        } else {
            Health::Down
        }
    }

    /// Count one result; returns the new state when it flips.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            self.proven |= ok;
            return None;
        }
        self.streak += 1;
        let need = match (self.up, self.proven) {
            (true, false) => 1,
            (true, true) => self.fall,
            (false, _) => self.rise,
        };
        if self.streak < need {
            return None;
        }
        self.up = ok;
        self.proven |= ok;
        self.streak = 0;
        Some(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_then_rise() {
        let mut t = Tracker::new(2, 3, true, true);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None, "a success resets the failure streak");
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(false), "third consecutive failure");
        assert!(!t.is_up());
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None, "a failure resets the success streak");
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true), "second consecutive success");
        assert!(t.is_up());
        // Once proven, a single failure no longer takes it down.
        assert_eq!(t.record(false), None);
    }

    #[test]
    fn unproven_backend_goes_down_on_first_failure() {
        let mut t = Tracker::new(2, 3, true, false);
        assert_eq!(t.record(false), Some(false));
        let mut t = Tracker::new(2, 3, true, false);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None, "proven by one success");
        // Starting down: needs `rise` successes.
        let mut t = Tracker::new(3, 1, false, false);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true));
        assert_eq!(t.record(false), Some(false), "fall = 1");
    }
}
