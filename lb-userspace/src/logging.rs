//! Where the log goes decides how it looks: colour only on a terminal; under journald
//! (`JOURNAL_STREAM` names our stderr) no timestamp, each line prefixed with its syslog
//! priority `<N>` (sd-daemon(3) style: journald parses it and stamps the time itself);
//! `--log-format json` for one JSON object per line.

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;

use tracing::{Level, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// `--log-format`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal, `<N>`-prefixed under journald).
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

/// Install the global subscriber, logging to stderr at `RUST_LOG` (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match (format, stderr_is_journal()) {
        (LogFormat::Json, _) => builder.json().init(),
        (LogFormat::Text, true) => builder.event_format(Journal::default()).init(),
        (LogFormat::Text, false) => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// Whether stderr is the stream systemd connected to journald: `JOURNAL_STREAM=DEV:INODE`
/// matches stderr's device and inode (a child whose stderr was redirected elsewhere inherits
/// the variable but not the match).
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    journal_stream_matches(&v.to_string_lossy(), meta.dev(), meta.ino())
}

fn journal_stream_matches(var: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = var.split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

/// The syslog priority journald reads from a `<N>` prefix (sd-daemon(3)).
pub fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Text lines for journald: `<N>` then the usual line without timestamp, level or colour.
struct Journal(format::Format<format::Full, ()>);

impl Default for Journal {
    fn default() -> Self {
        Journal(
            format::format()
                .without_time()
                .with_level(false)
                .with_ansi(false),
        )
    }
}

impl<S, N> FormatEvent<S, N> for Journal
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", syslog_priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_this_stream() {
        assert!(journal_stream_matches("8:1234", 8, 1234));
        assert!(!journal_stream_matches("8:1234", 8, 1235));
        assert!(!journal_stream_matches("9:1234", 8, 1234));
        assert!(!journal_stream_matches("garbage", 8, 1234));
        assert_eq!(syslog_priority(&Level::WARN), 4);
        assert_eq!(syslog_priority(&Level::ERROR), 3);
    }
}
