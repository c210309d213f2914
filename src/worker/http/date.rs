//! HTTP dates (RFC 9110 §5.6.7), with `httpdate`: written as IMF-fixdate, read in all three
//! forms a recipient must accept (IMF-fixdate, RFC 850, asctime).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The last second `httpdate` can write (9999-12-31 23:59:59): it panics past it.
const LAST: u64 = 253_402_300_799;

/// `Sun, 06 Nov 1994 08:49:37 GMT`. A time outside 1970..=9999 (a file's mtime can be
/// anything) is written as the nearest one inside.
pub fn format(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs.min(LAST)))
}

/// The `Date` of a response sent now: formatted once a second, not once a response.
pub fn now() -> Vec<u8> {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, Vec<u8>)> = const { std::cell::RefCell::new((u64::MAX, Vec::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs {
            *at = secs;
            *text = format(now).into_bytes();
        }
        text.clone()
    })
}

/// Seconds since the epoch, from any of the three forms; `None` for anything else.
pub fn parse(v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let t = httpdate::parse_http_date(s).ok()?;
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOV_6_1994: u64 = 784_111_777;

    #[test]
    fn reads_all_three_forms_of_rfc_9110() {
        assert_eq!(parse(b"Sun, 06 Nov 1994 08:49:37 GMT"), Some(NOV_6_1994));
        assert_eq!(parse(b"Sunday, 06-Nov-94 08:49:37 GMT"), Some(NOV_6_1994));
        assert_eq!(parse(b"Sun Nov  6 08:49:37 1994"), Some(NOV_6_1994));
        assert_eq!(parse(b" Sun, 06 Nov 1994 08:49:37 GMT "), Some(NOV_6_1994));
    }

    #[test]
    fn refuses_what_is_no_date() {
        for v in [
            &b"garbage"[..],
            b"",
            b"Sun, 06 Nov 9223372036854775807 08:49:37 GMT",
            b"Sun, 06 Nov -9223372036854775808 08:49:37 GMT",
            b"Sun, 06 Nov 0 08:49:37 GMT",
            b"Sun, 06 Nov 99999 08:49:37 GMT",
            b"Sun, 06 Nov 1994 99999999999999999999:49:37 GMT",
            b"Sun, 99 Nov 1994 08:49:37 GMT",
            b"Sun, 06 Nov 1994 08:49:37:00 GMT",
            b"Sun, +6 Nov 1994 08:49:37 GMT",
            b"Sun, 06 Nov 1994 08:49:37 CET",
            b"\xff\xfe",
        ] {
            assert_eq!(parse(v), None, "{}", String::from_utf8_lossy(v));
        }
        assert!(parse(b"Fri, 31 Dec 9999 23:59:59 GMT").is_some());
    }

    #[test]
    fn writes_imf_fixdate_and_reads_it_back() {
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(format(at(NOV_6_1994)), "Sun, 06 Nov 1994 08:49:37 GMT");
        for secs in [0u64, NOV_6_1994, 1_700_000_000, 4_102_444_800, LAST] {
            assert_eq!(parse(format(at(secs)).as_bytes()), Some(secs));
        }
    }

    #[test]
    fn the_cached_date_is_the_current_second() {
        let before = parse(&now()).unwrap();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let after = parse(&now()).unwrap();
        assert!(before <= wall && wall <= after, "{before} {wall} {after}");
    }

    #[test]
    fn times_outside_what_http_can_say_are_clamped() {
        assert_eq!(
            format(UNIX_EPOCH - Duration::from_secs(5)),
            "Thu, 01 Jan 1970 00:00:00 GMT"
        );
        assert_eq!(
            format(UNIX_EPOCH + Duration::from_secs(LAST + 1_000_000)),
            "Fri, 31 Dec 9999 23:59:59 GMT"
        );
    }
}
