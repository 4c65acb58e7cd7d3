//! The previous version of farmlb's XDP program, timed in the same run as today's: the
//! `lb-ebpf` object of a git revision, built in a temporary `git worktree` the way
//! `lb-userspace/build.rs` (aya-build) builds today's, cached by commit under
//! `target/bench-baseline/`, loaded with its own maps and programmed by today's `Director`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues},
    programs::Xdp,
    Ebpf, EbpfLoader,
};
use farmlb::{
    config::Config,
    dataplane::{
        services::{self, ServiceTable},
        test_run_repeat, CounterKind, Maps,
    },
    director::Director,
};
use lb_common::{
    maps as names, Addr, Backend, Counter, FarmConfig, GlobalConfig, ServiceEntry, ServiceInfo,
    ServiceKey,
};

use crate::workspace_root;

/// Tag used as the baseline when it exists, else `HEAD~1`.
pub const DEFAULT_TAG: &str = "bench-baseline";

/// The revision the baseline is built from.
#[derive(Clone, Debug)]
pub struct Rev {
    /// As given (or chosen by default).
    pub name: String,
    pub commit: String,
}

fn git(args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(workspace_root())
        .output()
        .context("running git")?;
    if !out.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `rev`, or `bench-baseline` if that tag exists, else `HEAD~1`.
pub fn resolve(rev: Option<&str>) -> Result<Rev> {
    let name = match rev {
        Some(r) => r.to_string(),
        None if git(&["rev-parse", "-q", "--verify", "refs/tags/bench-baseline"]).is_ok() => {
            DEFAULT_TAG.to_string()
        }
        None => "HEAD~1".to_string(),
    };
    let commit = git(&["rev-parse", "--verify", &format!("{name}^{{commit}}")])
        .with_context(|| format!("resolving the baseline revision {name}"))?;
    Ok(Rev { name, commit })
}

/// The `lb-ebpf` object of `rev`: from the cache, or built in a temporary worktree.
pub fn object(rev: &Rev) -> Result<Vec<u8>> {
    let dir = super::target_dir().join("bench-baseline");
    let cached = dir.join(format!("{}.o", rev.commit));
    if let Ok(b) = std::fs::read(&cached) {
        return Ok(b);
    }
    std::fs::create_dir_all(&dir)?;
    let tree = dir.join(format!("src-{}", &rev.commit[..12]));
    if tree.exists() {
        let _ = git(&["worktree", "remove", "--force", &tree.to_string_lossy()]);
        let _ = std::fs::remove_dir_all(&tree);
    }
    git(&[
        "worktree",
        "add",
        "--detach",
        &tree.to_string_lossy(),
        &rev.commit,
    ])?;
    let built = build(&tree, &dir.join("target"));
    let _ = git(&["worktree", "remove", "--force", &tree.to_string_lossy()]);
    let obj = built?;
    std::fs::copy(&obj, &cached).with_context(|| format!("caching {}", obj.display()))?;
    Ok(std::fs::read(&cached)?)
}

/// What aya-build runs for `lb-userspace/build.rs`, in `tree`, into `target_dir`.
fn build(tree: &Path, target_dir: &Path) -> Result<PathBuf> {
    eprintln!(
        "xtask bench: building the baseline's lb-ebpf in {}",
        tree.display()
    );
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build"])
        .args(["--package", "lb-ebpf", "--bins", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!(
                "--cfg=bpf_target_arch=\"{}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
                std::env::consts::ARCH
            ),
        )
        .current_dir(tree);
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "RUSTFLAGS",
    ] {
        cmd.env_remove(key);
    }
    let out = cmd.output().context("running cargo for the baseline")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| l.starts_with("error"))
            .or_else(|| err.lines().rev().find(|l| !l.trim().is_empty()))
            .unwrap_or("no output");
        bail!("building lb-ebpf at the baseline failed: {last}");
    }
    let obj = target_dir.join("bpfel-unknown-none/release/lb-ebpf");
    if !obj.exists() {
        bail!("the baseline build left no {}", obj.display());
    }
    Ok(obj)
}

