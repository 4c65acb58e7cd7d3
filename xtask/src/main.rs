//! Project tasks: `cargo xtask setup | test | rig up|down | demo`.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// Commands that drive the rig link the whole project, whose build needs the prerequisites
/// `setup` installs; they live behind the `lab` feature so a fresh machine can compile this
/// bootstrap first (see `main`).
#[cfg(feature = "lab")]
mod lab;

/// `cargo xtask bench`: farmlb against baselines measured in the same run (issue #5).
#[cfg(feature = "lab")]
mod bench;

/// `cargo xtask deb`: the Debian package.
#[cfg(feature = "lab")]
mod deb;

#[derive(Parser)]
#[command(about = "farmlb project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (apt packages, nightly + rust-src, bpf-linker).
    Setup,
    /// Format check, clippy, then every test (network tests serially). Needs root.
    Test,
    /// Build or remove the namespace test rig by hand. Needs root.
    Rig {
        #[command(subcommand)]
        action: RigAction,
    },
    /// Run farmlb on the rig and show how connections spread over three backends, then kill
    /// one under a steady stream of new connections and show the redistribution (timing,
    /// connections per backend, failures) and an SVG timeline. Needs root.
    Demo {
        /// `director` (farmlb in front of three backends) or `farm` (three farm nodes, one
        /// of which dies).
        #[arg(value_enum, default_value = "director")]
        kind: DemoKind,
        /// Number of TCP connections of the balance phase.
        #[arg(long, default_value_t = 300)]
        connections: usize,
        /// New connections per second while a backend dies.
        #[arg(long, default_value_t = 200)]
        rate: u32,
        /// Namespace prefix of the rig.
        #[arg(long, default_value = "flb")]
        prefix: String,
        /// Where to write the SVG timeline (default: target/demo/timeline-KIND.svg).
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Benchmark farmlb against baselines measured in the same run; writes bench/report.*.
    /// Needs root.
    Bench {
        /// Fewer and shorter runs (under 2 minutes once built).
        #[arg(long)]
        quick: bool,
        /// Git revision whose XDP program the per-packet probes are also compared with
        /// (default: the tag `bench-baseline` if it exists, else `HEAD~1`).
        #[arg(long, value_name = "REV")]
        baseline: Option<String>,
    },
    /// Build the Debian package (binary, systemd unit, /etc/farmlb/farmlb.toml, man pages,
    /// completions) with cargo-deb; prints its path.
    Deb {
        /// Cargo profile of the packaged binary (`dev`: the debug build, quicker).
        #[arg(long, default_value = "release")]
        profile: String,
        /// The .deb file (or a directory) to write (default: target/debian/).
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DemoKind {
    Director,
    Farm,
}

#[derive(Subcommand)]
pub enum RigAction {
    /// Create the rig (removing leftovers with the same prefix first).
    Up {
        #[arg(long, default_value = "flb")]
        prefix: String,
        #[arg(long, default_value_t = 3)]
        backends: usize,
    },
    /// Delete the rig's namespaces.
    Down {
        #[arg(long, default_value = "flb")]
        prefix: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Test => setup().and_then(|()| test()),
        #[cfg(feature = "lab")]
        Cmd::Rig { action } => lab::rig(action),
        #[cfg(feature = "lab")]
        Cmd::Demo {
            kind,
            connections,
            rate,
            prefix,
            svg,
        } => lab::demo(kind, connections, rate, prefix, svg),
        #[cfg(feature = "lab")]
        Cmd::Bench { quick, baseline } => bench::run(quick, baseline),
        #[cfg(feature = "lab")]
        Cmd::Deb { profile, output } => deb::build(&profile, output.as_deref()).map(drop),
        #[cfg(not(feature = "lab"))]
        _ => setup().and_then(|()| rerun_with_lab()),
    };
    if let Err(e) = res {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

/// Re-run this command line through a build of xtask with the `lab` feature, now that the
/// eBPF toolchain is in place.
#[cfg(not(feature = "lab"))]
fn rerun_with_lab() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let st = cargo()
        .args([
            "run",
            "--quiet",
            "--package",
            "xtask",
            "--features",
            "lab",
            "--",
        ])
        .args(&args)
        .current_dir(workspace_root())
        .status()
        .context("re-running xtask with the lab feature")?;
    if !st.success() {
        std::process::exit(st.code().unwrap_or(1));
    }
    Ok(())
}

/// The daemon binary the end-to-end tests and the demo run.
fn farmlb_bin() -> PathBuf {
    std::env::var_os("FARMLB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/farmlb"))
}

/// The package of the debug build that the packaging tests (tests/tests/packaging.rs) read.
fn test_deb() -> PathBuf {
    std::env::var_os("FARMLB_DEB")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debian/farmlb-dev.deb"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}

fn cmd_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run a command with inherited stdio; fail when it exits non-zero.
fn run(cmd: &mut Command) -> Result<()> {
    let line = cmd_line(cmd);
    eprintln!("xtask: $ {line}");
    let st = cmd
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("spawning {line}"))?;
    if !st.success() {
        bail!("`{line}` failed ({st})");
    }
    Ok(())
}

/// Whether a command runs and exits 0 (output discarded).
fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> String {
    cmd.stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .trim()
        .ends_with("install ok installed")
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn setup() -> Result<()> {
    let mut missing: Vec<&str> = Vec::new();
    if !Path::new("/usr/lib/llvm-22/bin/llvm-config").exists() {
        missing.push("llvm-22-dev");
    }
    // systemd (systemd-analyze), man-db and groff-base (man -l), dpkg-dev (cargo-deb's
    // dpkg-shlibdeps): the packaging tests. bird2: the ECMP scale-out rig's routers and
    // directors announce VIPs with it.
    for pkg in [
        "iproute2",
        "ethtool",
        "nftables",
        "iputils-ping",
        "systemd",
        "man-db",
        "groff-base",
        "dpkg-dev",
        "bird2",
    ] {
        if !dpkg_installed(pkg) {
            missing.push(pkg);
        }
    }
    // promtool (in Debian's `prometheus`): the tests check the metrics, rules and dashboard.
    if !succeeds(Command::new("promtool").arg("--version")) {
        missing.push("prometheus");
    }
    if !missing.is_empty() {
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(&missing))?;
    }

    // (rustup command listing what is there, the line prefix that shows it is, how to add it)
    let rustup: [(&str, &str, &str); 2] = [
        (
            "toolchain list",
            "nightly",
            "toolchain install nightly --profile minimal",
        ),
        (
            "component list --toolchain nightly --installed",
            "rust-src",
            "component add rust-src --toolchain nightly",
        ),
    ];
    for (list, present, add) in rustup {
        let listed = output(Command::new("rustup").args(list.split(' ')));
        if !listed.lines().any(|l| l.starts_with(present)) {
            run(Command::new("rustup").args(add.split(' ')))?;
        }
    }

    if !succeeds(Command::new("bpf-linker").arg("--version")) {
        run(cargo().env("LLVM_PREFIX", "/usr/lib/llvm-22").args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            "llvm-22",
        ]))?;
    }
    if !succeeds(cargo().args(["deb", "--version"])) {
        run(cargo().args(["install", "cargo-deb", "--version", "3.8.0", "--locked"]))?;
    }
    Ok(())
}

