//! The pinned data plane: program, XDP link and maps live under a bpffs directory, so the
//! kernel keeps forwarding with the last tables while no daemon runs (a crash, an upgrade).
//! A starting daemon adopts what it finds there if the layout matches, and refuses, changing
//! nothing, if it does not.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{Array, MapData, MapInfo};
use lb_common::{
    maps as names, Addr, Backend, Counter, CtEntry, CtKey, FarmConfig, FloodWindow, GlobalConfig,
    ServiceEntry, Stat, TunnelInfo, BACKEND_SLOTS, LAYOUT_VERSION, MAX_SERVICES, MAX_VIP_ADDRS,
    SERVICE_DROP_REASONS, SERVICE_ENTRY_SLOTS, SERVICE_SLOTS, VIP_FILTER_WORDS,
};

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pin of the XDP link (its presence means a data plane is attached).
pub const LINK: &str = "link";
/// The pin of the program the link runs.
pub const PROGRAM: &str = "program";

/// Every map, pinned under its own name.
pub const MAPS: [&str; 15] = [
    names::SERVICE_INDEX,
    names::SERVICE_ENTRIES,
    names::VIP_ADDRS,
    names::VIP_FILTER,
    names::RING,
    names::BACKENDS,
    names::CONNTRACK,
    names::CONFIG,
    names::FARM,
    names::STATS,
    names::SVC_STATS,
    names::BACKEND_STATS,
    names::FLOOD,
    names::SVC_DROPS,
    names::TUNNELS,
];

fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: valid C string and out-pointer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

/// Make sure `dir` exists on a bpffs, mounting one at /sys/fs/bpf when the directory is
/// below it and nothing is mounted there (as `ip netns exec` leaves it). Returns whether this
/// process mounted it: pins made through a mount of our own vanish with our mount namespace.
pub fn ensure_bpffs(dir: &Path) -> Result<bool> {
    let sys = Path::new("/sys/fs/bpf");
    let mut mounted = false;
    let base = dir
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or(Path::new("/"));
    if !is_bpffs(base) {
        if !dir.starts_with(sys) || is_bpffs(sys) {
            bail!(
                "pin_path {}: {} is not on a bpffs (mount one: mount -t bpf bpf DIR)",
                dir.display(),
                base.display()
            );
        }
        let st = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .context("mounting bpffs at /sys/fs/bpf")?;
        anyhow::ensure!(st.success(), "mount -t bpf bpf /sys/fs/bpf failed");
        mounted = true;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(mounted)
}

/// Whether this process runs in another mount namespace than init (e.g. `ip netns exec`).
pub fn private_mount_namespace() -> bool {
    let ns = |p: &str| std::fs::read_link(p).ok();
    ns("/proc/self/ns/mnt") != ns("/proc/1/ns/mnt")
}

/// What a map must look like to be adopted.
struct Spec {
    name: &'static str,
    key: usize,
    value: usize,
    max: u32,
}

/// The maps as this build lays them out, for a data plane of `ring_slots` and
/// `conntrack_size`.
fn specs(ring_slots: u32, conntrack_size: u32) -> [Spec; 15] {
    use std::mem::size_of;
    let s = |name, key, value, max| Spec {
        name,
        key,
        value,
        max,
    };
    [
        s(names::SERVICE_INDEX, 4, 4, SERVICE_SLOTS),
        s(
            names::SERVICE_ENTRIES,
            4,
            size_of::<ServiceEntry>(),
            SERVICE_ENTRY_SLOTS,
        ),
        s(names::VIP_ADDRS, size_of::<Addr>(), 4, MAX_VIP_ADDRS),
        s(names::VIP_FILTER, 4, 8, VIP_FILTER_WORDS),
        s(names::RING, 4, 4, ring_slots),
        s(names::BACKENDS, 4, size_of::<Backend>(), BACKEND_SLOTS),
        s(
            names::CONNTRACK,
            size_of::<CtKey>(),
            size_of::<CtEntry>(),
            conntrack_size,
        ),
        s(names::CONFIG, 4, size_of::<GlobalConfig>(), 1),
        s(names::FARM, 4, size_of::<FarmConfig>(), 1),
        s(names::STATS, 4, 8, Stat::COUNT),
        s(names::SVC_STATS, 4, size_of::<Counter>(), MAX_SERVICES),
        s(names::BACKEND_STATS, 4, size_of::<Counter>(), BACKEND_SLOTS),
        s(names::FLOOD, 4, size_of::<FloodWindow>(), 1),
        s(
            names::SVC_DROPS,
            4,
            8,
            MAX_SERVICES * SERVICE_DROP_REASONS.len() as u32,
        ),
        s(names::TUNNELS, 4, size_of::<TunnelInfo>(), MAX_SERVICES),
    ]
}

/// A pinned data plane found at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// Slots of its ring (it cannot grow without a fresh data plane).
    pub ring_slots: u32,
}

