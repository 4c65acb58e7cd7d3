//! `farmlb simulate`: which backend a flow gets, and why. One packet of the flow goes through
//! the reference model ([`Model::process`], the same code the datapath tests hold the kernel
//! program to), loaded either with the running daemon's map entries for that flow
//! (`POST /v1/simulate`, see [`crate::dataplane::Dataplane::model_for_flow`]) or with the
//! tables a fresh daemon would program from a config file (`--config`: every backend up and
//! resolved, no conntrack). The model's conntrack insert lands in that copy only.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Result};
use clap::Args;
use lb_common::{FlowKey, Stat, MEMBER_BASE, PROTO_TCP, PROTO_UDP};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::dataplane::model::{Action, Model};
use crate::director::{addr_of, ip_of, Director};
use crate::packet::PacketBuilder;

/// `farmlb simulate` arguments.
#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    /// The client's address and port.
    #[arg(long, value_name = "IP:PORT")]
    pub src: SocketAddr,
    /// The destination (a VIP and port, or any other address).
    #[arg(long, value_name = "VIP:PORT")]
    pub dst: SocketAddr,
    /// tcp or udp.
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp"])]
    pub proto: String,
    /// A TCP SYN (a new connection: always hashed on the current table, conntrack ignored);
    /// without it, a packet of an established flow (its conntrack entry wins).
    #[arg(long)]
    pub syn: bool,
    /// Decide from this config file alone, without a running daemon.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
}

/// One flow to decide: the body of `POST /v1/simulate`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Query {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// `tcp` or `udp`.
    pub protocol: String,
    #[serde(default)]
    pub syn: bool,
}

impl Query {
    pub fn from_args(a: &SimulateArgs) -> Result<Query> {
        let q = Query {
            src: a.src,
            dst: a.dst,
            protocol: a.proto.clone(),
            syn: a.syn,
        };
        q.flow()?;
        Ok(q)
    }

    /// The conntrack key of the flow; a one-line error for a query the program could not see.
    pub fn flow(&self) -> Result<FlowKey> {
        let proto = match self.protocol.as_str() {
            "tcp" => PROTO_TCP,
            "udp" if self.syn => bail!("syn: only a TCP packet has a SYN flag"),
            "udp" => PROTO_UDP,
            p => bail!("protocol: {p:?} is neither \"tcp\" nor \"udp\""),
        };
        if self.src.is_ipv4() != self.dst.is_ipv4() {
            bail!(
                "src {} and dst {} are of different address families",
                self.src,
                self.dst
            );
        }
        Ok(FlowKey::new(
            addr_of(self.src.ip()),
            addr_of(self.dst.ip()),
            self.src.port(),
            self.dst.port(),
            proto,
        ))
    }

    /// The packet the model is given: an ACK (or a SYN) or a UDP datagram of the flow.
    fn packet(&self) -> Vec<u8> {
        match (self.protocol.as_str(), self.syn) {
            ("udp", _) => PacketBuilder::udp(self.src, self.dst),
            (_, true) => PacketBuilder::tcp(self.src, self.dst).syn(),
            (_, false) => PacketBuilder::tcp(self.src, self.dst),
        }
        .build()
    }
}

/// What the data plane does with the flow's next packet, and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Verdict {
    /// `forward` (XDP_TX to a backend), `drop`, or `pass` (to this host's stack).
    pub action: String,
    /// `conntrack` (the flow's entry names the backend), `ring` (the flow's slot of the
    /// service's Maglev table), `no_backend` (the service has no usable backend), `not_vip`
    /// (no service at that address, port and protocol); farm services: `socket` /
    /// `no_socket` (an established TCP flow goes where its socket is; the simulator sees no
    /// sockets), `lease` (this node's lease ran out).
    pub why: String,
    pub service: Option<String>,
    /// The backend forwarded to (director services).
    pub backend: Option<IpAddr>,
    /// Farm services: the node that owns the flow.
    pub owner: Option<u32>,
    /// The flow's slot in the service's table (0-based) and the table's size.
    pub slot: Option<u32>,
    pub table_size: Option<u32>,
    /// The data-plane counter the packet bumps (`tx`, `drop_no_backend`, `pass_not_vip` ...).
    pub counter: String,
    /// `daemon`: the running daemon's maps; `config`: tables built from a config file.
    pub from: String,
}

/// Service names by service id.
pub fn service_names(d: &Director) -> HashMap<u32, String> {
    d.services
        .values()
        .map(|s| (s.info.id, s.cfg.name.clone()))
        .collect()
}