/// Totals of cargo's `test result:` lines.
#[derive(Default, Debug, PartialEq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result:") else {
            return;
        };
        for part in rest.split(';') {
            let words: Vec<&str> = part.split_whitespace().collect();
            let [.., n, what] = words.as_slice() else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match *what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Run `cargo test …`, echoing its output and adding its result lines to `totals`.
fn cargo_test(args: &[&str], totals: &mut Totals) -> Result<bool> {
    let mut cmd = cargo();
    cmd.arg("test").args(args);
    eprintln!("xtask: $ {}", cmd_line(&cmd));
    let mut child = cmd
        .current_dir(workspace_root())
        .env("FARMLB_BIN", farmlb_bin())
        .env("FARMLB_DEB", test_deb())
        .stdout(Stdio::piped())
        .spawn()
        .context("spawning cargo test")?;
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        totals.add_line(&line);
    }
    Ok(child.wait()?.success())
}

fn test() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The end-to-end tests run the daemon binary; the packaging tests read its package.
    run(cargo().args(["build", "-p", "lb-userspace"]))?;
    run(cargo()
        .args(["run", "--quiet", "-p", "xtask", "--features", "lab", "--"])
        .args(["deb", "--profile", "dev", "--output"])
        .arg(test_deb()))?;

    let ws = [
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--all-features",
        "--no-fail-fast",
    ];
    let mut totals = Totals::default();
    let mut ok = true;
    // Unit tests in parallel; integration tests (network namespaces, XDP) one at a time, with
    // their output shown so the measured distributions land in the log.
    ok &= cargo_test(&[&ws[..], &["--lib", "--bins"]].concat(), &mut totals)?;
    ok &= cargo_test(
        &[
            &ws[..],
            &["--test", "*", "--", "--test-threads=1", "--nocapture"],
        ]
        .concat(),
        &mut totals,
    )?;
    ok &= cargo_test(&[&ws[..], &["--doc"]].concat(), &mut totals)?;
    println!(
        "{} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !ok || totals.failed > 0 {
        bail!("tests failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Totals;

    #[test]
    fn parses_cargo_result_lines() {
        let mut t = Totals::default();
        t.add_line("test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s");
        t.add_line(
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("running 3 tests");
        assert_eq!(
            t,
            Totals {
                passed: 5,
                failed: 1,
                ignored: 1
            }
        );
    }
}
