//! Kernel accounting the forwarding benchmark reads: /proc/stat, per-thread run time,
//! threaded NAPI kthreads, CPU affinity, interface counters.

use std::collections::BTreeSet;
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lb_tests::netns;
use serde_json::Value;

/// Per-CPU jiffies from /proc/stat: user nice system idle iowait irq softirq steal …
pub fn cpu_times() -> Result<Vec<Vec<u64>>> {
    let text = fs::read_to_string("/proc/stat")?;
    Ok(text
        .lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        })
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .collect())
}

/// Nanoseconds per /proc/stat tick (USER_HZ).
pub fn ns_per_tick() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1e9 / if hz > 0 { hz as f64 } else { 100.0 }
}

/// Column of /proc/stat cpu lines.
pub const SYSTEM: usize = 2;
pub const SOFTIRQ: usize = 6;

/// Sum over CPUs of `b[col] - a[col]`, in ns.
pub fn delta_ns(a: &[Vec<u64>], b: &[Vec<u64>], col: usize) -> f64 {
    let ticks: u64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| y.get(col).unwrap_or(&0) - x.get(col).unwrap_or(&0))
        .sum();
    ticks as f64 * ns_per_tick()
}

/// CPU time a task has run, in ns (`/proc/<pid>/schedstat`, first field). Without
/// IRQ-time accounting this includes softirqs processed in the task's context.
pub fn task_runtime_ns(pid: i32) -> Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .with_context(|| format!("reading schedstat of {pid}"))?;
    s.split_whitespace()
        .next()
        .and_then(|x| x.parse().ok())
        .context("parsing schedstat")
}

/// (pid, name) of every threaded-NAPI kthread (`napi/<dev>-<id>`).
fn napi_threads() -> Result<BTreeSet<(i32, String)>> {
    let mut out = BTreeSet::new();
    for e in fs::read_dir("/proc")? {
        let Ok(e) = e else { continue };
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm")) {
            if comm.starts_with("napi/") {
                out.insert((pid, comm.trim().to_string()));
            }
        }
    }
    Ok(out)
}

fn write_threaded(ns: &str, dev: &str, on: bool) -> Result<()> {
    let cmd = format!("echo {} > /sys/class/net/{dev}/threaded", u8::from(on));
    netns::exec(ns, &["sh", "-c", &cmd])?;
    Ok(())
}

/// Switch `dev` in `ns` to threaded NAPI and return the pid of its (single) NAPI kthread.
/// The thread is found by switching threading off and on and seeing which one appears.
pub fn threaded_napi(ns: &str, dev: &str) -> Result<i32> {
    write_threaded(ns, dev, false)?;
    let before = napi_threads()?;
    write_threaded(ns, dev, true)?;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let new: Vec<(i32, String)> = napi_threads()?.difference(&before).cloned().collect();
        let prefix = format!("napi/{dev}-");
        let ours: Vec<&(i32, String)> =
            new.iter().filter(|(_, c)| c.starts_with(&prefix)).collect();
        match ours.as_slice() {
            [(pid, _)] => return Ok(*pid),
            [] if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            [] => bail!("no NAPI thread appeared for {dev} in {ns}"),
            many => bail!("several NAPI threads appeared for {dev} in {ns}: {many:?}"),
        }
    }
}

pub fn unthread_napi(ns: &str, dev: &str) -> Result<()> {
    write_threaded(ns, dev, false)
}

/// Pin task `pid` (0 = the calling thread) to one CPU.
pub fn pin(pid: i32, cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; the libc macros only set bits inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("pinning task {pid} to CPU {cpu}"));
        }
    }
    Ok(())
}

/// Run task `pid` under `policy` (`libc::SCHED_OTHER`, `libc::SCHED_IDLE`), priority 0.
pub fn set_policy(pid: i32, policy: i32) -> Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: valid parameter struct for the call's duration.
    if unsafe { libc::sched_setscheduler(pid, policy, &param) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setting the scheduling policy of task {pid}"));
    }
    Ok(())
}

pub fn cpu_count() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

/// Packet counters of one interface.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkCounters {
    pub tx_packets: u64,
    pub tx_dropped: u64,
    pub rx_packets: u64,
}

/// Counters of every interface in namespace `ns`, by name.
pub fn link_counters(ns: &str) -> Result<Vec<(String, LinkCounters)>> {
    let out = netns::run(&["ip", "-n", ns, "-s", "-j", "link", "show"])?;
    let v: Value = serde_json::from_str(&out).context("parsing `ip -s -j link`")?;
    let mut res = Vec::new();
    for l in v.as_array().into_iter().flatten() {
        let name = l["ifname"].as_str().unwrap_or_default().to_string();
        let st = &l["stats64"];
        let g = |dir: &str, k: &str| st[dir][k].as_u64().unwrap_or(0);
        res.push((
            name,
            LinkCounters {
                tx_packets: g("tx", "packets"),
                tx_dropped: g("tx", "dropped"),
                rx_packets: g("rx", "packets"),
            },
        ));
    }
    Ok(res)
}

/// First line of a command's output (versions for the report), or "".
pub fn first_line(args: &[&str]) -> String {
    netns::run(args)
        .map(|o| o.lines().next().unwrap_or_default().trim().to_string())
        .unwrap_or_default()
}
