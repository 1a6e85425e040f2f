//! The daemon's configuration file (TOML). Every key is optional; what is
//! not set keeps its default.
//!
//! ```toml
//! watch = true           # false: no inotify; every checkpoint scans everything
//!
//! [retention]            # for every sandbox
//! keep_last = 100        # newest checkpoints always kept
//! keep_hourly = 24       # then the newest of each hour, for this many hours
//! keep_daily = 7         # then the newest of each day, for this many days
//! budget_bytes = 0       # exclusive store bytes per sandbox; 0: no budget
//!
//! [sandbox.my-project]             # one sandbox, by name
//! auto_checkpoint_ms = 2000        # an `auto` checkpoint after 2 s of quiet
//!
//! [sandbox.my-project.retention]
//! keep_last = 20
//! budget_bytes = 2_000_000_000
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::retention::{Policy, Settings};

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Watch sandboxes with inotify (default); without, every checkpoint
    /// compares the whole tree.
    pub watch: Option<bool>,
    #[serde(default)]
    pub retention: Settings,
    #[serde(default)]
    pub sandbox: BTreeMap<String, SandboxSettings>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SandboxSettings {
    #[serde(default)]
    pub retention: Settings,
    /// Take an `auto` checkpoint once the tree has been quiet this long
    /// after changes. Off when absent.
    pub auto_checkpoint_ms: Option<u64>,
}

/// Retention policies as configured: a default and per-sandbox overrides.
#[derive(Clone, Debug, Default)]
pub struct Retention {
    pub default: Policy,
    pub sandboxes: BTreeMap<String, Settings>,
}

impl Retention {
    /// Returns the policy of the sandbox named `name`.
    pub fn policy(&self, name: &str) -> Policy {
        match self.sandboxes.get(name) {
            Some(s) => self.default.with(s),
            None => self.default.clone(),
        }
    }
}

impl FileConfig {
    /// Reads and checks a configuration file; an unknown key is an error.
    pub fn load(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Io { context: format!("reading the configuration {}", path.display()), source: e })?;
        toml::from_str(&text).map_err(|e| Error::InvalidRequest(format!("configuration {}: {e}", path.display())))
    }

    /// Returns the quiet period of each sandbox with auto checkpoints.
    pub fn auto_checkpoints(&self) -> BTreeMap<String, std::time::Duration> {
        self.sandbox
            .iter()
            .filter_map(|(name, s)| s.auto_checkpoint_ms.map(|ms| (name.clone(), std::time::Duration::from_millis(ms))))
            .collect()
    }

    pub fn retention(&self) -> Retention {
        Retention {
            default: Policy::default().with(&self.retention),
            sandboxes: self.sandbox.iter().map(|(k, v)| (k.clone(), v.retention.clone())).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses_and_layers() {
        let doc = include_str!("config.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//! "))
            .skip_while(|l| !l.starts_with("```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("```"))
            .collect::<Vec<_>>()
            .join("\n");
        let cfg: FileConfig = toml::from_str(&doc).unwrap();
        let r = cfg.retention();
        assert_eq!(r.default, Policy::default());
        let p = r.policy("my-project");
        assert_eq!((p.keep_last, p.keep_hourly, p.budget_bytes), (20, 24, Some(2_000_000_000)));
        assert_eq!(r.policy("other"), Policy::default());
        assert_eq!(cfg.auto_checkpoints()["my-project"], std::time::Duration::from_secs(2));
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<FileConfig>("[retention]\nkeep_lots = 3\n").is_err());
        assert!(toml::from_str::<FileConfig>("colour = 1\n").is_err());
    }
}