/// A baseline's service maps: the hash map of layout 1, or today's table.
enum OldServices {
    Hash(BpfHashMap<MapData, ServiceKey, ServiceInfo>),
    Table {
        mirror: Box<ServiceTable>,
        index: Array<MapData, u32>,
        entries: Array<MapData, ServiceEntry>,
    },
}

/// Layout 1's service map (a hash map by `ServiceKey`).
const OLD_SERVICES: &str = "SERVICES";

impl OldServices {
    fn take(ebpf: &mut Ebpf) -> Result<Self> {
        if ebpf.map(OLD_SERVICES).is_some() {
            return Ok(Self::Hash(take(ebpf, OLD_SERVICES)?));
        }
        Ok(Self::Table {
            mirror: Box::default(),
            index: take(ebpf, names::SERVICE_INDEX)?,
            entries: take(ebpf, names::SERVICE_ENTRIES)?,
        })
    }
}

/// Size of `GlobalConfig` before the flood guard: today's fields up to `layout_version`.
const SHORT_CONFIG: usize = 16;

/// A baseline's `CONFIG`: today's `GlobalConfig`, or the prefix it had before the flood guard
/// (the fields it kept sit at the same offsets).
enum OldConfig {
    Current(Array<MapData, GlobalConfig>),
    Short(Array<MapData, [u8; SHORT_CONFIG]>),
}

impl OldConfig {
    fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let size = ebpf
            .map(names::CONFIG)
            .map(|m| match m {
                aya::maps::Map::Array(d) => d.info().map(|i| i.value_size()).unwrap_or(0),
                _ => 0,
            })
            .unwrap_or(0) as usize;
        if size == SHORT_CONFIG {
            Ok(Self::Short(take(ebpf, names::CONFIG)?))
        } else {
            Ok(Self::Current(take(ebpf, names::CONFIG)?))
        }
    }
}

/// The baseline's maps, written through today's `Maps` interface.
struct OldMaps {
    services: OldServices,
    vip_addrs: BpfHashMap<MapData, Addr, u32>,
    /// Versions that filter on the VIP address before any lookup have `VIP_FILTER`.
    vip_filter: Option<Array<MapData, u64>>,
    ring: Array<MapData, u32>,
    backends: Array<MapData, Backend>,
    config: OldConfig,
    farm: Array<MapData, FarmConfig>,
    svc_stats: PerCpuArray<MapData, Counter>,
    backend_stats: PerCpuArray<MapData, Counter>,
    cpus: usize,
}

use farmlb::dataplane::take;

impl Maps for OldMaps {
    fn set_config(&mut self, cfg: &GlobalConfig) -> Result<()> {
        match &mut self.config {
            OldConfig::Current(a) => Ok(a.set(0, cfg, 0)?),
            OldConfig::Short(a) => {
                // SAFETY: `GlobalConfig` is plain `repr(C)` data at least `SHORT_CONFIG` long.
                let bytes: [u8; SHORT_CONFIG] =
                    unsafe { std::ptr::read_unaligned((cfg as *const GlobalConfig).cast()) };
                Ok(a.set(0, bytes, 0)?)
            }
        }
    }
    fn set_farm(&mut self, cfg: &FarmConfig) -> Result<()> {
        Ok(self.farm.set(0, cfg, 0)?)
    }
    fn set_service(&mut self, key: &ServiceKey, info: &ServiceInfo) -> Result<()> {
        match &mut self.services {
            OldServices::Hash(m) => Ok(m.insert(key, info, 0)?),
            OldServices::Table {
                mirror,
                index,
                entries,
            } => services::apply(&mirror.set(key, info)?, index, entries),
        }
    }
    fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        match &mut self.services {
            OldServices::Hash(m) => Ok(m.remove(key)?),
            OldServices::Table {
                mirror,
                index,
                entries,
            } => services::apply(&mirror.remove(key), index, entries),
        }
    }
    fn set_vip_addr(&mut self, addr: &Addr) -> Result<()> {
        if let Some(f) = &mut self.vip_filter {
            let bit = lb_common::vip_filter_bit(addr);
            let word = f.get(&(bit / 64), 0)?;
            f.set(bit / 64, word | 1 << (bit % 64), 0)?;
        }
        Ok(self.vip_addrs.insert(addr, 1, 0)?)
    }
    /// The filter bit stays set: a stale bit only costs the lookups it would have saved.
    fn remove_vip_addr(&mut self, addr: &Addr) -> Result<()> {
        Ok(self.vip_addrs.remove(addr)?)
    }
    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<()> {
        Ok(self.backends.set(id, b, 0)?)
    }
    fn write_ring(&mut self, offset: u32, slots: &[(u32, u32)]) -> Result<()> {
        for &(slot, id) in slots {
            self.ring.set(offset + slot, id, 0)?;
        }
        Ok(())
    }
    fn reset_counter(&mut self, kind: CounterKind, id: u32) -> Result<()> {
        let a = match kind {
            CounterKind::Service => &mut self.svc_stats,
            CounterKind::Backend => &mut self.backend_stats,
        };
        let zero = PerCpuValues::try_from(vec![Counter::default(); self.cpus])?;
        Ok(a.set(id, zero, 0)?)
    }
    fn retire_backend_counter(&mut self, _: u32, backend: u32) -> Result<()> {
        // The benchmark reads no service totals of the previous version.
        self.reset_counter(CounterKind::Backend, backend)
    }
}

