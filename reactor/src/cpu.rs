//! Core masks (`-m MASK`) and thread pinning.
//!
//! A mask is SPDK's syntax: a hexadecimal bit mask (`0x3`, `3`, `0xF0`) or a bracketed list of
//! cores and inclusive ranges (`[0,1]`, `[0-3]`, `[0,2-3]`). A parsed [`CoreMask`] is never
//! empty, its cores are sorted and unique, and every core is below [`MAX_CORES`].

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// Upper bound on core numbers accepted in a mask (a limit on mask size, STYLE rule 10).
pub const MAX_CORES: usize = 1024;

/// A non-empty, sorted set of CPU core numbers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CoreMask {
    cores: Vec<usize>,
}

impl CoreMask {
    /// Parses a hex mask or a bracketed list. Errors on empty masks, bad digits, reversed
    /// ranges and cores at or above [`MAX_CORES`].
    pub fn parse(input: &str) -> Result<CoreMask, Error> {
        let s = input.trim();
        let bad = |reason: &str| Error::BadCoreMask {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let cores = if let Some(list) = s.strip_prefix('[') {
            let list = list
                .strip_suffix(']')
                .ok_or_else(|| bad("missing closing ']'"))?;
            parse_list(list).map_err(|r| bad(&r))?
        } else {
            parse_hex(s).map_err(|r| bad(&r))?
        };
        CoreMask::from_cores(cores).map_err(|_| bad("the mask selects no core"))
    }

    /// Builds a mask from core numbers (deduplicated and sorted). Errors if empty or a core
    /// is at or above [`MAX_CORES`].
    pub fn from_cores(cores: impl IntoIterator<Item = usize>) -> Result<CoreMask, Error> {
        let mut cores: Vec<usize> = cores.into_iter().collect();
        cores.sort_unstable();
        cores.dedup();
        if cores.is_empty() {
            return Err(Error::BadCoreMask {
                input: String::new(),
                reason: "the mask selects no core".into(),
            });
        }
        if let Some(&core) = cores.iter().find(|&&c| c >= MAX_CORES) {
            return Err(Error::BadCoreMask {
                input: format!("{cores:?}"),
                reason: format!("core {core} is at or above the limit {MAX_CORES}"),
            });
        }
        Ok(CoreMask { cores })
    }

    /// The cores, sorted ascending.
    pub fn cores(&self) -> &[usize] {
        &self.cores
    }

    /// Number of cores (never zero).
    pub fn len(&self) -> usize {
        self.cores.len()
    }

    /// Always false: a mask is never empty. Present for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.cores.is_empty()
    }

    /// The lowest core: where the init closure runs (SPDK's main core).
    pub fn first(&self) -> usize {
        self.cores[0]
    }
}

impl FromStr for CoreMask {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        CoreMask::parse(s)
    }
}

impl fmt::Display for CoreMask {
    /// Formats as a hex mask, `0x` followed by hex digits (as SPDK prints `-m`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let top = self.cores.last().copied().unwrap_or(0);
        let nr_digits = top / 4 + 1;
        f.write_str("0x")?;
        for digit in (0..nr_digits).rev() {
            let nibble = self
                .cores
                .iter()
                .filter(|&&c| c / 4 == digit)
                .fold(0u32, |acc, &c| acc | 1 << (c % 4));
            write!(f, "{nibble:x}")?;
        }
        Ok(())
    }
}

fn parse_hex(s: &str) -> Result<Vec<usize>, String> {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if digits.is_empty() {
        return Err("no hex digits".into());
    }
    let mut cores = Vec::new();
    for (pos, ch) in digits.chars().rev().enumerate() {
        let nibble = ch
            .to_digit(16)
            .ok_or_else(|| format!("{ch:?} is not a hex digit"))?;
        for bit in 0..4 {
            if nibble & (1 << bit) != 0 {
                let core = pos * 4 + bit;
                if core >= MAX_CORES {
                    return Err(format!("core {core} is at or above the limit {MAX_CORES}"));
                }
                cores.push(core);
            }
        }
    }
    Ok(cores)
}

fn parse_core(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let core: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is not a core number"))?;
    if core >= MAX_CORES {
        return Err(format!("core {core} is at or above the limit {MAX_CORES}"));
    }
    Ok(core)
}

