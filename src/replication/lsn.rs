//! `Lsn`: a WAL position. Owns parsing and printing in Postgres' `X/Y` form and ordering.
//! Must not know about connections or messages.

use std::fmt;
use std::str::FromStr;

/// A position in the write-ahead log, as Postgres reports it (`16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The text was not of the form `X/Y` with hexadecimal halves of at most 32 bits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid LSN {0:?}: expected two hexadecimal numbers separated by '/', like 16/B374D848")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for v in [0u64, 1, 0xFFFF_FFFF, 0x1_0000_0000, 0x16_B374_D848, u64::MAX] {
            let s = Lsn(v).to_string();
            assert_eq!(s.parse::<Lsn>(), Ok(Lsn(v)), "{s}");
        }
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>(), Ok(Lsn::ZERO));
    }

    #[test]
    fn rejects_malformed() {
        for s in ["", "/", "1/", "/1", "1", "g/1", "1/1/1", "123456789/0", "-1/0", "1 /0"] {
            assert!(s.parse::<Lsn>().is_err(), "{s:?} should not parse");
        }
    }

    #[test]
    fn orders_numerically() {
        let a: Lsn = "1/FFFFFFFF".parse().unwrap();
        let b: Lsn = "2/0".parse().unwrap();
        assert!(a < b);
    }

    #[test]
    fn pseudo_random_round_trip() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..10_000 {
            let v = rng.u64(..);
            assert_eq!(Lsn(v).to_string().parse::<Lsn>(), Ok(Lsn(v)));
        }
    }
}
