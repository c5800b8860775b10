//! One retry policy for every Modal call, as Modal's Go SDK does it, plus jitter:
//!
//! - transient codes are retried with exponential backoff (`x-retry-attempt` counts them);
//! - server-directed throttling (an `RPCRetryPolicy` in the status details) waits as told and
//!   does not count against the retries (`x-throttle-retry-attempt` counts those);
//! - on the router, UNAUTHENTICATED means a stale JWT: fetch a new one and try again, a few
//!   times in a row at most;
//! - a stream that made progress (a resumed read, a resumed upload) starts its count afresh.
//!
//! Every loop that retries a Modal call (control-plane unary calls, router unary calls, output
//! streams, streamed uploads, waiting for an exit) asks an [`Attempts`] what to do next.

use std::time::{Duration, Instant};

use prost::Message as _;
use tailbox_proto::modal::client::{RpcRetryPolicy, RpcStatus};
use tonic::{Code, Status};

/// How many JWT refreshes in a row one call (or one output stream) may trigger before giving up.
const AUTH_REFRESHES: u32 = 3;

/// Exponential backoff: `initial`, doubling, capped at `max`, for at most `retries` retries.
/// Each delay is drawn uniformly from the upper half of its step ("equal jitter"), so many
/// clients retrying at once spread out while every delay stays within `[step / 2, step]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Retries after the first attempt.
    pub retries: u32,
    /// Delay before the first retry (before jitter).
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Backoff {
    /// Control-plane unary calls: 3 retries, 100 ms doubling to 1 s (Go `retryInterceptor`).
    pub const CONTROL_PLANE: Self = Self {
        retries: 3,
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    /// Task Command Router calls: 10 retries, 10 ms doubling (Go `callWithRetriesOnTransientErrors`).
    pub const ROUTER: Self = Self {
        retries: 10,
        initial: Duration::from_millis(10),
        max: Duration::from_secs(1),
    };
    /// Waiting for an exec to exit: for as long as it takes (the SDKs retry every second).
    pub const UNTIL_EXIT: Self = Self {
        retries: u32::MAX,
        initial: Duration::from_millis(10),
        max: Duration::from_secs(1),
    };
    /// A broken streamed stdin write is resumed this often in a row without progress (the SDKs
    /// allow 9 in all; resetting on progress lets a long upload survive a flaky link).
    pub const UPLOAD_RESUME: Self = Self {
        retries: 9,
        initial: Duration::from_millis(10),
        max: Duration::from_millis(500),
    };

    /// The ceiling of the delay before retry number `retry` (1-based).
    pub fn step(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.saturating_sub(1));
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry number `retry`: jittered within `[step / 2, step]`.
    pub fn delay(&self, retry: u32) -> Duration {
        let step = self.step(retry);
        let half = step / 2;
        let spread = u64::try_from((step - half).as_micros()).unwrap_or(u64::MAX);
        half + Duration::from_micros(fastrand::u64(0..=spread))
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Wait this long, then try again.
    Retry(Duration),
    /// Fetch a fresh JWT, then try again at once.
    RefreshAuth,
    /// Stop and report the status.
    GiveUp,
}

/// The attempts of one logical call: what kind of retry comes next, and the counts Modal's
/// headers report.
#[derive(Debug, Clone)]
pub struct Attempts {
    backoff: Backoff,
    refresh_auth: bool,
    throttle_budget: Option<Option<Duration>>,
    retries: u32,
    refreshes: u32,
    throttles: u32,
    throttled_for: Duration,
    started: Instant,
}

impl Attempts {
    /// Transient failures are retried with `backoff`; nothing else is.
    pub fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            refresh_auth: false,
            throttle_budget: None,
            retries: 0,
            refreshes: 0,
            throttles: 0,
            throttled_for: Duration::ZERO,
            started: Instant::now(),
        }
    }

    /// UNAUTHENTICATED asks for a fresh JWT (the router's auth).
    pub fn refreshing_auth(mut self) -> Self {
        self.refresh_auth = true;
        self
    }

    /// Server-directed waits are honoured, up to `budget` in all (`None`: unlimited).
    pub fn honouring_throttles(mut self, budget: Option<Duration>) -> Self {
        self.throttle_budget = Some(budget);
        self
    }

    /// Decides what follows a failed attempt with `status`, counting it.
    pub fn after(&mut self, status: &Status) -> Next {
        if let Some(budget) = self.throttle_budget
            && let Some(wait) = server_retry_after(status)
            && budget.is_none_or(|b| self.throttled_for + wait <= b)
        {
            self.throttles += 1;
            self.throttled_for += wait;
            return Next::Retry(wait);
        }
        if self.refresh_auth
            && status.code() == Code::Unauthenticated
            && self.refreshes < AUTH_REFRESHES
        {
            self.refreshes += 1;
            return Next::RefreshAuth;
        }
        if is_transient(status.code()) && self.retries < self.backoff.retries {
            self.retries += 1;
            return Next::Retry(self.backoff.delay(self.retries));
        }
        Next::GiveUp
    }

    /// Progress was made (bytes arrived or were accepted): later failures count afresh.
    pub fn progressed(&mut self) {
        self.retries = 0;
        self.refreshes = 0;
    }

    /// Transient retries so far (`x-retry-attempt`).
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// Server-directed waits so far (`x-throttle-retry-attempt`).
    pub fn throttles(&self) -> u32 {
        self.throttles
    }

    /// Time since the first attempt (`x-retry-delay`, `x-throttle-retry-delay`).
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Codes every Modal SDK treats as transient.
pub fn is_transient(code: Code) -> bool {
    matches!(
        code,
        Code::DeadlineExceeded
            | Code::Unavailable
            | Code::Cancelled
            | Code::Internal
            | Code::Unknown
    )
}

/// The server's "retry after" for a throttled call, from `grpc-status-details-bin`.
pub fn server_retry_after(status: &tonic::Status) -> Option<Duration> {
    let details = RpcStatus::decode(status.details()).ok()?;
    let policy = details
        .details
        .iter()
        .find(|any| any.type_url.ends_with("/modal.client.RPCRetryPolicy"))?;
    let policy = RpcRetryPolicy::decode(policy.value.as_slice()).ok()?;
    let secs = f64::from(policy.retry_after_secs);
    let secs = if secs.is_finite() { secs.max(0.1) } else { 0.1 };
    Some(Duration::from_secs_f64(secs.min(3600.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttled(secs: f32) -> Status {
        let policy = RpcRetryPolicy {
            retry_after_secs: secs,
        };
        let details = RpcStatus {
            code: Code::ResourceExhausted as i32,
            message: "slow down".into(),
            details: vec![prost_types::Any {
                type_url: "type.modal.com/modal.client.RPCRetryPolicy".into(),
                value: policy.encode_to_vec(),
            }],
        };
        Status::with_details(
            Code::ResourceExhausted,
            "slow down",
            details.encode_to_vec().into(),
        )
    }

    #[test]
    fn steps_double_to_their_cap() {
        let b = Backoff::CONTROL_PLANE;
        let steps: Vec<_> = (1..=b.retries).map(|r| b.step(r)).collect();
        assert_eq!(
            steps,
            [
                Duration::from_millis(100),
                Duration::from_millis(200),
                Duration::from_millis(400)
            ]
        );
        assert_eq!(b.step(10), Duration::from_secs(1));
        assert_eq!(Backoff::ROUTER.step(1), Duration::from_millis(10));
        assert_eq!(Backoff::ROUTER.step(40), Duration::from_secs(1));
    }

    #[test]
    fn jittered_delays_stay_within_half_a_step_and_the_step() {
        for backoff in [
            Backoff::CONTROL_PLANE,
            Backoff::ROUTER,
            Backoff::UNTIL_EXIT,
            Backoff::UPLOAD_RESUME,
        ] {
            let mut seen = std::collections::BTreeSet::new();
            for retry in 1..=12 {
                for _ in 0..200 {
                    let step = backoff.step(retry);
                    let delay = backoff.delay(retry);
                    assert!(delay >= step / 2 && delay <= step, "{delay:?} vs {step:?}");
                    assert!(delay <= backoff.max);
                    seen.insert(delay);
                }
            }
            assert!(seen.len() > 12, "no jitter: {seen:?}");
        }
    }

    #[test]
    fn transient_codes_are_retried_until_the_budget_is_spent() {
        let mut attempts = Attempts::new(Backoff::CONTROL_PLANE);
        for expected in 1..=3 {
            assert!(matches!(
                attempts.after(&Status::unavailable("x")),
                Next::Retry(_)
            ));
            assert_eq!(attempts.retries(), expected);
        }
        assert_eq!(attempts.after(&Status::unavailable("x")), Next::GiveUp);
        for code in [
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::NotFound,
            Code::InvalidArgument,
            Code::FailedPrecondition,
        ] {
            let mut fresh = Attempts::new(Backoff::ROUTER);
            assert!(!is_transient(code));
            assert_eq!(fresh.after(&Status::new(code, "x")), Next::GiveUp);
        }
    }

    #[test]
    fn throttle_waits_do_not_count_as_retries_and_respect_their_budget() {
        let mut attempts =
            Attempts::new(Backoff::CONTROL_PLANE).honouring_throttles(Some(Duration::from_secs(5)));
        assert_eq!(
            attempts.after(&throttled(2.5)),
            Next::Retry(Duration::from_millis(2500))
        );
        assert_eq!(attempts.throttles(), 1);
        assert_eq!(attempts.retries(), 0);
        assert_eq!(
            attempts.after(&throttled(2.5)),
            Next::Retry(Duration::from_millis(2500))
        );
        // The budget is spent: a throttled status is then an ordinary (non-transient) failure.
        assert_eq!(attempts.after(&throttled(2.5)), Next::GiveUp);
        // Without throttle handling, the details are ignored.
        let mut router = Attempts::new(Backoff::ROUTER);
        assert_eq!(router.after(&throttled(1.0)), Next::GiveUp);
        assert_eq!(server_retry_after(&Status::unavailable("x")), None);
    }

    #[test]
    fn stale_jwts_are_refreshed_a_few_times_in_a_row_and_progress_resets_the_counts() {
        let mut attempts = Attempts::new(Backoff::ROUTER).refreshing_auth();
        let unauthenticated = Status::unauthenticated("expired");
        for _ in 0..3 {
            assert_eq!(attempts.after(&unauthenticated), Next::RefreshAuth);
        }
        assert_eq!(attempts.after(&unauthenticated), Next::GiveUp);
        attempts.progressed();
        assert_eq!(attempts.after(&unauthenticated), Next::RefreshAuth);
        for _ in 0..10 {
            assert!(matches!(
                attempts.after(&Status::internal("x")),
                Next::Retry(_)
            ));
        }
        assert_eq!(attempts.after(&Status::internal("x")), Next::GiveUp);
        attempts.progressed();
        assert!(matches!(
            attempts.after(&Status::internal("x")),
            Next::Retry(_)
        ));
    }
}
