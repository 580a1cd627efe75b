//! Commit timestamps as clients see them: formatting microseconds as Supabase's
//! `YYYY-MM-DDTHH:MM:SS.mmmZ` and parsing an ISO 8601 time with a zone back, with the calendar
//! arithmetic both need. Must not: panic on any input (client text reaches `parse_timestamp`).

use std::fmt::Write as _;

/// Formats microseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_timestamp_millis(unix_micros: i64) -> String {
    let secs = unix_micros.div_euclid(1_000_000);
    let millis = unix_micros.rem_euclid(1_000_000) / 1000;
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    if !(0..=9999).contains(&y) {
        let mut s = String::with_capacity(28);
        let _ = write!(
            s,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            tod / 3600,
            (tod % 3600) / 60,
            tod % 60
        );
        return s;
    }
    // The usual case, digit by digit (this runs once per change delivered).
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, y as u64);
    put(5, 2, u64::from(m));
    put(8, 2, u64::from(d));
    put(11, 2, (tod / 3600) as u64);
    put(14, 2, ((tod % 3600) / 60) as u64);
    put(17, 2, (tod % 60) as u64);
    put(20, 3, millis as u64);
    String::from(std::str::from_utf8(&b).unwrap_or_default())
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Parses an ISO 8601 timestamp with a zone (`2026-11-22T10:00:00.123Z`, `…+02:00`; a space
/// may stand for the `T`) into microseconds since the Unix epoch.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let b = s.trim().as_bytes();
    let digits = |part: &[u8]| -> Option<i64> {
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let num = |r: std::ops::Range<usize>| digits(b.get(r)?);
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut at = 19;
    let mut micros = 0i64;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            if at - start < 6 {
                micros = micros * 10 + i64::from(b[at] - b'0');
            }
            at += 1;
        }
        if at == start {
            return None;
        }
        for _ in (at - start).min(6)..6 {
            micros *= 10;
        }
    }
    // Bytes, not string slices: the text may hold multi-byte characters anywhere.
    let offset_secs = match &b[at..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), rest @ ..] => {
            let (oh, om) = match rest {
                [h1, h2, b':', m1, m2] | [h1, h2, m1, m2] => (digits(&[*h1, *h2])?, digits(&[*m1, *m2])?),
                [h1, h2] => (digits(&[*h1, *h2])?, 0),
                _ => return None,
            };
            if oh > 23 || om > 59 {
                return None;
            }
            let secs = oh * 3600 + om * 60;
            if *sign == b'-' {
                -secs
            } else {
                secs
            }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo as u32, d as u32);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_secs;
    secs.checked_mul(1_000_000)?.checked_add(micros)
}

/// (year, month, day) → days since 1970-01-01.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_as_clients_print_them() {
        let t = parse_timestamp("2026-11-22T10:00:00.123Z").unwrap();
        assert_eq!(format_timestamp_millis(t), "2026-11-22T10:00:00.123Z");
        assert_eq!(parse_timestamp("2026-11-22 12:00:00.123+02:00"), Some(t));
        assert_eq!(parse_timestamp("2026-11-22T09:30:00.123456-0030"), Some(t + 456));
        assert_eq!(parse_timestamp("1970-01-01T00:00:00Z"), Some(0));
        for bad in [
            "",
            "2026-11-22",
            "2026-11-22T10:00:00",
            "2026-13-01T00:00:00Z",
            "2026-11-22T10:00:00.Z",
            "x026-11-22T10:00:00Z",
            "2026-11-22T10:00:00+2",
            // Multi-byte characters where the offset's digits are expected.
            "2024-01-01T00:00:00+0é0",
            "2024-01-01T00:00:00+é00",
            "2024-01-01T00:00:00+é",
            "2024-01-01T00:00:00.éZ",
            "2024-01-01T00:00:00+24:00",
            "2024-01-01T00:00:00+-1:00",
            "2024-01-01T00:00:00+00:60",
            "é024-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad:?}");
        }
    }
}
