//! `cargo xtask deb`: the Debian package (cargo-deb, configured in lb-userspace/Cargo.toml's
//! `[package.metadata.deb]`). Man pages (clap_mangen) and shell completions (clap_complete)
//! are generated here from `farmlb::cli::command()`, the definitions the binary parses with.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cargo, cmd_line, workspace_root};

/// Build the .deb with the binary of cargo profile `profile` (`release`, or `dev` for a quick
/// package of the debug build); written to `output` (a file or directory, default
/// target/debian/). Returns the package's path.
pub fn build(profile: &str, output: Option<&Path>) -> Result<PathBuf> {
    let gen = generated_dir(profile);
    generate(&gen)?;
    let mut cmd = cargo();
    cmd.args(["deb", "--package", "lb-userspace", "--profile", profile]);
    if let Some(o) = output {
        if let Some(parent) = o.parent() {
            std::fs::create_dir_all(parent)?;
        }
        cmd.arg("--output").arg(o);
    }
    let line = cmd_line(&cmd);
    eprintln!("xtask: $ {line}");
    let out = cmd
        .current_dir(workspace_root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| {
            format!("spawning {line} (is cargo-deb installed? `cargo xtask setup`)")
        })?;
    if !out.status.success() {
        bail!("`{line}` failed ({})", out.status);
    }
    // cargo-deb prints the package's path last.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("`{line}` printed no .deb path: {stdout}"))?;
    println!("{}", path.display());
    Ok(path)
}

/// Where cargo-deb finds `target/release/packaging/…` for `profile`.
fn generated_dir(profile: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let dir = match profile {
        "dev" | "test" => "debug",
        p => p,
    };
    target.join(dir).join("packaging")
}

/// Man pages (gzipped, as Debian policy wants) and completion scripts into `dir`.
fn generate(dir: &Path) -> Result<()> {
    let man = dir.join("man");
    let _ = std::fs::remove_dir_all(&man);
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(farmlb::cli::command(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;
    for entry in std::fs::read_dir(&man)? {
        let page = entry?.path();
        // -n: no name or timestamp inside, so the same sources give the same package.
        let st = Command::new("gzip").arg("-9nf").arg(&page).status()?;
        if !st.success() {
            bail!("gzip {} failed ({st})", page.display());
        }
    }
    let comp = dir.join("completions");
    std::fs::create_dir_all(&comp)?;
    use clap_complete::Shell;
    for (shell, name) in [
        (Shell::Bash, "farmlb.bash"),
        (Shell::Zsh, "_farmlb"),
        (Shell::Fish, "farmlb.fish"),
    ] {
        let path = comp.join(name);
        let mut f =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        farmlb::cli::completions(shell, &mut f);
    }
    Ok(())
}