/// Look at `dir`: `None` if nothing is pinned there; the pinned data plane if every map
/// matches this build's layout; else an error naming the first difference (nothing changed).
/// `ring_slots` is what the configuration needs at least.
pub fn inspect(dir: &Path, ring_slots: u32, conntrack_size: u32) -> Result<Option<Found>> {
    let present: Vec<&str> = MAPS
        .iter()
        .copied()
        .filter(|m| dir.join(m).exists())
        .collect();
    if present.is_empty() {
        return Ok(None);
    }
    let refuse = |what: String| {
        anyhow!(
            "the data plane pinned at {} is incompatible: {what}; remove it with `farmlb stop \
             --detach` (this drops its connection table) or set another pin_path",
            dir.display()
        )
    };
    if present.len() != MAPS.len() {
        let missing: Vec<&str> = MAPS
            .iter()
            .copied()
            .filter(|m| !present.contains(m))
            .collect();
        return Err(refuse(format!("map {} missing", missing.join(", "))));
    }
    let ring = MapInfo::from_pin(dir.join(names::RING))
        .with_context(|| format!("opening the pinned {}", names::RING))?
        .max_entries();
    if ring < ring_slots {
        return Err(refuse(format!(
            "its ring has {ring} slots, the configuration needs {ring_slots}"
        )));
    }
    for s in specs(ring, conntrack_size) {
        let info = MapInfo::from_pin(dir.join(s.name))
            .with_context(|| format!("opening the pinned map {}", s.name))?;
        let (k, v, m) = (
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if (k, v) != (s.key, s.value) {
            return Err(refuse(format!(
                "map {} has {k}-byte keys and {v}-byte values, this build uses {} and {}",
                s.name, s.key, s.value
            )));
        }
        if m != s.max {
            let what = if s.name == names::CONNTRACK {
                format!(
                    "conntrack_size is {m} there, the configuration says {}",
                    s.max
                )
            } else {
                format!("map {} holds {m} entries, this build {}", s.name, s.max)
            };
            return Err(refuse(what));
        }
    }
    let config: Array<MapData, GlobalConfig> = Array::try_from(aya::maps::Map::Array(
        MapData::from_pin(dir.join(names::CONFIG))?,
    ))?;
    let version = config.get(&0, 0)?.layout_version;
    if version != 0 && u32::from(version) != LAYOUT_VERSION {
        return Err(refuse(format!(
            "layout version {version}, this build uses {LAYOUT_VERSION}"
        )));
    }
    Ok(Some(Found { ring_slots: ring }))
}

/// Remove every pin under `dir` (the link last: forwarding stops when it goes, once no
/// process holds it), then the directory. Returns whether anything was pinned there.
pub fn remove(dir: &Path) -> Result<bool> {
    let mut any = false;
    for name in MAPS.iter().chain([&PROGRAM, &LINK]) {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => any = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("removing {}", dir.join(name).display()))
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
    Ok(any)
}
