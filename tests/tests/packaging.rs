//! The Debian package (issue #12), as `cargo xtask test` builds it (`cargo xtask deb
//! --profile dev`, path in `FARMLB_DEB`): its contents and control files, the packaged
//! binary and conffile working, the unit passing `systemd-analyze verify`, every man page
//! rendering with `man -l` without a warning, and the completions loading in their shells.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{bail, ensure, Context, Result};
use lb_tests::daemon::workspace_root;

fn deb() -> Result<PathBuf> {
    let p = std::env::var_os("FARMLB_DEB")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debian/farmlb-dev.deb"));
    ensure!(
        p.exists(),
        "{} not found: build it with `cargo xtask deb --profile dev --output {}` (cargo xtask \
         test does), or set FARMLB_DEB",
        p.display(),
        p.display()
    );
    Ok(p)
}

/// Run a command; (success, stdout, stderr).
fn run(cmd: &mut Command) -> Result<(bool, String, String)> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let (ok, so, se) = run(cmd)?;
    ensure!(ok, "{cmd:?} failed: {se}");
    Ok(so)
}

/// The package unpacked once (`dpkg-deb -x`) into a temp directory shared by the tests.
fn unpacked() -> Result<&'static Path> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = DIR.get_or_init(|| {
        (|| -> Result<PathBuf> {
            let dir = std::env::temp_dir().join(format!("farmlb-deb-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir)?;
            run_ok(Command::new("dpkg-deb").arg("-x").arg(deb()?).arg(&dir))?;
            Ok(dir)
        })()
        .map_err(|e| format!("{e:#}"))
    });
    r.as_deref().map_err(|e| anyhow::anyhow!("{e}"))
}

const MAN_PAGES: &[&str] = &[
    "farmlb",
    "farmlb-run",
    "farmlb-check-config",
    "farmlb-status",
    "farmlb-stats",
    "farmlb-service-add",
    "farmlb-backend-add",
    "farmlb-backend-set",
    "farmlb-reload",
    "farmlb-stop",
    "farmlb-completions",
];

#[test]
fn the_deb_holds_binary_unit_conffile_man_pages_and_completions() -> Result<()> {
    let deb = deb()?;
    let listing = run_ok(Command::new("dpkg-deb").arg("-c").arg(&deb))?;
    println!("{listing}");
    // `-rwxr-xr-x root/root 123 2026-… ./usr/bin/farmlb`: mode and path of every file.
    let files: Vec<(&str, &str)> = listing
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((*f.first()?, f.last()?.strip_prefix('.')?))
        })
        .collect();
    let mode = |path: &str| files.iter().find(|(_, p)| *p == path).map(|(m, _)| *m);
    let mut want: Vec<(String, &str)> = vec![
        ("/usr/bin/farmlb".into(), "-rwxr-xr-x"),
        (
            "/usr/lib/systemd/system/farmlb.service".into(),
            "-rw-r--r--",
        ),
        ("/etc/farmlb/farmlb.toml".into(), "-rw-r--r--"),
        (
            "/usr/share/bash-completion/completions/farmlb".into(),
            "-rw-r--r--",
        ),
        (
            "/usr/share/zsh/vendor-completions/_farmlb".into(),
            "-rw-r--r--",
        ),
        (
            "/usr/share/fish/vendor_completions.d/farmlb.fish".into(),
            "-rw-r--r--",
        ),
        ("/usr/share/doc/farmlb/deploying.md".into(), "-rw-r--r--"),
    ];
    for page in MAN_PAGES {
        want.push((format!("/usr/share/man/man1/{page}.1.gz"), "-rw-r--r--"));
    }
    for (path, m) in &want {
        ensure!(mode(path) == Some(*m), "{path}: {:?}, want {m}", mode(path));
    }

    let info = run_ok(Command::new("dpkg-deb").arg("-I").arg(&deb))?;
    println!("{info}");
    for field in [
        "Package: farmlb",
        "Section: net",
        "Depends: iproute2, libc6",
    ] {
        ensure!(info.contains(field), "control lacks {field:?}:\n{info}");
    }
    let conffiles = run_ok(
        Command::new("dpkg-deb")
            .arg("-I")
            .arg(&deb)
            .arg("conffiles"),
    )?;
    ensure!(
        conffiles.trim() == "/etc/farmlb/farmlb.toml",
        "conffiles: {conffiles:?}"
    );
    let postinst = run_ok(Command::new("dpkg-deb").arg("-I").arg(&deb).arg("postinst"))?;
    ensure!(
        postinst.contains("systemctl try-restart farmlb.service"),
        "postinst does not restart a running daemon on upgrade:\n{postinst}"
    );
    ensure!(
        !postinst.contains("deb-systemd-invoke start") && !postinst.contains("systemctl start"),
        "a fresh install must not start the example config:\n{postinst}"
    );

    // The packaged binary runs and accepts its packaged config.
    let root = unpacked()?;
    let bin = root.join("usr/bin/farmlb");
    let version = run_ok(Command::new(&bin).arg("--version"))?;
    ensure!(
        version.trim() == format!("farmlb {}", env!("CARGO_PKG_VERSION")),
        "{version}"
    );
    let conf = root.join("etc/farmlb/farmlb.toml");
    let out = run_ok(Command::new(&bin).arg("check-config").arg(&conf))?;
    ensure!(out.contains(": ok ("), "{out}");
    Ok(())
}

