//! Reading a JWT's expiry without verifying it (the server verifies; we only schedule refreshes).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

/// The `exp` claim of `token`, or `None` when the token is not a JWT or has no usable `exp`.
pub fn expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_f64()?;
    if !exp.is_finite() || exp < 0.0 {
        return None;
    }
    UNIX_EPOCH.checked_add(Duration::from_secs_f64(exp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", enc(r#"{"alg":"HS256"}"#), enc(payload))
    }

    #[test]
    fn reads_exp_without_verifying() {
        assert_eq!(
            expiry(&jwt(r#"{"exp":1700000000,"sub":"x"}"#)),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(
            expiry(&jwt(r#"{"exp":1700000000.5}"#)),
            Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_500))
        );
        // Padded base64 is tolerated.
        let padded = format!(
            "h.{}.s",
            base64::engine::general_purpose::URL_SAFE.encode(r#"{"exp":12}"#)
        );
        assert_eq!(expiry(&padded), Some(UNIX_EPOCH + Duration::from_secs(12)));
    }

    #[test]
    fn missing_or_malformed_exp_is_none() {
        assert_eq!(expiry(&jwt(r#"{"sub":"x"}"#)), None);
        assert_eq!(expiry(&jwt(r#"{"exp":"soon"}"#)), None);
        assert_eq!(expiry(&jwt("not json")), None);
        assert_eq!(expiry("opaque-token"), None);
        assert_eq!(expiry("a.!!!.c"), None);
    }
}