fn parse_list(list: &str) -> Result<Vec<usize>, String> {
    let mut cores = Vec::new();
    for item in list.split(',') {
        if let Some((lo, hi)) = item.split_once('-') {
            let (lo, hi) = (parse_core(lo)?, parse_core(hi)?);
            if lo > hi {
                return Err(format!("range {lo}-{hi} is reversed"));
            }
            cores.extend(lo..=hi);
        } else {
            cores.push(parse_core(item)?);
        }
    }
    Ok(cores)
}

/// Cores this process may run on (its affinity set).
pub fn available_cores() -> Vec<usize> {
    core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect()
}

/// Checks that every core of `mask` is in [`available_cores`].
pub fn check_available(mask: &CoreMask) -> Result<(), Error> {
    let available = available_cores();
    match mask.cores().iter().find(|c| !available.contains(c)) {
        Some(&core) => Err(Error::CoreUnavailable { core }),
        None => Ok(()),
    }
}

/// Pins the calling thread to `core`.
pub fn pin_current_thread(core: usize) -> Result<(), Error> {
    if core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        Ok(())
    } else {
        Err(Error::CoreUnavailable { core })
    }
}

/// User + system CPU time of thread `tid` of this process, from
/// `/proc/self/task/<tid>/stat` (fields 14 and 15, in clock ticks).
pub fn thread_cpu_time(tid: i32) -> std::io::Result<std::time::Duration> {
    thread_cpu_times(tid).map(|(user, system)| user + system)
}

/// (user, system) CPU time of thread `tid` of this process, from
/// `/proc/self/task/<tid>/stat` (fields 14 and 15, in clock ticks).
pub fn thread_cpu_times(tid: i32) -> std::io::Result<(std::time::Duration, std::time::Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))?;
    let (user, system) = parse_stat_cpu_ticks(&stat)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad stat line"))?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let to_duration =
        |ticks: u64| std::time::Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / hz);
    Ok((to_duration(user), to_duration(system)))
}

/// (utime, stime) in clock ticks from a `/proc/.../stat` line. The command name (field 2)
/// may contain spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state is field 3, so utime (14) and stime (15) are the 12th and 13th.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_and_lists() {
        assert_eq!(CoreMask::parse("0x3").unwrap().cores(), &[0, 1]);
        assert_eq!(CoreMask::parse("3").unwrap().cores(), &[0, 1]);
        assert_eq!(CoreMask::parse("0xF0").unwrap().cores(), &[4, 5, 6, 7]);
        assert_eq!(CoreMask::parse("[0,1]").unwrap().cores(), &[0, 1]);
        assert_eq!(CoreMask::parse("[0-3]").unwrap().cores(), &[0, 1, 2, 3]);
        assert_eq!(
            CoreMask::parse("[5, 0,2-3]").unwrap().cores(),
            &[0, 2, 3, 5]
        );
        assert_eq!(CoreMask::parse("[1,1]").unwrap().cores(), &[1]);
    }

    #[test]
    fn rejects_bad_masks() {
        for bad in [
            "", "0x", "0x0", "0xg", "[", "[]", "[1-0]", "[a]", "[1,]", "[0-5000]", "zz",
        ] {
            let err = CoreMask::parse(bad).unwrap_err();
            assert!(
                matches!(err, Error::BadCoreMask { .. }),
                "{bad:?} gave {err}"
            );
        }
        let huge = format!("0x1{}", "0".repeat(300));
        assert!(CoreMask::parse(&huge).is_err());
    }

    #[test]
    fn parses_proc_stat() {
        let line = "123 (a b) c) S 1 2 3 4 5 6 7 8 9 10 250 17 0 0 20 0 1 0";
        assert_eq!(parse_stat_cpu_ticks(line), Some((250, 17)));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        assert_eq!(parse_stat_cpu_ticks("1 (x) S 1 2"), None);
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        assert!(thread_cpu_time(tid).is_ok());
    }

    #[test]
    fn display_round_trips() {
        for s in ["0x1", "0x3", "0xf0", "0x105"] {
            let mask = CoreMask::parse(s).unwrap();
            assert_eq!(mask.to_string(), s);
            assert_eq!(CoreMask::parse(&mask.to_string()).unwrap(), mask);
        }
    }
}
