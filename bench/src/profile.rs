//! Where the time goes, measured beside the figures: `--profile DIR` samples
//! this process (the service and the load generator share it) with pprof at
//! 999 Hz while each HTTP scenario runs, and writes per scenario
//! `DIR/<name>.svg` (a flame graph), `DIR/<name>.folded` (folded stacks)
//! and `DIR/<name>.top.txt` (functions by inclusive and by self samples).
//! Without `--profile` nothing is sampled.
//!
//! Every run also reports the CPU each request cost in this process and in
//! the whole machine (from `/proc`, clock ticks of 10 ms): on a 2-core
//! machine where the service, PostgreSQL, the peers and the load generator
//! compete, a change is judged by the CPU it saves, wherever it was spent.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

pub struct Profile {
    guard: pprof::ProfilerGuard<'static>,
    path: PathBuf,
}

/// Starts sampling when a profile directory was asked for.
pub fn start(dir: Option<&Path>, name: &str) -> anyhow::Result<Option<Profile>> {
    let Some(dir) = dir else {
        return Ok(None);
    };
    std::fs::create_dir_all(dir)?;
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(999)
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
        .context("starting the profiler")?;
    Ok(Some(Profile {
        guard,
        path: dir.join(name),
    }))
}

impl Profile {
    pub fn finish(self) -> anyhow::Result<()> {
        let report = self.guard.report().build()?;
        let with = |ext: &str| self.path.with_extension(ext);
        report.flamegraph(std::fs::File::create(with("svg"))?)?;
        let mut folded = std::io::BufWriter::new(std::fs::File::create(with("folded"))?);
        let mut inclusive: HashMap<String, i64> = HashMap::new();
        let mut own: HashMap<String, i64> = HashMap::new();
        let mut total = 0i64;
        for (frames, &count) in &report.data {
            let count = count as i64;
            total += count;
            // Innermost first in pprof; folded stacks go outermost first.
            let names: Vec<String> = frames
                .frames
                .iter()
                .rev()
                .flat_map(|f| f.iter().rev().map(|s| short(&s.name())))
                .collect();
            writeln!(
                folded,
                "{};{} {count}",
                frames.thread_name.replace(';', ":"),
                names.join(";")
            )?;
            let mut seen = std::collections::HashSet::new();
            for n in &names {
                if seen.insert(n) {
                    *inclusive.entry(n.clone()).or_default() += count;
                }
            }
            if let Some(leaf) = names.last() {
                *own.entry(leaf.clone()).or_default() += count;
            }
        }
        let mut top = std::fs::File::create(with("top.txt"))?;
        writeln!(top, "{total} samples")?;
        for (title, table) in [("inclusive", &inclusive), ("self", &own)] {
            let mut rows: Vec<_> = table.iter().collect();
            rows.sort_by(|a, b| b.1.cmp(a.1));
            writeln!(top, "\n== {title} ==")?;
            for (name, n) in rows.into_iter().take(120) {
                let pct = 100.0 * *n as f64 / total.max(1) as f64;
                writeln!(top, "{pct:6.2}% {n:>7} {name}")?;
            }
        }
        Ok(())
    }
}

/// A symbol without its hash suffix and generic arguments, shortened.
fn short(name: &str) -> String {
    let name = name.rsplit_once("::h").map_or(name, |(head, tail)| {
        if tail.len() == 16 && tail.chars().all(|c| c.is_ascii_hexdigit()) {
            head
        } else {
            name
        }
    });
    name.replace(';', ":").chars().take(200).collect()
}

/// CPU clock ticks (1/100 s) used so far by this process and by the
/// whole machine (every process: the service, the database, the peers'
/// clients, the load generator).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    own: u64,
    machine: u64,
}

impl Cpu {
    pub fn now() -> Self {
        Cpu {
            own: ticks(Path::new("/proc/self/stat")).unwrap_or(0),
            machine: machine_ticks().unwrap_or(0),
        }
    }

    /// CPU µs per request since `self`: in this process, and in the whole
    /// machine.
    pub fn per_request(self, requests: f64) -> (f64, f64) {
        let now = Cpu::now();
        let us = |a: u64, b: u64| (b.saturating_sub(a) as f64 * 10_000.0) / requests.max(1.0);
        (us(self.own, now.own), us(self.machine, now.machine))
    }
}

/// Busy ticks of all CPUs (everything but idle and iowait), `/proc/stat`.
fn machine_ticks() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = fields.get(3)? + fields.get(4)?;
    Some(fields.iter().take(8).sum::<u64>() - idle)
}

/// utime + stime of one process, from its `stat` file.
fn ticks(stat: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(stat).ok()?;
    // The command name may hold spaces: fields count from after its ')'.
    let rest = text.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}
