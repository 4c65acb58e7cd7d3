//! `farmlb`: the daemon and its CLI. Everything of substance lives in the library.

use std::path::Path;
use std::process::ExitCode;

use farmlb::cli::Cmd;

fn main() -> ExitCode {
    let cli = farmlb::cli::parse();
    farmlb::logging::init(cli.log_format);
    let res = match cli.cmd {
        // The owner loop runs on this thread; API, metrics and health checks on two workers.
        Cmd::Run { config, replace } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(farmlb::daemon::run(&config, replace))),
        Cmd::Ctl(cmd) => ctl(&cli.ctl, &cmd),
        Cmd::Status { config } => ctl(
            &cli.ctl,
            &farmlb::cli::CtlCmd::Status {
                config: Some(config),
            },
        ),
        Cmd::CheckConfig { file, strict } => check_config(&file, strict),
        Cmd::Decap {
            interface,
            gue_port,
            xdp_mode,
        } => farmlb::decap::run(&interface, gue_port, xdp_mode.into()),
        Cmd::Completions { shell } => {
            farmlb::cli::completions(shell, &mut std::io::stdout());
            Ok(())
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain joined, most specific last.
            eprintln!("farmlb: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Operator commands talk to the daemon's API socket.
fn ctl(opts: &farmlb::cli::CtlOpts, cmd: &farmlb::cli::CtlCmd) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(farmlb::cli::run(opts, cmd))
}

/// `check-config FILE [--strict]`: the file's errors, then what this host lacks (warnings,
/// errors with `--strict`).
fn check_config(file: &Path, strict: bool) -> anyhow::Result<()> {
    let c = farmlb::config::Config::load(file)?;
    let shown = file.display();
    let warnings = farmlb::config::host::check(&c).map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
    let level = if strict { "error" } else { "warning" };
    for w in &warnings {
        eprintln!("farmlb: {level}: {shown}: {w}");
    }
    if strict && !warnings.is_empty() {
        std::process::exit(1);
    }
    let backends: usize = c.services.iter().map(|s| s.backends.len()).sum();
    println!(
        "{shown}: ok ({} services, {backends} backends)",
        c.services.len()
    );
    Ok(())
}
