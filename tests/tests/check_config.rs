//! `farmlb check-config` on this host (issue #12): warnings for what the host lacks (the
//! interface, an exec check's program), `--strict` turning them into errors, and a farm key
//! file that cannot be a key (a device, a FIFO, a directory, too large) rejected in one line,
//! by check-config and by the daemon before it touches the system.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use lb_tests::ctl::farmlb;

/// A scratch directory for one test, removed first if a previous run left it.
fn scratch(name: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("farmlb-cc-{name}"));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d)?;
    Ok(d)
}

fn write(dir: &Path, name: &str, contents: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    fs::write(&p, contents)?;
    Ok(p)
}

const SERVICE: &str = "\n[[service]]\nname = \"web\"\nvip = \"10.0.100.1\"\nport = 80\n\
                       \n  [[service.backend]]\n  address = \"10.0.0.11\"\n";

#[test]
fn a_missing_interface_warns_and_fails_with_strict() -> Result<()> {
    let d = scratch("iface")?;
    let cfg = write(&d, "f.toml", &format!("interface = \"eth9x\"\n{SERVICE}"))?;
    let cfg = cfg.to_str().unwrap();
    let (code, out, err) = farmlb(&["check-config", cfg])?;
    ensure!(
        code == 0,
        "without --strict a warning is not an error: {err}"
    );
    ensure!(out.contains("ok (1 services, 1 backends)"), "{out}");
    let want = format!("farmlb: warning: {cfg}: interface: \"eth9x\" does not exist on this host");
    ensure!(err.trim() == want, "stderr {err:?}, want {want:?}");

    let (code, out, err) = farmlb(&["check-config", "--strict", cfg])?;
    ensure!(code == 1, "--strict: exit {code}");
    ensure!(out.is_empty(), "--strict prints no ok: {out}");
    ensure!(err.trim() == want.replace("warning", "error"), "{err}");

    // The same file on an interface this host has: silent.
    let ok = write(&d, "lo.toml", &format!("interface = \"lo\"\n{SERVICE}"))?;
    let (code, _, err) = farmlb(&["check-config", "--strict", ok.to_str().unwrap()])?;
    ensure!(code == 0 && err.is_empty(), "lo: exit {code}, {err}");
    Ok(())
}

#[test]
fn an_exec_check_whose_program_is_missing_warns() -> Result<()> {
    let d = scratch("exec")?;
    let not_exec = write(&d, "not-exec", "#!/bin/sh\nexit 0\n")?;
    let cases = [
        (
            "[\"/nonexistent/check-web\", \"--fast\"]".to_string(),
            "exec check program \"/nonexistent/check-web\" not found".to_string(),
        ),
        (
            "[\"no-such-check-farmlb\"]".into(),
            "exec check program \"no-such-check-farmlb\" not found in PATH".into(),
        ),
        (
            format!("\"{} --x\"", not_exec.display()),
            format!(
                "exec check program \"{}\" is not an executable file",
                not_exec.display()
            ),
        ),
    ];
    for (command, want) in cases {
        let cfg = write(
            &d,
            "f.toml",
            &format!(
                "interface = \"lo\"\n{SERVICE}check = {{ type = \"exec\", command = {command} }}\n"
            ),
        )?;
        let (code, _, err) = farmlb(&["check-config", cfg.to_str().unwrap()])?;
        ensure!(code == 0, "a warning only: {err}");
        let want = format!(
            "farmlb: warning: {}: service \"web\" backend 10.0.0.11: {want}",
            cfg.display()
        );
        ensure!(err.trim() == want, "stderr {err:?}, want {want:?}");
        let (code, _, _) = farmlb(&["check-config", "--strict", cfg.to_str().unwrap()])?;
        ensure!(code == 1, "--strict: exit {code}");
    }
    // A program that is there: no warning.
    let cfg = write(
        &d,
        "ok.toml",
        &format!(
            "interface = \"lo\"\n{SERVICE}check = {{ type = \"exec\", command = [\"true\"] }}\n"
        ),
    )?;
    let (code, _, err) = farmlb(&["check-config", "--strict", cfg.to_str().unwrap()])?;
    ensure!(code == 0 && err.is_empty(), "exit {code}: {err}");
    Ok(())
}

fn farm_config(key_file: &Path) -> String {
    format!(
        "interface = \"lo\"\n\n[farm]\nnode_id = 1\naddress = \"127.0.0.1\"\nkey_file = \"{}\"\n\
         \n[[service]]\nname = \"web\"\nvip = \"10.0.100.1\"\nport = 80\nforwarding = \"farm\"\n",
        key_file.display()
    )
}

#[test]
fn a_key_file_that_cannot_be_a_key_is_rejected_by_check_config_and_the_daemon() -> Result<()> {
    let d = scratch("key")?;
    let fifo = d.join("fifo");
    let st = Command::new("mkfifo").arg(&fifo).status()?;
    ensure!(st.success(), "mkfifo");
    let big = write(&d, "big.key", &"k".repeat(64 * 1024))?;
    let cases: [(PathBuf, &str); 4] = [
        ("/dev/zero".into(), "not a regular file (a device)"),
        (fifo, "not a regular file (a FIFO)"),
        (d.clone(), "not a regular file (a directory)"),
        (big, "larger than 4096 bytes, not a key"),
    ];
    for (key, why) in &cases {
        let cfg = write(&d, "farm.toml", &farm_config(key))?;
        let cfg = cfg.to_str().unwrap();
        let want = format!(
            "farmlb: error: {cfg}: farm.key_file {}: {why}",
            key.display()
        );
        let t = Instant::now();
        let (code, out, err) = farmlb(&["check-config", cfg])?;
        ensure!(
            code == 1 && out.is_empty(),
            "check-config accepted {}",
            key.display()
        );
        ensure!(err.trim() == want, "stderr {err:?}, want {want:?}");
        // The daemon refuses it before loading anything (it runs as root here: were it to
        // get further it would fail on something else, with another message).
        let (code, _, err) = farmlb(&["run", "--config", cfg])?;
        ensure!(code == 1, "farmlb run accepted {}", key.display());
        let last = err.lines().last().unwrap_or_default();
        let want = format!("farmlb: error: farm.key_file {}: {why}", key.display());
        ensure!(last == want, "daemon: {last:?}, want {want:?}");
        ensure!(
            t.elapsed() < Duration::from_secs(5),
            "reading {} took {:?}",
            key.display(),
            t.elapsed()
        );
    }
    // A proper key passes; a missing one is only a warning (it may be installed later).
    let good = write(&d, "good.key", "0123456789abcdef0123456789abcdef\n")?;
    let cfg = write(&d, "farm.toml", &farm_config(&good))?;
    let (code, _, err) = farmlb(&["check-config", "--strict", cfg.to_str().unwrap()])?;
    ensure!(code == 0 && err.is_empty(), "good key: exit {code}: {err}");
    let cfg = write(&d, "farm.toml", &farm_config(&d.join("absent.key")))?;
    let (code, _, err) = farmlb(&["check-config", cfg.to_str().unwrap()])?;
    ensure!(code == 0, "{err}");
    ensure!(
        err.contains("absent.key does not exist on this host"),
        "{err}"
    );
    Ok(())
}
