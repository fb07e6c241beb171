//! CPU accounting from /proc and the latency histogram.

// ---------------------------------------------------------------------------
// CPU accounting

/// utime + stime of a process, in seconds (all its threads).
pub(super) fn cpu_seconds(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    // Field 3 (state) is f[0]; utime is field 14, stime field 15.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// The fields of a `cpuN` line of /proc/stat, in order.
pub(super) const CPU_STAT_FIELDS: [&str; 8] = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"];

/// The times of CPUs `cpus` from /proc/stat (the fields of
/// [`CPU_STAT_FIELDS`]), in seconds: every program's, and the kernel's
/// interrupt work, which on veth and loopback runs on the sending CPU and
/// is in neither process's utime+stime alone.
pub(super) fn cpu_times(cpus: &[usize]) -> Option<Vec<[f64; 8]>> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    cpus.iter()
        .map(|c| {
            let name = format!("cpu{c}");
            let line = s.lines().find(|l| l.split_ascii_whitespace().next() == Some(name.as_str()))?;
            let mut t = [0.0; 8];
            for (v, f) in t.iter_mut().zip(line.split_ascii_whitespace().skip(1)) {
                *v = f.parse::<u64>().ok()? as f64 / hz;
            }
            Some(t)
        })
        .collect()
}

/// Time the process's threads spent runnable but waiting for a CPU, in
/// seconds (/proc/PID/task/*/schedstat, second field): how much other
/// programs on its core held it back.
pub(super) fn sched_wait_seconds(pid: &str) -> Option<f64> {
    let mut ns = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(t) = t else { continue };
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            ns += s.split_ascii_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Some(ns as f64 / 1e9)
}

/// The kernel's count of UDP datagrams dropped for want of receive buffer
/// (`RcvbufErrors` in /proc/net/snmp): every socket of this network
/// namespace, not only the run's.
pub(super) fn udp_rcvbuf_errors() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut lines = s.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (lines.next()?, lines.next()?);
    let at = names.split_ascii_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_ascii_whitespace().nth(at)?.parse().ok()
}

// ---------------------------------------------------------------------------
// Latency histogram: log-linear, 64 sub-buckets per power of two (under 1.6% error).

pub(super) struct Histogram {
    pub(super) counts: Vec<u64>,
    pub(super) total: u64,
    pub(super) sum: u128,
    pub(super) max: u64,
}

impl Histogram {
    pub(super) fn new() -> Self {
        Histogram { counts: vec![0; 128 + 64 * 58], total: 0, sum: 0, max: 0 }
    }
    pub(super) fn index(v: u64) -> usize {
        if v < 128 {
            return v as usize;
        }
        let e = 63 - v.leading_zeros() as usize; // >= 7
        let m = (v >> (e - 6)) as usize; // 64..=127
        128 + (e - 7) * 64 + (m - 64)
    }
    pub(super) fn lower(i: usize) -> u64 {
        if i < 128 {
            return i as u64;
        }
        let e = (i - 128) / 64 + 7;
        let m = ((i - 128) % 64 + 64) as u64;
        m << (e - 6)
    }
    pub(super) fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.total += 1;
        self.sum += ns as u128;
        self.max = self.max.max(ns);
    }
    /// The value at quantile `q`, in nanoseconds (bucket midpoint).
    pub(super) fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let lo = Self::lower(i);
                let hi = Self::lower(i + 1);
                return Some(((lo + hi) / 2).min(self.max));
            }
        }
        Some(self.max)
    }
}
