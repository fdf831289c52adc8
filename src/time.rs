//! RFC 3339 timestamps as Unix seconds, without a date-time dependency.
//!
//! The filter only needs "is this key expired at `now`", so timestamps are compiled to
//! whole Unix seconds once, at configure time.

/// Parses an RFC 3339 timestamp (`2027-01-01T00:00:00Z`, `2027-01-01T01:00:00+01:00`,
/// fractional seconds allowed and truncated) into Unix seconds.
pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    let bad = || format!("{s:?} is not an RFC 3339 timestamp such as \"2027-01-01T00:00:00Z\"");
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return Err(bad());
    }
    if b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let num = |from: usize, to: usize| -> Result<i64, String> {
        let part = s.get(from..to).ok_or_else(bad)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        part.parse::<i64>().map_err(|_| bad())
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(bad());
    }
    // Second 60 is a leap second; it is accepted and counted as the next second.
    if hour > 23 || minute > 59 || second > 60 {
        return Err(bad());
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let ob = rest.as_bytes();
            if ob.len() != 6 || ob[3] != b':' || !matches!(ob[0], b'+' | b'-') {
                return Err(bad());
            }
            let two = |part: Option<&str>| -> Result<i64, String> {
                match part {
                    Some(p) if p.bytes().all(|c| c.is_ascii_digit()) => {
                        p.parse().map_err(|_| bad())
                    }
                    _ => Err(bad()),
                }
            };
            let (oh, om) = (two(rest.get(1..3))?, two(rest.get(4..6))?);
            if oh > 23 || om > 59 {
                return Err(bad());
            }
            let sign = if ob[0] == b'+' { 1 } else { -1 };
            sign * (oh * 3600 + om * 60)
        }
    };
    let days = days_from_civil(year, month, day);
    Ok(days * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's days_from_civil / civil_from_days (proleptic Gregorian calendar).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_instants() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339("2027-01-01T00:00:00Z"), Ok(1_798_761_600));
        assert_eq!(parse_rfc3339("2000-02-29T12:30:45Z"), Ok(951_827_445));
        assert_eq!(
            parse_rfc3339("2027-01-01T01:00:00+01:00"),
            Ok(1_798_761_600)
        );
        assert_eq!(
            parse_rfc3339("2026-12-31T19:00:00-05:00"),
            Ok(1_798_761_600)
        );
        assert_eq!(parse_rfc3339("2027-01-01T00:00:00.999Z"), Ok(1_798_761_600));
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z"), Ok(-1));
    }

    #[test]
    fn rejects_malformed() {
        for s in [
            "",
            "2027-01-01",
            "2027-01-01 00:00:00Z",
            "2027-13-01T00:00:00Z",
            "2027-02-29T00:00:00Z",
            "2027-01-01T24:00:00Z",
            "2027-01-01T00:00:00",
            "2027-01-01T00:00:00+0100",
            "2027-01-01T00:00:00.Z",
            "2027-01-01T00:00:00Zjunk",
            "+027-01-01T00:00:00Z",
            "2027-01-01T00:00:00+24:00",
        ] {
            let err = parse_rfc3339(s).expect_err(s);
            assert!(err.contains("RFC 3339"), "{err}");
        }
    }

    #[test]
    fn format_round_trips() {
        for t in [0, 951_827_445, 1_798_761_600, -86_401, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&format_rfc3339(t)), Ok(t));
        }
        assert_eq!(format_rfc3339(1_798_761_600), "2027-01-01T00:00:00Z");
    }
}
