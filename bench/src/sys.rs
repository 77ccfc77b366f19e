//! What the operating system tells about a process: CPU time, resident memory, file limits.
//! The client reports its own CPU share so a reader can see it was not the bottleneck.

use std::time::Duration;

fn self_rusage() -> libc::rusage {
    // SAFETY: getrusage writes into the struct we hand it and nothing else.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru
}

/// CPU time (user + system) this process has used so far.
pub fn self_cpu() -> Duration {
    let ru = self_rusage();
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Times this process's threads went to sleep waiting so far (voluntary context switches): for
/// the load client, mostly waits in epoll for the next response. On loopback the server's send
/// wakes a sleeping client itself, so how often the client sleeps shows in the server's CPU.
pub fn self_sleeps() -> u64 {
    u64::try_from(self_rusage().ru_nvcsw).unwrap_or(0)
}

fn tv(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Time the hypervisor ran something else while a core wanted to run ours ("steal", the 8th
/// figure of each `cpuN` line in `/proc/stat`), per core, since boot. On a shared virtual machine
/// it comes in waves of seconds; a latency measured under one is the host's, not the server's.
#[derive(Clone)]
pub struct Steal {
    ticks: Vec<u64>,
}

impl Steal {
    pub fn now() -> Self {
        let ticks = std::fs::read_to_string("/proc/stat")
            .map(|s| {
                s.lines()
                    .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
                    .map(|l| l.split_whitespace().nth(8).and_then(|v| v.parse().ok()).unwrap_or(0))
                    .collect()
            })
            .unwrap_or_default();
        Steal { ticks }
    }

    /// Seconds stolen from each of `cores` since `self`.
    pub fn stolen_secs<const N: usize>(&self, cores: [usize; N]) -> [f64; N] {
        let now = Steal::now();
        cores.map(|c| match (self.ticks.get(c), now.ticks.get(c)) {
            (Some(a), Some(b)) => b.saturating_sub(*a) as f64 / clock_ticks() as f64,
            _ => 0.0,
        })
    }
}

/// The core this thread last ran on (the client's, when it is pinned to one).
pub fn current_core() -> Option<usize> {
    // SAFETY: sched_getcpu has no preconditions.
    let c = unsafe { libc::sched_getcpu() };
    usize::try_from(c).ok()
}

/// CPU time (user + system, all threads) of process `pid`, from /proc/PID/stat.
pub fn proc_cpu(pid: u32) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields resume after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of the man page, so utime (14) and stime (15) are at 11 and 12.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / clock_ticks()))
}

/// The core process `pid` last ran on (`/proc/PID/stat`, field 39).
fn proc_core(pid: u32) -> Option<usize> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 2..].split_whitespace().nth(36)?.parse().ok()
}

/// Time on CPU of the live threads of `pid`, in nanoseconds (`/proc/PID/task/*/schedstat`).
/// Finer than [`proc_cpu`]'s clock ticks (10 ms), which cannot tell 0 % from 0.3 % over a few
/// idle seconds; threads that exit during the window are not counted, so use it only for idle
/// windows.
pub fn proc_cpu_precise(pid: u32) -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        let s = std::fs::read_to_string(path).ok()?;
        total += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

/// Resident set size of `pid` in bytes (VmRSS), with its children's if `with_children`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Leaves the choice of `sock`'s local port to `connect`, when it binds to an address with port 0.
///
/// Why: `bind` with port 0 must find a port no other socket of that address has bound, and
/// searches for one from a random start; with thousands of connections already held from the
/// address (`ws-hold`), that search is long, and the holders' core spent its time in it: some
/// `connections` runs took 25 s instead of half a second to open 19,000 connections, with the
/// server idle. `connect` only needs the four-tuple to be unique.
pub fn pick_port_at_connect(sock: &impl std::os::fd::AsRawFd) {
    let on: libc::c_int = 1;
    // Best effort: without it, `bind` still works, only slower. SAFETY: the descriptor is
    // `sock`'s, open while it is borrowed; the call reads `on`, of the length given, and nothing
    // else.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Raises the soft open-files limit to the hard one (children inherit it).
pub fn raise_nofile() -> u64 {
    // SAFETY: plain get/set of this process's own limit.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            return r.rlim_cur as u64;
        }
    }
    1024
}

/// Measures the CPU share of this process and of a server process over one interval.
pub struct CpuMeter {
    start: std::time::Instant,
    self0: Duration,
    sleeps0: u64,
    server: Option<(u32, Duration)>,
    steal: Steal,
    /// The server's core (where it last ran: it is pinned to one) and the client's.
    cores: [usize; 2],
}

impl CpuMeter {
    pub fn start(server_pid: Option<u32>) -> Self {
        let client_core = current_core().unwrap_or(0);
        CpuMeter {
            start: std::time::Instant::now(),
            self0: self_cpu(),
            sleeps0: self_sleeps(),
            server: server_pid.and_then(|p| proc_cpu(p).map(|c| (p, c))),
            steal: Steal::now(),
            cores: [server_pid.and_then(proc_core).unwrap_or(client_core), client_core],
        }
    }

    /// Shares of the time since `start` the host took from (the server's core, the client's).
    pub fn stolen(&self) -> (f64, f64) {
        let wall = self.start.elapsed().as_secs_f64().max(1e-9);
        let [server, client] = self.steal.stolen_secs(self.cores);
        (server / wall, client / wall)
    }

    /// Times the client went to sleep waiting since `start` ([`self_sleeps`]).
    pub fn client_sleeps(&self) -> u64 {
        self_sleeps().saturating_sub(self.sleeps0)
    }

    /// (client share of one core, server share of one core), e.g. 0.93 = 93 %.
    pub fn stop(&self) -> (f64, Option<f64>) {
        let wall = self.start.elapsed().as_secs_f64().max(1e-9);
        let client = (self_cpu() - self.self0).as_secs_f64() / wall;
        let server = self
            .server
            .and_then(|(p, c0)| proc_cpu(p).map(|c| (c.saturating_sub(c0)).as_secs_f64() / wall));
        (client, server)
    }
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub fn nproc() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Cores on the machine (not just those this process may run on).
pub fn nproc_all() -> usize {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| s.lines().filter(|l| l.starts_with("processor")).count())
        .ok()
        .filter(|n| *n > 0)
        .unwrap_or_else(nproc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_read_per_core_and_never_runs_backwards() {
        let before = Steal::now();
        assert_eq!(before.ticks.len(), std::fs::read_to_string("/proc/stat").unwrap().lines().filter(|l| l.starts_with("cpu") && !l.starts_with("cpu ")).count());
        let [first, missing] = before.stolen_secs([0, usize::MAX]);
        assert!(first >= 0.0, "steal since a snapshot cannot be negative: {first}");
        assert_eq!(missing, 0.0, "a core that does not exist has nothing stolen");
    }

    #[test]
    fn each_wait_of_a_thread_counts_as_a_sleep() {
        let before = self_sleeps();
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(self_sleeps() >= before + 3, "three waits, {} sleeps counted", self_sleeps() - before);
    }
}
