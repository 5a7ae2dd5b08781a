//! Timestamps as RFC 3339 UTC text and back, for tokens, the CLI and the audit export; no
//! time-zone database needed, since Berth writes and reads UTC only.

/// Seconds since the epoch as RFC 3339 UTC (`2026-12-01T07:00:00Z`).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A moment shown as RFC 3339 UTC with microseconds (`2026-12-01T07:00:00.123456Z`), the form
/// the log's timestamps take.
pub struct Rfc3339Micros(pub std::time::SystemTime);

impl std::fmt::Display for Rfc3339Micros {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let micros = match self.0.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => d.as_micros() as i64,
            Err(e) => -(e.duration().as_micros() as i64),
        };
        let secs = micros.div_euclid(1_000_000);
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (year, month, day) = civil_from_days(days);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            micros.rem_euclid(1_000_000)
        )
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` (or a date alone, meaning its midnight UTC) or a number of
/// seconds since the epoch.
pub fn parse(text: &str) -> Result<i64, String> {
    if let Ok(secs) = text.parse::<i64>() {
        return Ok(secs);
    }
    let bad = || format!("{text:?} is not a time: use 2026-12-01, 2026-12-01T07:00:00Z or seconds");
    let (date, clock) = match text.split_once('T') {
        Some((d, c)) => (d, Some(c.strip_suffix('Z').ok_or_else(bad)?)),
        None => (text, None),
    };
    let num = |s: &str| s.parse::<i64>().map_err(|_| bad());
    let d: Vec<&str> = date.split('-').collect();
    let [y, m, dd] = d.as_slice() else {
        return Err(bad());
    };
    let (y, m, dd) = (num(y)?, num(m)?, num(dd)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&dd) {
        return Err(bad());
    }
    let mut secs = days_from_civil(y, m, dd) * 86_400;
    if let Some(clock) = clock {
        let c: Vec<&str> = clock.split(':').collect();
        let [h, mi, s] = c.as_slice() else {
            return Err(bad());
        };
        let (h, mi, s) = (num(h)?, num(mi)?, num(s)?);
        if h > 23 || mi > 59 || s > 60 {
            return Err(bad());
        }
        secs += h * 3600 + mi * 60 + s;
    }
    Ok(secs)
}

/// Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Howard Hinnant's `days_from_civil`.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for (secs, text) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_796_108_400, "2026-12-01T07:00:00Z"),
        ] {
            assert_eq!(rfc3339(secs), text);
            assert_eq!(parse(text), Ok(secs));
        }
        assert_eq!(parse("2026-12-01"), Ok(1_796_083_200));
        assert_eq!(parse("1796108400"), Ok(1_796_108_400));
        for bad in [
            "yesterday",
            "2026-13-01",
            "2026-12-01T25:00:00Z",
            "2026-12-01T07:00:00",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn microsecond_timestamps() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_796_108_400_123_456);
        assert_eq!(Rfc3339Micros(at).to_string(), "2026-12-01T07:00:00.123456Z");
    }
}
