//! Where the rigs' daemons pin their data planes and keep their runtime state.
//!
//! `ip netns exec` gives every command a fresh `/sys` (so no `/sys/fs/bpf`), and pins made
//! through a bpffs that process mounted itself vanish with it. The rigs therefore mount one
//! bpffs at [`TEST_BPFFS`] in the test's (longer-lived) mount namespace, which every
//! `ip netns exec` child inherits, and give each daemon a directory there: its data plane then
//! outlives it, as on a real host.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

/// The bpffs shared by every rig's daemons.
pub const TEST_BPFFS: &str = "/run/farmlb-test-bpf";

/// Mount the rigs' bpffs if it is not mounted yet.
pub fn ensure_test_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mounted = mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(TEST_BPFFS) && l.split(' ').nth(2) == Some("bpf"));
    if !mounted {
        std::fs::create_dir_all(TEST_BPFFS).with_context(|| format!("creating {TEST_BPFFS}"))?;
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf", TEST_BPFFS])
            .status()
            .context("mount -t bpf")?;
        ensure!(st.success(), "mount -t bpf bpf {TEST_BPFFS} failed");
    }
    Ok(())
}

/// The pin directory of the daemon on node `tag` of rig `prefix`.
pub fn pin_dir(prefix: &str, tag: &str) -> PathBuf {
    Path::new(TEST_BPFFS).join(format!("{prefix}-{tag}"))
}

/// The runtime state file of the daemon on node `tag` of rig `prefix`.
pub fn state_file(prefix: &str, tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("farmlb-{prefix}-{tag}.state.json"))
}

/// The config lines that put node `tag`'s data plane and state where the rig finds them.
pub fn config_lines(prefix: &str, tag: &str) -> String {
    format!(
        "pin_path = \"{}\"\nstate_file = \"{}\"\n",
        pin_dir(prefix, tag).display(),
        state_file(prefix, tag).display()
    )
}

/// Remove every pinned data plane and state file of rig `prefix` (a torn-down rig leaves
/// none behind for the next run to adopt).
pub fn clear(prefix: &str) -> Result<()> {
    let want = format!("{prefix}-");
    if let Ok(dir) = std::fs::read_dir(TEST_BPFFS) {
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(&want) {
                farmlb::dataplane::pin::remove(&e.path())?;
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("farmlb-{want}")) && name.ends_with(".state.json") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}
