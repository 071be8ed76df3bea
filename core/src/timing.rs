//! Protocol timers shared by both ends.

use std::time::Duration;

/// Every interval the protocol relies on. The gateway's values are authoritative: it
/// announces `heartbeat` and `dead_after` in its welcome and the agent adopts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Send a heartbeat after this long without sending anything else.
    pub heartbeat: Duration,
    /// Declare the peer dead after this long without receiving anything.
    pub dead_after: Duration,
    /// How long a one-time data token stays redeemable.
    pub token_ttl: Duration,
    /// Deadline for each handshake stage (hello on a new connection, data hello).
    pub handshake_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat: Duration::from_secs(20),
            dead_after: Duration::from_secs(60),
            token_ttl: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl Timing {
    /// Clamp values into ranges where the protocol still works: a heartbeat shorter than
    /// `dead_after` (otherwise a healthy peer is declared dead), and non-zero everything.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.heartbeat.is_zero()
            || self.dead_after.is_zero()
            || self.token_ttl.is_zero()
            || self.handshake_timeout.is_zero()
        {
            return Err("timers must be greater than zero");
        }
        if self.heartbeat >= self.dead_after {
            return Err("heartbeat must be shorter than dead_after");
        }
        if self.heartbeat.as_millis() > u128::from(u32::MAX)
            || self.dead_after.as_millis() > u128::from(u32::MAX)
        {
            return Err("heartbeat and dead_after must be below 49 days");
        }
        Ok(())
    }
}
