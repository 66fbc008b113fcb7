//! Reconnect back-off (Envoy's `JitteredExponentialBackOffStrategy`) and the choice of server.

use std::time::Duration;

/// Full-jitter exponential back-off: each delay is uniform in `[0, interval)`, and the interval
/// doubles from `base` up to `max`. Envoy's xDS gRPC stream uses base 500 ms, max 30 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

/// The running state of a [`Backoff`].
#[derive(Debug)]
pub(crate) struct BackoffState {
    cfg: Backoff,
    next: Duration,
}

impl BackoffState {
    pub(crate) fn new(cfg: Backoff) -> Self {
        let base = cfg.base.max(Duration::from_millis(1));
        BackoffState {
            cfg: Backoff {
                base,
                max: cfg.max.max(base),
            },
            next: base,
        }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let interval = self.next;
        self.next = if interval > self.cfg.max / 2 {
            self.cfg.max
        } else {
            interval * 2
        };
        let ms = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        Duration::from_millis(fastrand::u64(0..ms)).min(self.cfg.max)
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.cfg.base;
    }
}

/// Which server to try: stay on one until `failover_after` consecutive failures, then move on,
/// wrapping around; the client returns to index 0 when a probe shows it answering again.
#[derive(Debug)]
pub(crate) struct ServerChoice {
    count: usize,
    failover_after: u32,
    current: usize,
    failures: u32,
}

impl ServerChoice {
    pub(crate) fn new(count: usize, failover_after: u32) -> Self {
        ServerChoice {
            count: count.max(1),
            failover_after: failover_after.max(1),
            current: 0,
            failures: 0,
        }
    }

    pub(crate) fn current(&self) -> usize {
        self.current
    }

    pub(crate) fn failed(&mut self) {
        self.failures += 1;
        if self.failures >= self.failover_after {
            self.failures = 0;
            self.current = (self.current + 1) % self.count;
        }
    }

    pub(crate) fn succeeded(&mut self) {
        self.failures = 0;
    }

    pub(crate) fn go_primary(&mut self) {
        self.failures = 0;
        self.current = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_a_doubling_interval_capped_at_max() {
        let mut b = BackoffState::new(Backoff::default());
        let mut ceiling = Duration::from_millis(500);
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d < ceiling, "{d:?} >= {ceiling:?}");
            ceiling = (ceiling * 2).min(Duration::from_secs(30));
        }
        assert_eq!(b.next, Duration::from_secs(30));
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(500));
    }

    #[test]
    fn fails_over_after_n_failures_and_wraps() {
        let mut s = ServerChoice::new(2, 2);
        s.failed();
        assert_eq!(s.current(), 0);
        s.failed();
        assert_eq!(s.current(), 1);
        s.failed();
        s.succeeded();
        s.failed();
        assert_eq!(s.current(), 1);
        s.failed();
        assert_eq!(s.current(), 0);
        s.failed();
        s.failed();
        s.go_primary();
        assert_eq!(s.current(), 0);
    }
}