#[test]
fn the_unit_passes_systemd_analyze_verify() -> Result<()> {
    let root = unpacked()?;
    let unit = fs::read_to_string(root.join("usr/lib/systemd/system/farmlb.service"))?;
    for line in [
        "Type=notify",
        "ExecReload=/usr/bin/farmlb reload",
        "LimitNOFILE=",
        "CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_NET_RAW CAP_SYS_ADMIN",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        ensure!(
            unit.lines().any(|l| l.starts_with(line)),
            "no {line:?} in the unit"
        );
    }
    // verify wants the executables to exist and the Documentation= man pages to open: point
    // both at the unpacked package.
    let bin = root.join("usr/bin/farmlb");
    let dir = root.join("verify");
    fs::create_dir_all(&dir)?;
    let copy = dir.join("farmlb.service");
    fs::write(
        &copy,
        unit.replace("/usr/bin/farmlb", bin.to_str().unwrap()),
    )?;
    let verify = |path: &Path| {
        run(Command::new("systemd-analyze")
            .arg("verify")
            .arg(path)
            .env("MANPATH", root.join("usr/share/man")))
    };
    let (ok, so, se) = verify(&copy)?;
    // verify exits 0 on keys it ignores, so anything it says is a failure.
    ensure!(
        ok && so.trim().is_empty() && se.trim().is_empty(),
        "systemd-analyze verify: {so}{se}"
    );
    // It does read the unit: a misspelt key is reported.
    let bad = dir.join("bad").join("farmlb.service");
    fs::create_dir_all(bad.parent().unwrap())?;
    fs::write(
        &bad,
        fs::read_to_string(&copy)?.replace("NoNewPrivileges", "NoNewPrivilegs"),
    )?;
    let (_, so, se) = verify(&bad)?;
    ensure!(
        (so + &se).contains("Unknown key 'NoNewPrivilegs'"),
        "systemd-analyze verify did not notice a misspelt key"
    );
    Ok(())
}

#[test]
fn every_man_page_renders_without_warnings() -> Result<()> {
    let root = unpacked()?;
    let dir = root.join("usr/share/man/man1");
    let mut pages: Vec<PathBuf> = fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    pages.sort();
    ensure!(pages.len() >= MAN_PAGES.len(), "{pages:?}");
    for page in &pages {
        let (ok, text, err) = run(Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l"])
            .arg(page)
            .env("MANWIDTH", "80")
            .env("MANPAGER", "cat"))?;
        let name = page
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".1.gz"))
            .context("a man page not named *.1.gz")?;
        ensure!(ok, "man -l {}: {err}", page.display());
        ensure!(
            err.trim().is_empty(),
            "man -l {}: warnings:\n{err}",
            page.display()
        );
        for section in ["NAME", "SYNOPSIS", "OPTIONS"] {
            ensure!(
                text.lines().any(|l| l.trim() == section),
                "{name}: no {section} section:\n{text}"
            );
        }
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        ensure!(
            flat.contains(&format!("NAME {name} - ")),
            "{name}: NAME line:\n{text}"
        );
    }
    let top = run_ok(
        Command::new("man")
            .arg("-l")
            .arg(dir.join("farmlb.1.gz"))
            .env("MANPAGER", "cat"),
    )?;
    for sub in ["run", "check-config", "backend", "reload", "completions"] {
        ensure!(top.contains(sub), "farmlb(1) does not list {sub}");
    }
    Ok(())
}

#[test]
fn completions_load_in_their_shells() -> Result<()> {
    let root = unpacked()?;
    let bin = root.join("usr/bin/farmlb");
    let packaged = |p: &str| fs::read_to_string(root.join(p)).with_context(|| p.to_string());
    for (shell, path, marker) in [
        (
            "bash",
            "usr/share/bash-completion/completions/farmlb",
            "complete -F _farmlb",
        ),
        (
            "zsh",
            "usr/share/zsh/vendor-completions/_farmlb",
            "#compdef farmlb",
        ),
        (
            "fish",
            "usr/share/fish/vendor_completions.d/farmlb.fish",
            "complete -c farmlb",
        ),
    ] {
        // `farmlb completions SHELL` prints what the package ships.
        let printed = run_ok(Command::new(&bin).args(["completions", shell]))?;
        ensure!(
            printed == packaged(path)?,
            "{shell}: package and binary differ"
        );
        ensure!(printed.contains(marker), "{shell}: no {marker:?}");
        for sub in ["check-config", "backend", "completions"] {
            ensure!(printed.contains(sub), "{shell}: {sub} is not completed");
        }
    }
    let bash = root.join("usr/share/bash-completion/completions/farmlb");
    run_ok(Command::new("bash").arg("-n").arg(&bash))?;
    // Sourced, it registers the function and completes subcommands and flags.
    let script = format!(
        "source {}; complete -p farmlb; COMP_WORDS=(farmlb back); COMP_CWORD=1; \
         _farmlb farmlb back farmlb; echo \"${{COMPREPLY[@]}}\"; \
         COMP_WORDS=(farmlb backend add --we); COMP_CWORD=3; _farmlb farmlb --we add; \
         echo \"${{COMPREPLY[@]}}\"",
        bash.display()
    );
    let out = run_ok(Command::new("bash").arg("-c").arg(&script))?;
    println!("{out}");
    let lines: Vec<&str> = out.lines().collect();
    ensure!(
        lines
            .first()
            .is_some_and(|l| l.contains(" -F _farmlb ") && l.ends_with(" farmlb")),
        "`complete -p farmlb`: {out}"
    );
    ensure!(
        lines.get(1) == Some(&"backend"),
        "`farmlb back<TAB>`: {out}"
    );
    ensure!(
        lines.get(2) == Some(&"--weight"),
        "`farmlb backend add --we<TAB>`: {out}"
    );
    let (ok, _, err) = run(Command::new(&bin).args(["completions", "tcsh"]))?;
    if ok {
        bail!("completions for an unknown shell succeeded");
    }
    ensure!(err.contains("invalid value 'tcsh'"), "{err}");
    Ok(())
}
