//! The `[announce]` section (see `docs/config.md`): the kernel routing table where the daemon
//! keeps a host route per VIP for a BGP daemon (BIRD's `kernel` protocol) to export, and the
//! conntrack sync between directors that share the VIPs behind ECMP.

use serde::Deserialize;
use toml::Spanned;

use super::raw::{int, Ctx, Field};
use super::{put, ConfigError, Entries, Spell};

/// Tables Linux reserves: `default` (253), `main` (254), `local` (255); 0 is "unspecified".
const RESERVED_TABLES: [u32; 4] = [0, 253, 254, 255];
/// Default bound of the conntrack entries one director publishes per second.
pub const DEFAULT_SYNC_RATE: u32 = 20_000;
pub const MAX_SYNC_RATE: u32 = 1_000_000;

/// Validated `[announce]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnounceCfg {
    /// Kernel routing table holding the VIP routes (`ip route show table N`).
    pub table: u32,
    /// Publish new conntrack entries to the farm's peers and insert theirs (needs `[farm]`).
    pub sync: bool,
    /// At most this many entries published per second; the rest are dropped (counted).
    pub sync_rate: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnnounce {
    table: Field<i64>,
    sync: Field<bool>,
    sync_rate: Field<i64>,
}

const P: &str = "announce.";

fn table(v: &i64) -> Result<u32, String> {
    let t = int(1u32, u32::MAX)(v)?;
    if RESERVED_TABLES.contains(&t) {
        return Err(format!(
            "{t} is a table Linux reserves (253 default, 254 main, 255 local): use a dedicated one"
        ));
    }
    Ok(t)
}

impl Ctx<'_> {
    /// The section; `farm` says whether a `[farm]` section exists (sync travels on its
    /// membership channel).
    pub(super) fn announce(
        &self,
        a: &Spanned<RawAnnounce>,
        farm: bool,
    ) -> Result<AnnounceCfg, ConfigError> {
        let section = Some(a.span());
        let a = a.get_ref();
        let table = self.req(P, "table", &a.table, section, table)?;
        let sync = self.opt(P, "sync", &a.sync, |b: &bool| Ok(*b))?;
        let sync = sync.unwrap_or(false);
        if sync && !farm {
            let span = a.sync.as_ref().map(Spanned::span);
            return Err(self.err(
                span,
                "announce.sync: needs a [farm] section (entries travel on its authenticated \
                 membership channel to its peers)",
            ));
        }
        let rate = self.opt(P, "sync_rate", &a.sync_rate, int(1, MAX_SYNC_RATE))?;
        Ok(AnnounceCfg {
            table,
            sync,
            sync_rate: rate.unwrap_or(DEFAULT_SYNC_RATE),
        })
    }
}

impl AnnounceCfg {
    pub(super) fn entries(&self) -> Entries {
        entries!(self => AnnounceCfg { table, sync, sync_rate } skip {})
    }

    /// The section as TOML that parses back to an equal `AnnounceCfg`.
    pub fn to_toml(&self) -> String {
        let mut s = String::from("\n[announce]\n");
        put(&mut s, "", &self.entries());
        s
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BASE: &str = "interface = \"eth0\"\n\n[announce]\ntable = 100\n";

    #[test]
    fn parses_defaults_and_round_trips() {
        let c = Config::from_toml_str(BASE).unwrap();
        let a = c.announce.clone().unwrap();
        assert_eq!((a.table, a.sync, a.sync_rate), (100, false, 20_000));
        let back = Config::from_toml_str(&c.to_toml()).unwrap();
        assert_eq!(back.announce, c.announce);
    }

    #[test]
    fn changing_the_section_needs_a_restart() {
        let running = Config::from_toml_str(BASE).unwrap();
        for (to, field) in [
            (BASE.replace("100", "101"), "announce.table"),
            (BASE.to_string() + "sync_rate = 5\n", "announce.sync_rate"),
            ("interface = \"eth0\"\n".to_string(), "announce"),
        ] {
            let new = Config::from_toml_str(&to).unwrap();
            let e = crate::config::restart_needed(&running, &new).unwrap_err();
            assert_eq!(e.field, field);
        }
    }

    #[test]
    fn rejects_reserved_tables_missing_table_and_sync_without_farm() {
        for (src, want) in [
            (
                BASE.replace("100", "254"),
                "announce.table: 254 is a table Linux reserves",
            ),
            (BASE.replace("100", "0"), "announce.table:"),
            (
                BASE.replace("table = 100", "sync = false"),
                "announce.table: missing",
            ),
            (
                BASE.to_string() + "sync = true\n",
                "announce.sync: needs a [farm] section",
            ),
            (BASE.to_string() + "sync_rate = 0\n", "announce.sync_rate:"),
            (BASE.to_string() + "tabel = 1\n", "unknown field"),
        ] {
            let e = Config::from_toml_str(&src).unwrap_err().to_string();
            assert!(e.contains(want), "{src}: {e}");
        }
    }
}
