//! What every crate's configuration shares: the typed error its `validate()` returns, and
//! durations written as seconds.
//!
//! A crate's `Config::validate()` returns a [`ConfigError`] whose `field` is the path of the
//! offending field relative to that config (`url`, `endpoints./v1/*.capacity`,
//! `half_open.one_in`). Whoever embeds the config under a key prefixes it with
//! [`ConfigError::within`], so the gateway reports `fallback.url` without parsing a
//! message apart.
//!
//! Durations are `f64` seconds in YAML and JSON (`queue_timeout: 2.5`) and
//! [`Duration`](std::time::Duration) in the typed structs, through [`seconds`]:
//!
//! ```
//! use portcullis_core::ConfigError;
//! use serde::Deserialize;
//! use std::time::Duration;
//!
//! #[derive(Deserialize)]
//! struct Config {
//!     #[serde(with = "portcullis_core::seconds")]
//!     timeout: Duration,
//!     #[serde(default, with = "portcullis_core::seconds::option")]
//!     hold: Option<Duration>,
//! }
//!
//! let c: Config = serde_json::from_str(r#"{"timeout": 0.25}"#).unwrap();
//! assert_eq!(c.timeout, Duration::from_millis(250));
//! assert_eq!(c.hold, None);
//! assert!(serde_json::from_str::<Config>(r#"{"timeout": -1}"#).is_err());
//!
//! let e = ConfigError::new("url", "must be an http:// URL").within("fallback");
//! assert_eq!(e.field, "fallback.url");
//! assert_eq!(e.to_string(), "fallback.url: must be an http:// URL");
//! ```

use std::fmt;
use std::time::Duration;

/// A configuration value that is not allowed: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The path of the field, relative to the config that was validated (`url`,
    /// `upstreams[1].url`, `endpoints./w.capacity`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    /// The error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error for a config embedded under `section`: `url` within `storage` is
    /// `storage.url`, `[0]` within `upstreams` is `upstreams[0]`.
    pub fn within(mut self, section: &str) -> Self {
        self.field = match self.field.as_str() {
            "" => section.to_owned(),
            f if f.starts_with('[') => format!("{section}{f}"),
            f => format!("{section}.{f}"),
        };
        self
    }

    /// `Err` for `field` unless `value` is greater than zero.
    pub fn require_positive(field: &str, value: Duration) -> Result<(), Self> {
        match value.is_zero() {
            true => Err(Self::new(field, "must be greater than 0 seconds")),
            false => Ok(()),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field.is_empty() {
            true => f.write_str(&self.message),
            false => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Serde for a [`Duration`] written as a number of seconds (`30`, `0.5`), for
/// `#[serde(with = "portcullis_core::seconds")]`.
///
/// Deserialising refuses a negative, NaN or infinite number, and more than
/// [`MAX_SECONDS`](seconds::MAX_SECONDS) (so adding it to an `Instant` cannot overflow).
/// Zero is accepted; a field that must be positive checks it in `validate()`
/// ([`ConfigError::require_positive`]).
pub mod seconds {
    use serde::de::{self, Deserializer, Visitor};
    use serde::Serializer;
    use std::fmt;
    use std::time::Duration;

    /// The longest duration accepted: 10⁹ seconds (about 31 years).
    pub const MAX_SECONDS: f64 = 1.0e9;

    /// `secs` as a duration, or why it is not one.
    pub fn from_secs(secs: f64) -> Result<Duration, String> {
        if !(secs >= 0.0 && secs.is_finite()) {
            return Err(format!(
                "must be a number of seconds, zero or more, got {secs}"
            ));
        }
        if secs > MAX_SECONDS {
            return Err(format!(
                "{secs} seconds is too large (at most {MAX_SECONDS})"
            ));
        }
        Ok(Duration::from_secs_f64(secs))
    }

    /// Writes the duration as `f64` seconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    /// Reads a number of seconds (integer or float).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_f64(Seconds)
    }

    /// Checks the number inside the deserializer's own call, so that a format that tracks
    /// positions (YAML) reports the field's path and line with the error.
    struct Seconds;

    impl Visitor<'_> for Seconds {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number of seconds")
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            from_secs(v).map_err(E::custom)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            self.visit_f64(v as f64)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            self.visit_f64(v as f64)
        }
    }

    /// The same for an `Option<Duration>` (absent or `null` is `None`); pair it with
    /// `#[serde(default)]`.
    pub mod option {
        use serde::de::{self, Deserializer, Visitor};
        use serde::Serializer;
        use std::fmt;
        use std::time::Duration;

        /// Writes the duration as `f64` seconds, or `None`.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_some(&d.as_secs_f64()),
                None => s.serialize_none(),
            }
        }

        /// Reads a number of seconds, or `null`.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            d.deserialize_option(MaybeSeconds)
        }

        struct MaybeSeconds;

        impl<'de> Visitor<'de> for MaybeSeconds {
            type Value = Option<Duration>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of seconds or null")
            }

            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }

            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }

            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                super::deserialize(d).map(Some)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_bounds() {
        assert_eq!(seconds::from_secs(0.0), Ok(Duration::ZERO));
        assert_eq!(seconds::from_secs(2.5), Ok(Duration::from_millis(2500)));
        assert_eq!(
            seconds::from_secs(seconds::MAX_SECONDS),
            Ok(Duration::from_secs(1_000_000_000))
        );
        for bad in [-1.0, -0.0001, f64::NAN, f64::INFINITY, 1.0e9 + 1.0, 1e300] {
            assert!(seconds::from_secs(bad).is_err(), "{bad}");
        }
    }

    #[derive(Debug, PartialEq, serde::Deserialize, serde::Serialize)]
    struct Timeouts {
        #[serde(with = "seconds")]
        every: Duration,
        #[serde(default, with = "seconds::option")]
        hold: Option<Duration>,
    }

    #[test]
    fn seconds_serde_reads_integers_floats_and_null_and_round_trips() {
        let read = |v: serde_json::Value| serde_json::from_value::<Timeouts>(v);
        let t = read(serde_json::json!({"every": 2, "hold": 0.5})).unwrap();
        assert_eq!(t.every, Duration::from_secs(2));
        assert_eq!(t.hold, Some(Duration::from_millis(500)));
        assert_eq!(
            read(serde_json::json!({"every": 1, "hold": null}))
                .unwrap()
                .hold,
            None
        );
        let back = serde_json::to_value(&t).unwrap();
        assert_eq!(back, serde_json::json!({"every": 2.0, "hold": 0.5}));
        for bad in [
            serde_json::json!({"every": -1}),
            serde_json::json!({"every": "soon"}),
            serde_json::json!({"every": 1, "hold": -2.5}),
            serde_json::json!({"every": 1e12}),
        ] {
            assert!(read(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn within_joins_paths() {
        let e = ConfigError::new("half_open.one_in", "must be at least 1").within("fallback");
        assert_eq!(e.field, "fallback.half_open.one_in");
        assert_eq!(ConfigError::new("[2]", "x").within("list").field, "list[2]");
        assert_eq!(ConfigError::new("", "x").within("ui").field, "ui");
        assert_eq!(ConfigError::new("", "bare").to_string(), "bare");
        assert!(ConfigError::require_positive("t", Duration::ZERO).is_err());
        assert!(ConfigError::require_positive("t", Duration::from_nanos(1)).is_ok());
    }
}
