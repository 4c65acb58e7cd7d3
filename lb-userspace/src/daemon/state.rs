//! Runtime state that outlives the daemon: API edits since the file was last loaded, and
//! runtime weights/states (`farmlb backend set`). Written atomically (temporary file +
//! rename) after every change; read at start-up and applied with the same precedence as a
//! reload: an override lasts until the file changes that same field, and a reload makes the
//! running set of services and backends match the file again (the edits are dropped).

use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Bump when the format changes incompatibly (an unknown version is ignored, with a warning).
const VERSION: u32 = 1;

/// An API edit, as the API received it (replayed through the same typed edit on start).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Edit {
    AddService {
        body: serde_json::Value,
    },
    DelService {
        service: String,
    },
    AddBackend {
        service: String,
        body: serde_json::Value,
    },
    DelBackend {
        service: String,
        backend: IpAddr,
    },
}

/// A runtime weight or state, with the file's value it was set over.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Override {
    pub service: String,
    pub backend: IpAddr,
    /// (file weight, runtime weight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<(u32, u32)>,
    /// (file state, runtime state), as spelled in the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<(String, String)>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct RuntimeState {
    pub version: u32,
    #[serde(default)]
    pub edits: Vec<Edit>,
    #[serde(default)]
    pub overrides: Vec<Override>,
}

impl RuntimeState {
    /// The state saved at `path`; empty if there is none (or it is unreadable: logged).
    pub fn load(path: &Path) -> RuntimeState {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Self::default(),
            Err(e) => {
                tracing::warn!(
                    "state_file {}: {e}; starting from the file alone",
                    path.display()
                );
                return Self::default();
            }
        };
        match serde_json::from_slice::<RuntimeState>(&text) {
            Ok(s) if s.version == VERSION => s,
            Ok(s) => {
                tracing::warn!(
                    "state_file {}: version {} is not {VERSION}; ignored",
                    path.display(),
                    s.version
                );
                Self::default()
            }
            Err(e) => {
                tracing::warn!("state_file {}: {e}; ignored", path.display());
                Self::default()
            }
        }
    }

    /// Replace `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec_pretty(&RuntimeState {
            version: VERSION,
            ..self.clone()
        })?;
        std::fs::write(&tmp, body).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_atomically_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("farmlb-state-{}", std::process::id()));
        let path = dir.join("state.json");
        assert_eq!(RuntimeState::load(&path), RuntimeState::default());
        let st = RuntimeState {
            version: VERSION,
            edits: vec![Edit::DelBackend {
                service: "web".into(),
                backend: "10.0.0.1".parse().unwrap(),
            }],
            overrides: vec![Override {
                service: "web".into(),
                backend: "10.0.0.2".parse().unwrap(),
                weight: Some((1, 5)),
                state: Some(("ready".into(), "drain".into())),
            }],
        };
        st.save(&path).unwrap();
        assert_eq!(RuntimeState::load(&path), st);
        assert!(!path.with_extension("tmp").exists());
        std::fs::write(&path, b"{ not json").unwrap();
        assert_eq!(RuntimeState::load(&path), RuntimeState::default());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
