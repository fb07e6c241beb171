//! Durations in the config: a number of seconds, or a string like "90s", "10m", "24h", "7d".

use serde::de::Deserializer;
use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seconds(pub u64);

impl std::str::FromStr for Seconds {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let err = || format!("`{s}` is not a duration: use seconds or a number with s, m, h or d (e.g. 24h)");
        let (num, mult) = match t.char_indices().last() {
            Some((i, 's')) => (&t[..i], 1),
            Some((i, 'm')) => (&t[..i], 60),
            Some((i, 'h')) => (&t[..i], 3600),
            Some((i, 'd')) => (&t[..i], 86400),
            Some(_) => (t, 1),
            None => return Err(err()),
        };
        let n: u64 = num.trim().parse().map_err(|_| err())?;
        n.checked_mul(mult).map(Seconds).ok_or_else(err)
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        super::schema::text_or_number(d, "seconds, or a string such as \"10m\" or \"24h\"")
    }
}

#[cfg(test)]
mod tests {
    use super::Seconds;
    #[test]
    fn parses_units() {
        assert_eq!("90".parse::<Seconds>(), Ok(Seconds(90)));
        assert_eq!("90s".parse::<Seconds>(), Ok(Seconds(90)));
        assert_eq!("30m".parse::<Seconds>(), Ok(Seconds(1800)));
        assert_eq!("24h".parse::<Seconds>(), Ok(Seconds(86400)));
        assert_eq!("2d".parse::<Seconds>(), Ok(Seconds(172800)));
        assert!("h".parse::<Seconds>().is_err());
        assert!("-5m".parse::<Seconds>().is_err());
        assert!("".parse::<Seconds>().is_err());
    }
}
