//! Durations as operators write them: "20s", "500ms", "1m30s".

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A duration value as found in the file, before it is checked. Numbers are kept (not
/// rejected by serde) so the error can say how to write them instead of "invalid type".
#[derive(Debug, Clone, PartialEq)]
pub enum RawDuration {
    Text(String),
    Number(String),
}

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RawVisitor;

        impl Visitor<'_> for RawVisitor {
            type Value = RawDuration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"20s\", \"500ms\" or \"1m30s\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration::Text(v.to_owned()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawDuration, E> {
                Ok(RawDuration::Number(v.to_string()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawDuration, E> {
                Ok(RawDuration::Number(v.to_string()))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawDuration, E> {
                Ok(RawDuration::Number(v.to_string()))
            }
        }

        deserializer.deserialize_any(RawVisitor)
    }
}

impl RawDuration {
    /// The duration, or a message saying what is wrong with it (without the key name).
    pub fn parse(&self) -> Result<Duration, String> {
        let duration = match self {
            RawDuration::Number(n) => {
                return Err(format!(
                "bare number {n} is not a duration: add a unit, e.g. \"{n}s\" (units: ms, s, m, h)"
            ))
            }
            RawDuration::Text(text) => parse_duration(text)?,
        };
        if duration.is_zero() {
            return Err("must be greater than zero".to_owned());
        }
        Ok(duration)
    }
}

/// Parses one or more `<digits><unit>` parts, e.g. "1h", "1m30s", "250ms".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = |why: &str| {
        format!("invalid duration \"{text}\": {why} (write e.g. \"20s\", \"500ms\", \"1m\", \"1h\" or \"1m30s\")")
    };
    if text.is_empty() {
        return Err(invalid("empty"));
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "invalid duration \"{text}\": a unit is missing, e.g. \"{text}s\" (units: ms, s, m, h)"
        ));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(invalid("expected a number"));
        }
        let (number, after) = rest.split_at(digits);
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(unit_len);
        let number: u64 = number.parse().map_err(|_| invalid("number too large"))?;
        let part = match unit {
            "ms" => Some(Duration::from_millis(number)),
            "s" => Some(Duration::from_secs(number)),
            "m" => number.checked_mul(60).map(Duration::from_secs),
            "h" => number.checked_mul(3600).map(Duration::from_secs),
            "" => return Err(invalid("a unit is missing after a number")),
            _ => return Err(invalid(&format!("unknown unit \"{unit}\""))),
        };
        total = part
            .and_then(|part| total.checked_add(part))
            .ok_or_else(|| invalid("too large"))?;
        rest = after;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_documented_forms() {
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1s250ms"), Ok(Duration::from_millis(1250)));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "s",
            "20",
            "20x",
            "1.5s",
            " 20s",
            "20s ",
            "-1s",
            "20 s",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        let err = parse_duration("20").unwrap_err();
        assert!(err.contains("\"20s\""), "{err}");
        let err = parse_duration("3d").unwrap_err();
        assert!(err.contains("unknown unit \"d\""), "{err}");
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        assert!(parse_duration(&format!("{}h", u64::MAX)).is_err());
        assert!(parse_duration(&format!("{}s{}s", u64::MAX, u64::MAX)).is_err());
    }

    #[test]
    fn bare_numbers_and_zero_get_hints() {
        let err = RawDuration::Number("20".into()).parse().unwrap_err();
        assert!(err.contains("\"20s\""), "{err}");
        let err = RawDuration::Text("0s".into()).parse().unwrap_err();
        assert!(err.contains("greater than zero"), "{err}");
    }
}