/// The baseline's `farmlb_xdp`, loaded and programmed.
pub struct OldDataplane {
    ebpf: Ebpf,
    stats: PerCpuArray<MapData, u64>,
}

impl OldDataplane {
    /// Load `object`'s program with maps sized as today's and program them with today's
    /// director from `cfg`.
    pub fn load(
        object: &[u8],
        cfg: &Config,
        ring_slots: u32,
        conntrack_size: u32,
        own_mac: [u8; 6],
        macs: &mut HashMap<IpAddr, [u8; 6]>,
    ) -> Result<OldDataplane> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::RING, ring_slots)
            .map_max_entries(names::CONNTRACK, conntrack_size)
            .load(object)
            .map_err(|e| anyhow!("loading the baseline object: {e}"))?;
        let prog: &mut Xdp = ebpf
            .program_mut(names::PROGRAM)
            .ok_or_else(|| anyhow!("no {} in the baseline object", names::PROGRAM))?
            .try_into()?;
        prog.load()
            .map_err(|e| anyhow!("the verifier rejected the baseline: {e}"))?;
        let mut maps = OldMaps {
            services: OldServices::take(&mut ebpf)?,
            vip_addrs: take(&mut ebpf, names::VIP_ADDRS)?,
            vip_filter: match ebpf.map(names::VIP_FILTER) {
                Some(_) => Some(take(&mut ebpf, names::VIP_FILTER)?),
                None => None,
            },
            ring: take(&mut ebpf, names::RING)?,
            backends: take(&mut ebpf, names::BACKENDS)?,
            config: OldConfig::take(&mut ebpf)?,
            farm: take(&mut ebpf, names::FARM)?,
            svc_stats: take(&mut ebpf, names::SVC_STATS)?,
            backend_stats: take(&mut ebpf, names::BACKEND_STATS)?,
            cpus: aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?,
        };
        let stats = take(&mut ebpf, names::STATS)?;
        let mut director = Director::new(ring_slots, own_mac);
        director
            .apply(cfg, &mut maps, macs)
            .map_err(|e| anyhow!("programming the baseline's maps: {e:#}"))?;
        Ok(OldDataplane { ebpf, stats })
    }

    fn prog(&self) -> &Xdp {
        self.ebpf
            .program(names::PROGRAM)
            .expect("loaded")
            .try_into()
            .expect("loaded as XDP")
    }

    /// Per-reason packet counts, summed over CPUs (today's `Stat` numbering).
    pub fn stats(&self) -> Result<Vec<u64>> {
        let n = self.stats.len();
        (0..n)
            .map(|i| Ok(self.stats.get(&i, 0)?.iter().sum()))
            .collect()
    }

    pub fn test_run_repeat(&self, packet: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        test_run_repeat(self.prog(), packet, repeat)
    }
}
