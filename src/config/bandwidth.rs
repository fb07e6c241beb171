//! Bandwidths in the config: a string such as "50 Mbit/s", "800 kbit/s" or
//! "1 Gbit/s" (bits per second, decimal prefixes, as links are sold), or 0
//! for no limit.

use serde::de::Deserializer;
use serde::Deserialize;

/// A bandwidth in bits per second; 0 means unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bandwidth(pub u64);

/// The largest bandwidth accepted (100 Gbit/s): far beyond any relay, and
/// small enough for the core's token buckets to count in nanoseconds.
pub const MAX_BITS: u64 = 100_000_000_000;

impl Bandwidth {
    /// Bytes per second, as the core counts them.
    pub fn bytes_per_second(self) -> u64 {
        self.0 / 8
    }
}

impl std::fmt::Display for Bandwidth {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self.0 {
            0 => f.write_str("unlimited"),
            b if b % 1_000_000_000 == 0 => write!(f, "{} Gbit/s", b / 1_000_000_000),
            b if b % 1_000_000 == 0 => write!(f, "{} Mbit/s", b / 1_000_000),
            b if b % 1_000 == 0 => write!(f, "{} kbit/s", b / 1_000),
            b => write!(f, "{b} bit/s"),
        }
    }
}

impl std::str::FromStr for Bandwidth {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let err = || format!("`{s}` is not a bandwidth: use a number with kbit/s, Mbit/s or Gbit/s (e.g. \"50 Mbit/s\"), or 0 for no limit");
        let t = s.trim();
        let unit_at = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let n: u64 = t[..unit_at].parse().map_err(|_| err())?;
        let unit = t[unit_at..].trim();
        let unit = unit.strip_suffix("/s").or_else(|| unit.strip_suffix("ps")).unwrap_or(unit);
        let mult = match unit.to_ascii_lowercase().as_str() {
            "" if n == 0 => 1,
            "bit" | "b" => 1,
            "kbit" | "kb" => 1_000,
            "mbit" | "mb" => 1_000_000,
            "gbit" | "gb" => 1_000_000_000,
            _ => return Err(err()),
        };
        let bits = n.checked_mul(mult).ok_or_else(err)?;
        if bits > MAX_BITS {
            return Err(format!("`{s}` is more than 100 Gbit/s"));
        }
        if bits != 0 && bits < 8_000 {
            return Err(format!("`{s}` is below 8 kbit/s, too little for any call (0 means no limit)"));
        }
        Ok(Bandwidth(bits))
    }
}

impl<'de> Deserialize<'de> for Bandwidth {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        super::schema::text_or_number(d, "a bandwidth such as \"50 Mbit/s\", or 0 for no limit")
    }
}

#[cfg(test)]
mod tests {
    use super::Bandwidth;

    #[test]
    fn parses_units() {
        assert_eq!("50 Mbit/s".parse::<Bandwidth>(), Ok(Bandwidth(50_000_000)));
        assert_eq!("50Mbit".parse::<Bandwidth>(), Ok(Bandwidth(50_000_000)));
        assert_eq!("800 kbit/s".parse::<Bandwidth>(), Ok(Bandwidth(800_000)));
        assert_eq!("1 Gbps".parse::<Bandwidth>(), Ok(Bandwidth(1_000_000_000)));
        assert_eq!("0".parse::<Bandwidth>(), Ok(Bandwidth(0)));
        assert_eq!(Bandwidth(50_000_000).bytes_per_second(), 6_250_000);
        assert_eq!(Bandwidth(50_000_000).to_string(), "50 Mbit/s");
        for bad in ["", "fast", "50", "50 MB/x", "-1 Mbit/s", "200 Gbit/s", "1 kbit/s", "99999999999999999999 bit/s"] {
            assert!(bad.parse::<Bandwidth>().is_err(), "{bad:?} accepted");
        }
    }
}
