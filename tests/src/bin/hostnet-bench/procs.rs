//! What the harness reads from `/proc`: CPU time and memory of the relay processes (hostnet's
//! proxy and agent, the socat chain), who they are, and a description of the machine.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use hostnet_tests::{DEADLINE, Demo};

/// Clock ticks per second, the unit of `utime`/`stime` in `/proc/<pid>/stat`.
pub fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().map_or(100.0, |t| t as f64)
}

/// The numeric fields of `/proc/<pid>/stat` after the command name (field 3 onwards), or
/// `None` if the process is gone.
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    // Field 3 (state) is a letter: keep it as 0 so indexes stay `field number - 3`.
    Some(rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
}

/// CPU-seconds used by `pid` (all its threads, user + system); with `children`, also those of
/// its children it has waited for (socat's forked per-connection processes).
pub fn cpu_seconds(pid: u32, children: bool) -> f64 {
    let Some(f) = stat_fields(pid) else { return 0.0 };
    // utime = field 14, stime 15, cutime 16, cstime 17.
    let field = |n: usize| f.get(n - 3).copied().unwrap_or(0);
    let mut ticks = field(14) + field(15);
    if children {
        ticks += field(16) + field(17);
    }
    ticks as f64 / clock_ticks()
}

/// The threads of `pid`, by thread id (none once it is gone).
fn threads(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks.flatten().filter_map(|t| t.file_name().to_str()?.parse().ok()).collect()
}

/// Direct children of `pid` (from every thread's `children` list).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = BTreeSet::new();
    for tid in threads(pid) {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")) {
            out.extend(text.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out.into_iter().collect()
}

/// Every thread of this process and of the processes under it (the demos' proxies and agents,
/// socat and its per-connection children, the bare relays), by thread id.
fn family_threads() -> Vec<u32> {
    let mut pids = vec![std::process::id()];
    let mut i = 0;
    while let Some(&pid) = pids.get(i) {
        pids.extend(children(pid));
        i += 1;
    }
    pids.into_iter().flat_map(threads).collect()
}

/// Runs `f` with every thread of this process and of the processes under it on one CPU — the
/// first this thread may use — so that no wake-up between them crosses CPUs; then gives each
/// thread back the CPUs it had (threads started meanwhile get this thread's). Returns that CPU
/// and `f`'s result.
pub fn on_one_cpu<T>(f: impl FnOnce() -> T) -> (usize, T) {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;
    let here = Pid::from_raw(0);
    let mine = sched_getaffinity(here).unwrap_or_else(|_| CpuSet::new());
    let cpu = (0..CpuSet::count()).find(|&c| mine.is_set(c).unwrap_or(false)).unwrap_or(0);
    let mut one = CpuSet::new();
    let _ = one.set(cpu);
    let tid = |t: u32| Pid::from_raw(t as i32);
    let had: Vec<(Pid, CpuSet)> =
        family_threads().into_iter().map(tid).filter_map(|t| Some((t, sched_getaffinity(t).ok()?))).collect();
    for (t, _) in &had {
        // A thread that exited meanwhile has nothing to pin.
        let _ = sched_setaffinity(*t, &one);
    }
    let out = f();
    for t in family_threads().into_iter().map(tid) {
        let before = had.iter().find(|(h, _)| *h == t).map_or(&mine, |(_, set)| set);
        let _ = sched_setaffinity(t, before);
    }
    (cpu, out)
}

/// The process name (`comm`) of `pid`.
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_owned()
}

/// Proportional set size of `pid` in bytes (its resident memory, shared pages split between
/// the processes sharing them: right for socat's forked children).
pub fn pss_bytes(pid: u32) -> u64 {
    rollup_kib(pid, "Pss:") * 1024
}

/// Resident set size of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    rollup_kib(pid, "Rss:") * 1024
}

fn rollup_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.split_whitespace().next()?.parse().ok()))
        .unwrap_or(0)
}

/// hostnet's two processes in the stand-in: the proxy (`hostnet-proxy demo`) and the agent it
/// runs inside the namespace (`ip netns exec` replaces itself with the agent, so the agent is
/// a direct child of the proxy).
#[derive(Debug, Clone, Copy)]
pub struct Hostnet {
    pub proxy: u32,
    pub agent: u32,
}

impl Hostnet {
    /// Finds the agent under the demo, waiting for it (it may be restarting) up to the deadline.
    pub fn find(demo: &Demo) -> Hostnet {
        let proxy = demo.pid().unsigned_abs();
        let start = Instant::now();
        loop {
            if let Some(agent) = children(proxy).into_iter().find(|&c| comm(c) == "hostnet-agent") {
                return Hostnet { proxy, agent };
            }
            assert!(start.elapsed() < DEADLINE, "no hostnet-agent child under the demo (pid {proxy})");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.proxy, false) + cpu_seconds(self.agent, false)
    }

