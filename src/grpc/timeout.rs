//! The `grpc-timeout` header: how a client tells the server its deadline.
//!
//! Wire format (gRPC over HTTP/2 spec): 1 to 8 ASCII digits followed by one unit letter,
//! `H` hours, `M` minutes, `S` seconds, `m` milliseconds, `u` microseconds, `n` nanoseconds.
//! Both sides enforce the deadline: the server so it stops working for a caller that gave up,
//! the client so a silent server cannot hold it past its budget.

use std::time::Duration;

/// Name of the header.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// Largest value the 8-digit field can carry.
const MAX_VALUE: u128 = 99_999_999;

/// Formats a timeout with the finest unit whose value fits in 8 digits, rounding up so the
/// server never sees a deadline earlier than the client's (it would fail calls the client
/// would still accept). Durations beyond 99,999,999 hours are clamped to that.
pub fn format(timeout: Duration) -> String {
    let nanos = timeout.as_nanos();
    const UNITS: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (per_unit, unit) in UNITS {
        let value = nanos.div_ceil(per_unit);
        if value <= MAX_VALUE {
            return format!("{value}{unit}");
        }
    }
    format!("{MAX_VALUE}H")
}

/// Parses a `grpc-timeout` value. Errors (rather than guesses) on anything that is not 1..=8
/// digits plus a known unit, so a garbled header is reported instead of silently ignored.
pub fn parse(value: &str) -> Result<Duration, String> {
    let bad = || format!("invalid grpc-timeout {value:?}: want 1-8 digits and a unit of HMSmun");
    let unit = value.chars().last().ok_or_else(bad)?;
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    Ok(match unit {
        'H' => Duration::from_secs(n * 3600),
        'M' => Duration::from_secs(n * 60),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return Err(bad()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_finest_fitting_unit() {
        assert_eq!(format(Duration::from_nanos(0)), "0n");
        assert_eq!(format(Duration::from_nanos(1)), "1n");
        assert_eq!(format(Duration::from_millis(50)), "50000000n");
        assert_eq!(format(Duration::from_millis(100)), "100000u");
        assert_eq!(format(Duration::from_secs(1)), "1000000u");
        assert_eq!(format(Duration::from_secs(100)), "100000m");
        assert_eq!(format(Duration::from_secs(100_000)), "100000S");
        assert_eq!(format(Duration::from_secs(200_000_000)), "3333334M");
        assert_eq!(format(Duration::from_secs(u64::MAX)), "99999999H");
    }

    #[test]
    fn format_rounds_up_never_down() {
        // 100 ms + 1 ns does not fit in nanoseconds; microseconds must round up.
        let d = Duration::from_millis(100) + Duration::from_nanos(1);
        assert_eq!(format(d), "100001u");
        assert!(parse(&format(d)).unwrap() >= d);
    }

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse("2H").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse("3M").unwrap(), Duration::from_secs(180));
        assert_eq!(parse("4S").unwrap(), Duration::from_secs(4));
        assert_eq!(parse("250m").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("7u").unwrap(), Duration::from_micros(7));
        assert_eq!(
            parse("99999999n").unwrap(),
            Duration::from_nanos(99_999_999)
        );
        assert_eq!(parse("00000001S").unwrap(), Duration::from_secs(1));
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "S",
            "10",
            "123456789S",
            "1x",
            "-1S",
            "1.5S",
            " 1S",
            "1 S",
            "1é",
            "1s",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn round_trips() {
        for ms in [1u64, 20, 999, 1000, 86_400_000] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse(&format(d)).unwrap(), d);
        }
    }
}