/// Run `q`'s packet through `model` (loaded for that flow) at `now_ns` and explain the
/// decision.
pub fn decide(
    model: &mut Model,
    q: &Query,
    names: &HashMap<u32, String>,
    now_ns: u64,
    from: &str,
) -> Result<Verdict> {
    let flow = q.flow()?;
    let (d, _) = model.process(&q.packet(), now_ns);
    let svc = model.service_for(&flow.dst, flow.dport, flow.proto);
    let hit = d.ct == Some(Stat::CtHit);
    let why = match d.reason {
        Stat::PassNotVip => "not_vip",
        Stat::DropNoBackend => "no_backend",
        Stat::Tx | Stat::FarmPassOwner | Stat::FarmDropNotOwner if hit => "conntrack",
        Stat::Tx | Stat::FarmPassOwner | Stat::FarmDropNotOwner => "ring",
        Stat::FarmPassSocket => "socket",
        Stat::FarmDropNoSocket => "no_socket",
        Stat::FarmDropLease => "lease",
        other => other.name(),
    };
    // The id the decision rests on: the conntrack entry's or the ring slot's.
    let chosen = match (d.action, svc) {
        (Action::Tx, _) => Some(d.backend),
        (_, Some((_, s))) if why == "conntrack" || why == "ring" => Some(if hit {
            model.conntrack[flow.of_service(s.id).ct_key()].backend
        } else {
            model.expected_backend(&s, &flow)
        }),
        _ => None,
    };
    let farm = matches!(svc, Some((_, s)) if s.fwd_mode == lb_common::FWD_FARM);
    let ring = svc.filter(|_| why == "ring");
    Ok(Verdict {
        action: match d.action {
            Action::Tx => "forward",
            Action::Drop => "drop",
            Action::Pass => "pass",
        }
        .into(),
        why: why.into(),
        service: svc.map(|(_, s)| names.get(&s.id).cloned().unwrap_or(format!("#{}", s.id))),
        backend: chosen
            .filter(|_| !farm)
            .and_then(|id| model.backends.get(&id))
            .map(|b| ip_of(b.addr)),
        owner: chosen
            .filter(|_| farm)
            .and_then(|id| id.checked_sub(MEMBER_BASE)),
        slot: ring.and_then(|(_, s)| s.ring_index(&flow).map(|i| i - s.ring_offset)),
        table_size: ring.map(|(_, s)| s.ring_size),
        counter: d.reason.name().into(),
        from: from.into(),
    })
}

/// The tables a daemon starting on `cfg` would program (every backend resolved and up), in
/// a model, and the director that wrote them.
fn tables(cfg: &Config) -> Result<(Director, Model)> {
    let mut director = Director::new(Director::ring_slots_for(cfg), [0; 6]);
    let mut model = Model::default();
    director.apply(cfg, &mut model, &mut crate::neigh::AssumeResolved)?;
    Ok((director, model))
}

/// `--config`: decide from the tables a daemon starting on `cfg` would program.
pub fn from_config(cfg: &Config, q: &Query) -> Result<Verdict> {
    let flow = q.flow()?;
    let (director, mut model) = tables(cfg)?;
    if let Some((_, s)) = model.service_for(&flow.dst, flow.dport, flow.proto) {
        if s.fwd_mode == lb_common::FWD_FARM {
            let name = service_names(&director).remove(&s.id).unwrap_or_default();
            bail!(
                "service {name} is a farm service: which node owns a flow depends on the live \
                 membership; ask the running daemon (without --config)"
            );
        }
    }
    decide(&mut model, q, &service_names(&director), 0, "config")
}

/// One line for a verdict.
pub fn render(q: &Query, v: &Verdict) -> String {
    let head = format!("{} {} -> {}", q.protocol, q.src, q.dst);
    let svc = v.service.as_deref().unwrap_or("?");
    let slot = match (v.slot, v.table_size) {
        (Some(s), Some(n)) => format!("ring slot {s} of {n}"),
        _ => "ring".into(),
    };
    let because = match v.why.as_str() {
        "conntrack" => "its conntrack entry".to_string(),
        "ring" => format!("{slot}, no conntrack entry used"),
        w => w.to_string(),
    };
    let body = match (v.action.as_str(), v.why.as_str()) {
        (_, "not_vip") => "not a VIP: passed to the host's stack".to_string(),
        (_, "no_backend") => format!("dropped: service {svc} has no usable backend"),
        ("forward", _) => format!(
            "backend {} (service {svc}, {because})",
            v.backend.map_or("?".into(), |b| b.to_string())
        ),
        (action, "conntrack" | "ring") => format!(
            "{action}: owned by node {} (farm service {svc}, {because})",
            v.owner.map_or("?".into(), |n| n.to_string())
        ),
        (action, why) => format!("{action} ({why}, service {svc}, counter {})", v.counter),
    };
    format!(
        "{head}: {body}  [from the {}]\n",
        match v.from.as_str() {
            "config" => "config file",
            _ => "running daemon's maps",
        }
    )
}

