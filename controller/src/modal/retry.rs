//! Retry policy, as Modal's Go SDK does it: transient codes are retried with exponential backoff
//! under one idempotency key; server-directed throttling (an `RPCRetryPolicy` in the status
//! details) waits as told and does not count against the retries.

use std::time::Duration;

use prost::Message as _;
use tailbox_proto::modal::client::{RpcRetryPolicy, RpcStatus};
use tonic::Code;

/// Exponential backoff: `initial`, doubling, capped at `max`, for at most `retries` retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Retries after the first attempt.
    pub retries: u32,
    /// Delay before the first retry.
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

    /// The delay before retry number `retry` (1-based).
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.saturating_sub(1));
        self.initial.saturating_mul(factor).min(self.max)
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

    #[test]
    fn control_plane_backoff_doubles_to_its_cap() {
        let b = Backoff::CONTROL_PLANE;
        let delays: Vec<_> = (1..=b.retries).map(|r| b.delay(r)).collect();
        assert_eq!(
            delays,
            [
                Duration::from_millis(100),
                Duration::from_millis(200),
                Duration::from_millis(400)
            ]
        );
        assert_eq!(b.delay(10), Duration::from_secs(1));
        assert_eq!(Backoff::ROUTER.delay(1), Duration::from_millis(10));
        assert_eq!(Backoff::ROUTER.delay(40), Duration::from_secs(1));
    }

    #[test]
    fn transient_codes() {
        for code in [Code::Unavailable, Code::Internal, Code::DeadlineExceeded] {
            assert!(is_transient(code));
        }
        for code in [
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::NotFound,
            Code::InvalidArgument,
            Code::FailedPrecondition,
        ] {
            assert!(!is_transient(code));
        }
    }

    #[test]
    fn throttling_details_are_decoded() {
        let policy = RpcRetryPolicy {
            retry_after_secs: 2.5,
        };
        let status_details = RpcStatus {
            code: Code::ResourceExhausted as i32,
            message: "slow down".into(),
            details: vec![prost_types::Any {
                type_url: "type.modal.com/modal.client.RPCRetryPolicy".into(),
                value: policy.encode_to_vec(),
            }],
        };
        let status = tonic::Status::with_details(
            Code::ResourceExhausted,
            "slow down",
            status_details.encode_to_vec().into(),
        );
        assert_eq!(
            server_retry_after(&status),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(server_retry_after(&tonic::Status::unavailable("x")), None);
    }
}