    /// Page faults (minor) and context switches (all threads, both kinds) of proxy + agent so
    /// far: what a relay's CPU per GiB is spent on besides moving bytes.
    pub fn faults_and_switches(&self) -> (u64, u64) {
        [self.proxy, self.agent].iter().fold((0, 0), |(f, s), &pid| {
            // minflt = field 10, for all of the process's threads.
            let faults = stat_fields(pid).and_then(|v| v.get(10 - 3).copied()).unwrap_or(0);
            (f + faults, s + context_switches(pid))
        })
    }
}

/// Voluntary and involuntary context switches of all of `pid`'s threads.
fn context_switches(pid: u32) -> u64 {
    threads(pid)
        .into_iter()
        .filter_map(|tid| std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok())
        .map(|text| {
            text.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// CPU-seconds of this process (the benchmark's clients and servers, direct and "guest" alike).
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id(), false)
}

/// The machine: CPU model and count, memory, kernel, OS, and its load when the run started.
pub fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|v| v.split_once(':')).map(|(_, v)| v.trim()))
        .unwrap_or("unknown CPU")
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:").and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / (1u64 << 20) as f64);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_owned()))
        .unwrap_or_default();
    // Other work on the machine skews every path alike; the load says how much there was.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load1: f64 = load.split_whitespace().next().and_then(|l| l.parse().ok()).unwrap_or(0.0);
    serde_json::json!({
        "load_average_1min_at_start": load1,
        "tcp_time_wait_at_start": tcp_time_wait(),
        "cpu": model,
        "cores": cores,
        "memory_gib": (mem_gib * 10.0).round() / 10.0,
        "kernel": kernel,
        "os": os,
        "idle": idle(),
    })
}

/// How this machine's idle CPUs wait (`/sys/devices/system/cpu/cpuidle`): the cpuidle driver
/// and, with the `haltpoll` driver of a VM, how long an idle virtual CPU polls before it halts.
/// A halted virtual CPU costs a wake-up through the hypervisor (~35–40 µs here with 0 ns of
/// polling, *round seventeen* in docs/performance.md), paid by every pass between processes
/// that lands on it: a chain of four processes pays it more often than two.
pub fn idle() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
    let driver = read("/sys/devices/system/cpu/cpuidle/current_driver");
    let poll_ns =
        read("/sys/module/haltpoll/parameters/guest_halt_poll_ns").and_then(|s| s.parse::<u64>().ok());
    serde_json::json!({ "cpuidle_driver": driver, "guest_halt_poll_ns": poll_ns })
}

/// [`idle`] in words, for the run's last line.
pub fn idle_words(idle: &serde_json::Value) -> String {
    match (idle["cpuidle_driver"].as_str(), idle["guest_halt_poll_ns"].as_u64()) {
        (Some(d), Some(0)) => format!("idle CPUs halt at once ({d}, no polling)"),
        (Some(d), Some(ns)) => format!("idle CPUs poll {} µs before halting ({d})", ns / 1000),
        (Some(d), None) => format!("cpuidle driver {d}"),
        (None, _) => "cpuidle driver unknown".to_owned(),
    }
}

/// TCP sockets in TIME_WAIT on this machine (`/proc/net/sockstat`): a table filling up (other
/// connection-heavy work a minute before) makes every connect search longer for a free port,
/// on every path.
pub fn tcp_time_wait() -> u64 {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    sockstat
        .lines()
        .find_map(|l| {
            let mut words = l.strip_prefix("TCP:")?.split_whitespace();
            while let Some(w) = words.next() {
                if w == "tw" {
                    return words.next()?.parse().ok();
                }
            }
            None
        })
        .unwrap_or(0)
}

/// CPU-seconds the hypervisor has taken from this machine's virtual CPUs since boot (`steal`
/// in `/proc/stat`): time the paths wanted to run and could not, on a shared host.
pub fn steal_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let steal = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu ")?.split_whitespace().nth(7)?.parse::<f64>().ok())
        .unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    steal / if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Raises this process's open-file limit (inherited by the demo it starts) so the
/// 10 000-connection workload fits: each connection costs descriptors on both ends here and
/// in the proxy and the agent.
pub fn raise_nofile(want: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    if soft >= want {
        return soft;
    }
    // Root may raise the hard limit too; otherwise take what the hard limit allows.
    if setrlimit(Resource::RLIMIT_NOFILE, want, want.max(hard)).is_ok()
        || setrlimit(Resource::RLIMIT_NOFILE, hard.min(want), hard).is_ok()
    {
        return getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(s, _)| s);
    }
    soft
}
