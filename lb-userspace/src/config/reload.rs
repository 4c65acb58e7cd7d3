//! What a reload cannot change. The attached program, the maps' sizes, the API and metrics
//! listeners and the farm membership are set up once at start: a reload that changes their
//! settings is refused whole, in every role.

use super::{Config, Entries, FarmCfg};

/// Fields a reload may change although they are in the lists below.
const RELOADABLE: &[&str] = &[
    "udp_timeout",
    "flood_guard_rate",
    "farm.check",
    "farm.check_address",
];

/// A reload changes a field that only a restart applies.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: changing it needs a restart (running {running}, new {new})")]
pub struct RestartNeeded {
    /// `conntrack_size`, `farm.power`, `farm.hooks.on_start`, `farm` (the section itself), ...
    pub field: String,
    /// The running and the new value, as the file spells them (`unset` when absent).
    pub running: String,
    pub new: String,
}

/// Whether going from `running` to `new` needs a restart: any global setting but
/// `udp_timeout` changes, `[farm]` appears or goes, or any of its fields but the node's check
/// (`check`, `check_address`) changes. Services and backends always reload.
pub fn restart_needed(running: &Config, new: &Config) -> Result<(), RestartNeeded> {
    let fields = |c: &Config| {
        let mut f = restart_only("", c.globals());
        f.extend(farm_fields(c.farm.as_ref()));
        f.extend(announce_fields(c.announce.as_ref()));
        f
    };
    first_change(fields(running), fields(new))
}

impl FarmCfg {
    /// Whether going from this `[farm]` to `new` needs a restart (see [`restart_needed`]).
    pub fn restart_needed(&self, new: &FarmCfg) -> Result<(), RestartNeeded> {
        first_change(farm_fields(Some(self)), farm_fields(Some(new)))
    }
}

type Fields = Vec<(String, Option<String>)>;

/// The entries only a restart applies, named `{prefix}{key}`.
fn restart_only(prefix: &str, entries: Entries) -> Fields {
    (entries.into_iter())
        .map(|(k, v)| (format!("{prefix}{k}"), v))
        .filter(|(k, _)| !RELOADABLE.contains(&k.as_str()))
        .collect()
}

/// `farm`, present or absent, then the section's fields.
fn farm_fields(farm: Option<&FarmCfg>) -> Fields {
    let present = if farm.is_some() { "present" } else { "absent" };
    let mut fields = vec![("farm".to_string(), Some(present.to_string()))];
    if let Some(f) = farm {
        fields.extend(restart_only("farm.", f.entries()));
        fields.extend(restart_only("farm.hooks.", f.hooks.entries()));
    }
    fields
}

/// `announce`, present or absent, then the section's fields: the routes and the sync
/// channel are set up once at start.
fn announce_fields(a: Option<&super::AnnounceCfg>) -> Fields {
    let present = if a.is_some() { "present" } else { "absent" };
    let mut fields = vec![("announce".to_string(), Some(present.to_string()))];
    if let Some(a) = a {
        fields.extend(restart_only("announce.", a.entries()));
    }
    fields
}

