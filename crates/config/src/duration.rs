//! The one duration grammar of Tandem: config files, command-line flags and
//! the HTTP API read durations the same way.
//!
//! A duration is one or more `<number><unit>` groups, largest unit first:
//! `250ms`, `5s`, `1.5s`, `1m30s`, `24h`, `365d`. Units are `ms`, `s`, `m`,
//! `h` and `d`; a number may have a decimal fraction; a unit is always
//! required (a bare `5` could mean seconds or milliseconds). This accepts
//! every Gateway API duration (GEP-2257: `1h30m`, `500ms`) and the
//! decimals that Tandem's own fields have always taken. Ranges (a timeout
//! of at least 1 ms, say) are each field's own check.

use std::time::Duration;

/// Longest duration any field can hold (about 31 years): far beyond any
/// sensible setting, small enough that adding it to an `Instant` is safe.
const MAX_SECONDS: f64 = 1e9;

/// Parses a duration; the error says what is wrong in words.
pub fn parse(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    if text.is_empty() {
        return Err("empty duration (e.g. 250ms, 5s, 1m30s)".into());
    }
    let mut rest = text;
    let mut total = 0.0f64;
    let mut last_rank = usize::MAX;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| {
                format!("`{text}` needs a unit (ms, s, m, h, d), e.g. `250ms` or `5s`")
            })?;
        let (num, tail) = rest.split_at(digits);
        let unit_len = tail
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(tail.len());
        let (unit, after) = tail.split_at(unit_len);
        if num.is_empty() {
            return Err(format!(
                "`{text}` is not a duration (e.g. 250ms, 5s, 1m30s)"
            ));
        }
        let n: f64 = num
            .parse()
            .map_err(|_| format!("`{text}` is not a duration (e.g. 250ms, 5s, 1m30s)"))?;
        let (rank, nanos) = match unit {
            "d" => (0, 86_400e9),
            "h" => (1, 3_600e9),
            "m" => (2, 60e9),
            "s" => (3, 1e9),
            "ms" => (4, 1e6),
            "" => {
                return Err(format!(
                    "`{text}` needs a unit (ms, s, m, h, d), e.g. `250ms` or `5s`"
                ))
            }
            other => return Err(format!("`{text}`: unknown unit `{other}` (ms, s, m, h, d)")),
        };
        if last_rank != usize::MAX && rank <= last_rank {
            return Err(format!(
                "`{text}`: each unit once, largest first (e.g. 1m30s)"
            ));
        }
        last_rank = rank;
        total += n * nanos;
        rest = after;
    }
    // In nanoseconds, rounded: `0.3s` is 300 ms, not 299.999....
    if !(0.0..=MAX_SECONDS * 1e9).contains(&total) {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(Duration::from_nanos(total.round() as u64))
}

/// Parses a duration that must lie within `min..=max`.
pub fn parse_within(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = parse(s)?;
    if d < min || d > max {
        return Err(format!(
            "`{}` must be between {} and {}",
            s.trim(),
            show(min),
            show(max)
        ));
    }
    Ok(d)
}

/// A duration in the grammar's own words (`250ms`, `5s`, `1h`), for
/// messages.
pub fn show(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 || !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> u128 {
        parse(s).expect(s).as_millis()
    }

    #[test]
    fn units_decimals_and_groups() {
        assert_eq!(ms("250ms"), 250);
        assert_eq!(ms("5s"), 5_000);
        assert_eq!(ms(" 1.5s "), 1_500);
        assert_eq!(ms("2m"), 120_000);
        assert_eq!(ms("1m30s"), 90_000);
        assert_eq!(ms("1h30m"), 5_400_000);
        assert_eq!(ms("24h"), 86_400_000);
        assert_eq!(ms("365d"), 31_536_000_000);
        assert_eq!(ms("0ms"), 0);
        assert_eq!(ms("1s500ms"), 1_500);
        assert_eq!(ms("0.3s"), 300);
        assert_eq!(parse("0.1ms"), Ok(Duration::from_micros(100)));
    }

    #[test]
    fn refuses_what_is_ambiguous_or_wrong() {
        for bad in [
            "",
            "5",
            "fast",
            "5y",
            "1.2.3s",
            "s",
            "30s1m",
            "1s1s",
            "-1s",
            "1e3s",
            "99999999999d",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(parse("5").expect_err("no unit").contains("needs a unit"));
    }

    #[test]
    fn ranges_are_the_fields_own() {
        let (lo, hi) = (Duration::from_millis(1), Duration::from_secs(3600));
        assert_eq!(parse_within("5s", lo, hi), Ok(Duration::from_secs(5)));
        assert_eq!(
            parse_within("0s", lo, hi).expect_err("below"),
            "`0s` must be between 1ms and 1h"
        );
        assert!(parse_within("2h", lo, hi).is_err());
    }
}
