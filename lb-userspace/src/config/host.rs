//! What a valid file asks of the host it runs on: the interface, exec checks' programs, the
//! farm key. The file may be written for another host, so a missing interface or program is
//! a warning (`check-config --strict` makes warnings errors); a key file that exists but can
//! never be a key (a device, a FIFO, a directory, megabytes) is an error, here and in the
//! daemon, which reads it the same bounded way.

use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{Config, ExecCommand, Probe, MIN_KEY_LEN};

/// Largest accepted farm key file: a key is a line of text, not a stream.
pub const MAX_KEY_FILE: u64 = 4096;

/// The warnings about this host, or the error that the farm key file cannot be a key.
pub fn check(cfg: &Config) -> Result<Vec<String>, String> {
    let mut warnings = Vec::new();
    if !interface_exists(&cfg.interface) {
        warnings.push(format!(
            "interface: {:?} does not exist on this host",
            cfg.interface
        ));
    }
    let mut seen = Vec::new();
    let mut program = |place: String, command: &ExecCommand| {
        let Some(prog) = program_of(command) else {
            return;
        };
        if seen.contains(&prog) {
            return;
        }
        if let Err(why) = find_program(&prog) {
            warnings.push(format!("{place}: exec check program {prog:?} {why}"));
        }
        seen.push(prog);
    };
    for s in &cfg.services {
        for b in &s.backends {
            if let Some(Probe::Exec { command, .. }) = b.check.as_ref().map(|c| &c.probe) {
                program(
                    format!("service {:?} backend {}", s.name, b.address),
                    command,
                );
            }
        }
    }
    if let Some(farm) = &cfg.farm {
        if let Some(command) = farm.check.as_ref().and_then(|c| c.command.as_ref()) {
            program("farm.check".into(), command);
        }
        if farm.key_file.exists() {
            read_key(&farm.key_file)?;
        } else {
            warnings.push(format!(
                "farm.key_file: {} does not exist on this host",
                farm.key_file.display()
            ));
        }
    }
    Ok(warnings)
}

/// Whether a network interface of that name exists in this network namespace.
fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// The program a command runs: an argv's first element; for a shell string only a first
/// word that is an absolute path (anything else may be a builtin, a function, a variable).
fn program_of(command: &ExecCommand) -> Option<String> {
    match command {
        ExecCommand::Argv(a) => a.first().cloned(),
        ExecCommand::Shell(s) => s
            .split_whitespace()
            .next()
            .filter(|w| w.starts_with('/'))
            .map(str::to_string),
    }
}

/// Find `prog` as `execvp` would (a name with a `/` as it is, else along `PATH`); why not.
fn find_program(prog: &str) -> Result<PathBuf, &'static str> {
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if prog.contains('/') {
        let p = PathBuf::from(prog);
        return match p.exists() {
            false => Err("not found"),
            true if executable(&p) => Ok(p),
            true => Err("is not an executable file"),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| executable(p))
        .ok_or("not found in PATH")
}

/// Read the farm's shared key: a regular file of at most [`MAX_KEY_FILE`] bytes, its content
/// with surrounding whitespace removed, at least [`MIN_KEY_LEN`] bytes.
pub fn read_key(path: &Path) -> Result<Vec<u8>, String> {
    let shown = path.display();
    // O_NONBLOCK: opening a FIFO must not wait for a writer; the type is checked on the
    // opened file, so nothing can be swapped in between.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("farm.key_file {shown}: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("farm.key_file {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "farm.key_file {shown}: not a regular file ({})",
            kind(&meta.file_type())
        ));
    }
    let mut raw = Vec::new();
    file.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut raw)
        .map_err(|e| format!("farm.key_file {shown}: {e}"))?;
    if raw.len() as u64 > MAX_KEY_FILE {
        return Err(format!(
            "farm.key_file {shown}: larger than {MAX_KEY_FILE} bytes, not a key"
        ));
    }
    let key = raw.trim_ascii().to_vec();
    if key.len() < MIN_KEY_LEN {
        return Err(format!(
            "farm.key_file {shown}: the key is {} bytes, at least {MIN_KEY_LEN} are needed",
            key.len()
        ));
    }
    Ok(key)
}

fn kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("farmlb-host-{}-{name}", std::process::id()))
    }

    #[test]
    fn key_file_reads_are_bounded_and_regular_files_only() {
        let e = read_key(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(e, "farm.key_file /dev/zero: not a regular file (a device)");
        let e = read_key(Path::new("/")).unwrap_err();
        assert!(e.ends_with("not a regular file (a directory)"), "{e}");
        let fifo = tmp("fifo");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Without O_NONBLOCK this open would hang for a writer.
        let e = read_key(&fifo).unwrap_err();
        assert!(e.ends_with("not a regular file (a FIFO)"), "{e}");
        std::fs::remove_file(&fifo).unwrap();

        let big = tmp("big");
        std::fs::write(&big, vec![b'k'; MAX_KEY_FILE as usize + 1]).unwrap();
        let e = read_key(&big).unwrap_err();
        assert!(e.ends_with("larger than 4096 bytes, not a key"), "{e}");
        std::fs::write(&big, "  0123456789abcdef\n").unwrap();
        assert_eq!(read_key(&big).unwrap(), b"0123456789abcdef");
        std::fs::write(&big, "short\n").unwrap();
        let e = read_key(&big).unwrap_err();
        assert!(
            e.ends_with("the key is 5 bytes, at least 16 are needed"),
            "{e}"
        );
        std::fs::remove_file(&big).unwrap();
    }

    #[test]
    fn programs_are_looked_up_as_exec_would() {
        assert!(find_program("sh").is_ok());
        assert_eq!(
            find_program("no-such-program-farmlb"),
            Err("not found in PATH")
        );
        assert_eq!(find_program("/nonexistent/x"), Err("not found"));
        assert_eq!(
            find_program("/etc/passwd"),
            Err("is not an executable file")
        );
        let shell = |s: &str| program_of(&ExecCommand::Shell(s.into()));
        assert_eq!(shell("/opt/chk --x"), Some("/opt/chk".into()));
        assert_eq!(shell("exit 0"), None);
        assert!(interface_exists("lo"));
        assert!(!interface_exists("eth9-farmlb"));
    }
}
