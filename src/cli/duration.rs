//! Durations as an operator types them (`90s`, `10m`, `1h30m`, `7d`) and reads them.

use std::time::Duration;

/// Parses `500ms`, `90s`, `10m`, `2h`, `7d`, `1h30m` or a bare number of seconds.
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("an empty duration".into());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{text:?}: a number without a unit (ms, s, m, h, d)"))?;
        if digits == 0 {
            return Err(format!("{text:?}: expected a number before {rest:?}"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" | "min" => Duration::from_secs(60),
            "h" => Duration::from_secs(60 * 60),
            "d" => Duration::from_secs(24 * 60 * 60),
            other => return Err(format!("{text:?}: unknown unit {other:?} (ms, s, m, h, d)")),
        };
        let part = u32::try_from(n)
            .ok()
            .and_then(|n| unit.checked_mul(n))
            .ok_or_else(|| format!("{text:?}: too long"))?;
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("{text:?}: too long"))?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// `d` in at most two units: `850ms`, `42s`, `4m05s`, `2h03m`, `3d04h`; a second unit that
/// is zero is left out (`15m`, `1h`, `30d`).
pub(crate) fn format(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 1 {
        return format!("{}ms", d.as_millis());
    }
    let (days, hours, minutes, seconds) =
        (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let two = |big: u64, big_unit: &str, small: u64, small_unit: &str| {
        if small == 0 {
            format!("{big}{big_unit}")
        } else {
            format!("{big}{big_unit}{small:02}{small_unit}")
        }
    };
    if days > 0 {
        two(days, "d", hours, "h")
    } else if hours > 0 {
        two(hours, "h", minutes, "m")
    } else if minutes > 0 {
        two(minutes, "m", seconds, "s")
    } else {
        format!("{seconds}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_operators_type() {
        let s = Duration::from_secs;
        assert_eq!(parse("90"), Ok(s(90)));
        assert_eq!(parse("90s"), Ok(s(90)));
        assert_eq!(parse("10m"), Ok(s(600)));
        assert_eq!(parse("10min"), Ok(s(600)));
        assert_eq!(parse("2h"), Ok(s(7200)));
        assert_eq!(parse("1h30m"), Ok(s(5400)));
        assert_eq!(parse("7d"), Ok(s(7 * 86_400)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse(" 0 "), Ok(Duration::ZERO));
        for bad in [
            "",
            "m",
            "10x",
            "1h30",
            "-5s",
            "1.5h",
            "99999999999999999999s",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn formats_in_two_units() {
        let s = Duration::from_secs;
        assert_eq!(format(Duration::from_millis(850)), "850ms");
        assert_eq!(format(s(42)), "42s");
        assert_eq!(format(s(245)), "4m05s");
        assert_eq!(format(s(2 * 3600 + 180)), "2h03m");
        assert_eq!(format(s(3 * 86_400 + 4 * 3600 + 59)), "3d04h");
        assert_eq!(format(s(15 * 60)), "15m");
        assert_eq!(format(s(3600 + 59)), "1h");
        assert_eq!(format(s(30 * 86_400)), "30d");
    }
}