/// The first field whose value differs. Both lists hold the same fields in the same order,
/// unless `farm` differs, which comes before any field of the section.
fn first_change(running: Fields, new: Fields) -> Result<(), RestartNeeded> {
    match running.into_iter().zip(new).find(|(a, b)| a != b) {
        None => Ok(()),
        Some(((field, running), (_, new))) => {
            let shown = |v: Option<String>| v.unwrap_or_else(|| "unset".into());
            Err(RestartNeeded {
                field,
                running: shown(running),
                new: shown(new),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every global setting and a `[farm]` section, spelled out.
    const RUNNING: &str = "\ninterface = \"eth0\"\nxdp_mode = \"auto\"\nudp_timeout = \"30s\"\n\
        conntrack_size = 1024\napi_socket = \"/run/a.sock\"\nmetrics_address = \"off\"\n\
        [farm]\nnode_id = 1\naddress = \"10.0.0.1\"\nkey_file = \"/k\"\npower = 1\n\
        check = { type = \"tcp\", port = 80 }\n\
        [farm.hooks]\ntimeout = \"30s\"\n\
        [[service]]\nname = \"web\"\nvip = \"10.0.100.1\"\nport = 80\n";

    fn after(from: &str, to: &str) -> Result<(), RestartNeeded> {
        assert!(RUNNING.contains(from), "{from}");
        let running = Config::from_toml_str(RUNNING).unwrap();
        let new = Config::from_toml_str(&RUNNING.replacen(from, to, 1)).unwrap();
        restart_needed(&running, &new)
    }

    fn refused(field: &str, running: &str, new: &str) -> Result<(), RestartNeeded> {
        Err(RestartNeeded {
            field: field.into(),
            running: running.into(),
            new: new.into(),
        })
    }

    #[test]
    fn restart_needed_for_each_restart_only_field() {
        // (field, running value, new value): `key = value` lines of RUNNING and their change.
        for (field, running, new) in [
            ("interface", "\"eth0\"", "\"eth1\""),
            ("xdp_mode", "\"auto\"", "\"generic\""),
            ("conntrack_size", "1024", "2048"),
            ("api_socket", "\"/run/a.sock\"", "\"/run/b.sock\""),
            ("metrics_address", "\"off\"", "\"127.0.0.1:9\""),
            ("farm.power", "1", "3"),
            ("farm.key_file", "\"/k\"", "\"/etc/k\""),
            ("farm.hooks.timeout", "\"30s\"", "\"1m\""),
        ] {
            let key = field.rsplit('.').next().unwrap();
            let line = |v: &str| format!("\n{key} = {v}\n");
            let want = refused(field, running, new);
            assert_eq!(after(&line(running), &line(new)), want);
        }
        assert_eq!(
            after(
                "\ntimeout = \"30s\"",
                "\non_start = \"true\"\ntimeout = \"30s\""
            ),
            refused("farm.hooks.on_start", "unset", "\"true\"")
        );
        // The membership address is written with its port.
        assert_eq!(
            after("\"10.0.0.1\"\nkey_file", "\"10.0.0.1:4801\"\nkey_file"),
            refused("farm.address", "\"10.0.0.1:4800\"", "\"10.0.0.1:4801\"")
        );
        let e = after("conntrack_size = 1024", "conntrack_size = 2048").unwrap_err();
        assert_eq!(
            e.to_string(),
            "conntrack_size: changing it needs a restart (running 1024, new 2048)"
        );
    }

    #[test]
    fn the_rest_reloads() {
        for (from, to) in [
            ("udp_timeout = \"30s\"", "udp_timeout = \"1m\""),
            ("port = 80\n", "port = 81\n"),
            // The node's check is the only part of [farm] a reload applies.
            (
                "check = { type = \"tcp\", port = 80 }",
                "check = { type = \"exec\", command = \"true\" }",
            ),
            (
                "check = { type = \"tcp\", port = 80 }",
                "check_address = \"10.0.0.9\"",
            ),
        ] {
            assert_eq!(after(from, to), Ok(()), "{to}");
        }
    }

    #[test]
    fn adding_or_removing_the_farm_section_needs_a_restart() {
        let farm = Config::from_toml_str(RUNNING).unwrap();
        let no_farm = Config {
            farm: None,
            ..farm.clone()
        };
        assert_eq!(
            restart_needed(&no_farm, &farm),
            refused("farm", "absent", "present")
        );
        assert_eq!(
            restart_needed(&farm, &no_farm),
            refused("farm", "present", "absent")
        );
        assert_eq!(restart_needed(&no_farm, &no_farm), Ok(()));
        // The section alone, as farm mode compares it.
        let f = farm.farm.clone().unwrap();
        let reloaded = FarmCfg {
            check: None,
            check_address: Some("10.0.0.9".parse().unwrap()),
            ..f.clone()
        };
        assert_eq!(f.restart_needed(&reloaded), Ok(()));
        let moved = FarmCfg {
            peers: vec!["10.0.0.2:4800".parse().unwrap()],
            ..f.clone()
        };
        assert_eq!(
            f.restart_needed(&moved),
            refused("farm.peers", "[]", "[\"10.0.0.2:4800\"]")
        );
    }
}