/// `farmlb simulate ...`: ask the daemon, or decide from `--config` alone.
pub async fn cli(c: &crate::cli::Client, json: bool, a: &SimulateArgs) -> Result<()> {
    let q = Query::from_args(a)?;
    let v = match &a.config {
        Some(path) => serde_json::to_value(from_config(&Config::load(path)?, &q)?)?,
        None => {
            c.call("POST", "/v1/simulate", Some(&serde_json::to_value(&q)?))
                .await?
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render(&q, &serde_json::from_value(v)?));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::from_toml_str(
            r#"
interface = "eth0"
[[service]]
name = "web"
vip = "10.0.0.1"
port = 80
table_size = 13
  [[service.backend]]
  address = "10.0.0.11"
  [[service.backend]]
  address = "10.0.0.12"
[[service]]
name = "empty"
vip = "10.0.0.2"
port = 80
table_size = 13
  [[service.backend]]
  address = "10.0.0.13"
  state = "maint"
"#,
        )
        .unwrap()
    }

    fn q(src: &str, dst: &str, syn: bool) -> Query {
        Query {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: "tcp".into(),
            syn,
        }
    }

    #[test]
    fn config_mode_names_the_ring_slot_and_backend() {
        let c = cfg();
        let v = from_config(&c, &q("192.0.2.7:40000", "10.0.0.1:80", true)).unwrap();
        assert_eq!((v.action.as_str(), v.why.as_str()), ("forward", "ring"));
        assert_eq!(v.service.as_deref(), Some("web"));
        assert_eq!(v.table_size, Some(13));
        // The slot's owner in the table the director builds is the backend named.
        let (d, _) = tables(&c).unwrap();
        let st = &d.services["web"];
        let id = st.table[v.slot.unwrap() as usize];
        let want = st.backends.values().find(|b| b.id == id).unwrap().address;
        assert_eq!(v.backend, Some(want));
        // Many flows: both backends get some.
        let got: std::collections::BTreeSet<_> = (0..64)
            .map(|p| {
                let src = format!("192.0.2.7:{}", 40000 + p);
                from_config(&c, &q(&src, "10.0.0.1:80", false))
                    .unwrap()
                    .backend
            })
            .collect();
        assert_eq!(got.len(), 2, "{got:?}");
    }

    #[test]
    fn no_backend_not_a_vip_and_bad_queries() {
        let c = cfg();
        let v = from_config(&c, &q("192.0.2.7:1", "10.0.0.2:80", true)).unwrap();
        assert_eq!((v.action.as_str(), v.why.as_str()), ("drop", "no_backend"));
        assert_eq!(v.counter, "drop_no_backend");
        let v = from_config(&c, &q("192.0.2.7:1", "10.0.0.1:81", true)).unwrap();
        assert_eq!((v.action.as_str(), v.why.as_str()), ("pass", "not_vip"));
        assert_eq!(v.service, None);
        let out = render(&q("192.0.2.7:1", "10.0.0.1:81", true), &v);
        assert!(out.contains("not a VIP"), "{out}");
        let mut bad = q("192.0.2.7:1", "[fd00::1]:80", false);
        assert!(bad.flow().unwrap_err().to_string().contains("families"));
        bad = q("192.0.2.7:1", "10.0.0.1:80", true);
        bad.protocol = "udp".into();
        assert!(bad.flow().unwrap_err().to_string().starts_with("syn:"));
    }

    #[test]
    fn a_conntrack_entry_wins_over_the_ring_unless_syn() {
        let c = cfg();
        let (d, mut m) = tables(&c).unwrap();
        let names = service_names(&d);
        let query = q("192.0.2.9:5555", "10.0.0.1:80", false);
        let ring = decide(&mut m.clone(), &query, &names, 0, "daemon").unwrap();
        // Pin the flow to the other backend, as an entry made before a table change would.
        let other = d.services["web"]
            .backends
            .values()
            .find(|b| Some(b.address) != ring.backend)
            .unwrap();
        m.conntrack.insert(
            *query
                .flow()
                .unwrap()
                .of_service(d.services["web"].info.id)
                .ct_key(),
            lb_common::CtEntry {
                backend: other.id,
                ..Default::default()
            },
        );
        let v = decide(&mut m.clone(), &query, &names, 0, "daemon").unwrap();
        assert_eq!(
            (v.why.as_str(), v.backend),
            ("conntrack", Some(other.address))
        );
        assert_eq!(v.slot, None);
        let syn = Query { syn: true, ..query };
        let v = decide(&mut m, &syn, &names, 0, "daemon").unwrap();
        assert_eq!((v.why.as_str(), v.backend), ("ring", ring.backend));
    }
}
