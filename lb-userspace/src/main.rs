//! `farmlb`: the daemon and its CLI. Everything of substance lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "farmlb", version, about = "XDP layer-4 load balancer")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    ctl: farmlb::cli::CtlOpts,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the XDP program onto the configured interface and serve until SIGINT/SIGTERM.
    Run {
        #[arg(long, short, default_value = "/etc/farmlb/farmlb.toml")]
        config: PathBuf,
        /// Take over from a daemon already running this config (an upgrade): ask it to exit,
        /// leaving the data plane forwarding, then adopt the data plane and replace its
        /// program in place.
        #[arg(long)]
        replace: bool,
    },
    /// Validate a configuration file without touching the system.
    CheckConfig { file: PathBuf },
    /// Operator commands, talking to the running daemon's API socket.
    #[command(flatten)]
    Ctl(farmlb::cli::CtlCmd),
    /// The same as `farmlb status --config FILE`: services, and on a farm node its members,
    /// their state and power, and this node's share.
    #[command(name = "farm-status")]
    Status {
        #[arg(long, short, default_value = "/etc/farmlb/farmlb.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
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
        Cmd::CheckConfig { file } => farmlb::config::Config::load(&file)
            .map(|c| {
                let backends: usize = c.services.iter().map(|s| s.backends.len()).sum();
                println!(
                    "{}: ok ({} services, {backends} backends)",
                    file.display(),
                    c.services.len()
                );
            })
            .map_err(Into::into),
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
