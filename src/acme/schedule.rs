//! When to renew and when to retry: sans-IO, unix seconds in, unix seconds
//! out, randomness passed in (so tests pin it).

/// When to renew a certificate valid from `not_before` to `not_after`:
/// inside the CA's suggested window when it offers one (ACME renewal
/// information, RFC 9773), at the point `jitter` (0..1) picks; otherwise at
/// two thirds of the lifetime, brought forward by up to a twentieth of it
/// so that a fleet started together does not renew in step.
pub fn renew_at(not_before: i64, not_after: i64, window: Option<(i64, i64)>, jitter: f64) -> i64 {
    let jitter = if jitter.is_finite() { jitter.clamp(0.0, 1.0) } else { 0.0 };
    if let Some((start, end)) = window.filter(|(s, e)| e >= s) {
        return start + ((end - start) as f64 * jitter) as i64;
    }
    let life = (not_after - not_before).max(0);
    not_before + life * 2 / 3 - ((life / 20) as f64 * jitter) as i64
}

/// How long to wait after the `failures`-th failed attempt in a row: five
/// minutes, doubling up to an hour (Let's Encrypt allows five failed
/// validations per name and hour; this makes four in the first), but at most a quarter of what is left of
/// the current certificate (`remaining`, seconds; none at all: the full
/// backoff), and never less than five seconds.
pub fn retry_in(failures: u32, remaining: Option<i64>) -> i64 {
    let backoff = 300i64.saturating_mul(1 << failures.saturating_sub(1).min(4)).min(3600);
    let cap = remaining.map_or(backoff, |r| r / 4);
    backoff.min(cap).max(5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_thirds_of_the_lifetime_brought_forward_by_jitter() {
        // A 90-day certificate: day 60, up to 4.5 days earlier.
        let day = 86_400;
        assert_eq!(renew_at(0, 90 * day, None, 0.0), 60 * day);
        assert_eq!(renew_at(0, 90 * day, None, 1.0), 60 * day - 90 * day / 20);
        let mid = renew_at(1000, 1000 + 90 * day, None, 0.5);
        assert!(mid > 1000 + 55 * day && mid < 1000 + 60 * day, "{mid}");
        // Nonsense jitter is no jitter; an inverted validity renews at once.
        assert_eq!(renew_at(0, 90 * day, None, f64::NAN), 60 * day);
        assert_eq!(renew_at(500, 100, None, 0.3), 500);
    }

    #[test]
    fn the_cas_window_wins_when_offered() {
        assert_eq!(renew_at(0, 100_000, Some((50_000, 60_000)), 0.0), 50_000);
        assert_eq!(renew_at(0, 100_000, Some((50_000, 60_000)), 1.0), 60_000);
        assert_eq!(renew_at(0, 100_000, Some((50_000, 60_000)), 0.25), 52_500);
        // An inverted window is ignored.
        assert_eq!(renew_at(0, 90, Some((60, 50)), 0.0), 60);
    }

    #[test]
    fn retries_back_off_within_what_is_left() {
        assert_eq!(retry_in(1, None), 300);
        assert_eq!(retry_in(2, None), 600);
        assert_eq!(retry_in(3, None), 1200);
        assert_eq!(retry_in(4, None), 2400);
        assert_eq!(retry_in(5, None), 3600);
        assert_eq!(retry_in(40, None), 3600);
        assert_eq!(retry_in(5, Some(400)), 100, "a quarter of what is left");
        // Failed validations in the first hour, attempt at 0 included.
        let mut t = 0;
        let mut n = 1;
        while t + retry_in(n, None) < 3600 {
            t += retry_in(n, None);
            n += 1;
        }
        assert_eq!(n, 4);
        assert_eq!(retry_in(5, Some(8)), 5, "never under five seconds");
        assert_eq!(retry_in(1, Some(-100)), 5, "expired");
    }
}
