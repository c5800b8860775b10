//! Conversions between std time types and the protobuf well-known types, shared by the agent and
//! the controller.

use std::time::{Duration, SystemTime};

/// A std duration as the protobuf type (saturating).
pub fn duration(d: Duration) -> pbjson_types::Duration {
    pbjson_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A protobuf duration as std, treating unset, zero and negative as `None` ("use the default").
pub fn to_std_duration(d: Option<&pbjson_types::Duration>) -> Option<Duration> {
    let d = d?;
    if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) {
        return None;
    }
    Some(Duration::new(
        u64::try_from(d.seconds).ok()?,
        u32::try_from(d.nanos).ok()?,
    ))
}

/// A system time as the protobuf type (times before the epoch become the epoch).
pub fn timestamp(t: SystemTime) -> pbjson_types::Timestamp {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    pbjson_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip_and_zero_means_unset() {
        let d = Duration::from_millis(1500);
        assert_eq!(to_std_duration(Some(&duration(d))), Some(d));
        assert_eq!(to_std_duration(Some(&duration(Duration::ZERO))), None);
        assert_eq!(to_std_duration(None), None);
    }

    #[test]
    fn timestamps_count_from_the_epoch() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(7, 5);
        assert_eq!(
            timestamp(t),
            pbjson_types::Timestamp {
                seconds: 7,
                nanos: 5
            }
        );
    }
}
