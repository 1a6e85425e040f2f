//! The daemon's configuration file (TOML). Every key is optional; what is
//! not set keeps its default. Command-line flags and `SNAPBACK_SOCKET` win
//! over the file. `docs/reference/configuration.md` documents each key.
//!
//! ```toml
//! socket = "/run/snapback/snapbackd.sock"   # default: as for the CLI
//! state_dir = "/var/lib/snapback"           # default: /var/lib/snapback for root, else $XDG_STATE_HOME/snapback
//! socket_group = "snapback"                 # socket mode 0660, owned by this group; default: none (0600 or 0660 for root)
//! watch = true                              # false: no watcher; every checkpoint scans everything
//! watcher = "auto"                          # or "fanotify" (root only) or "inotify"; auto: fanotify for root
//! excludes = ["node_modules", "*.pyc"]      # added to every sandbox registered from now on
//! durability = "commit"                     # or "sync": objects and catalogue on disk before the answer
//! max_connections_per_uid = 64              # one more closes that uid's longest-idle connection
//! idle_timeout_ms = 600000                  # a connection with no request for this long is closed
//! diff_max_bytes = 1048576                  # a diff summarises larger files instead of diffing them
//!
//! [retention]            # for every sandbox
//! keep_last = 100        # newest checkpoints always kept
//! keep_hourly = 24       # then the newest of each hour, for this many hours
//! keep_daily = 7         # then the newest of each day, for this many days
//! budget_bytes = 0       # exclusive store bytes per sandbox; 0: no budget
//!
//! [sandbox.my-project]             # one sandbox, by name
//! path = "/srv/agents/my-project"  # register it at start if it is not yet
//! excludes = ["target"]            # its own excludes, when registered here
//! store = "/srv/agents/.snapback"  # its object store, when registered here
//! auto_checkpoint_ms = 2000        # an `auto` checkpoint after 2 s of quiet
//!
//! [sandbox.my-project.retention]
//! keep_last = 20
//! budget_bytes = 2_000_000_000
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::retention::{Policy, Settings};

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The socket to serve.
    pub socket: Option<PathBuf>,
    /// Where the catalogue and the default store live.
    pub state_dir: Option<PathBuf>,
    /// A group that may use the socket (mode 0660, this group).
    pub socket_group: Option<String>,
    /// Watch sandboxes (default); without, every checkpoint compares the
    /// whole tree.
    pub watch: Option<bool>,
    /// How sandboxes are watched [default: `auto`].
    pub watcher: Option<Watcher>,
    /// Exclude globs added to every sandbox registered from now on.
    #[serde(default)]
    pub excludes: Vec<String>,
    /// When a checkpoint is acknowledged: after its catalogue commit
    /// (`commit`, the default) or after its objects and the catalogue are on
    /// disk (`sync`).
    pub durability: Option<Durability>,
    /// Connections one uid may hold open at once.
    pub max_connections_per_uid: Option<usize>,
    /// A connection idle this long is closed.
    pub idle_timeout_ms: Option<u64>,
    /// A diff summarises files larger than this (on either side) instead
    /// of diffing them [default: [`DIFF_MAX_BYTES`]].
    pub diff_max_bytes: Option<u64>,
    #[serde(default)]
    pub retention: Settings,
    #[serde(default)]
    pub sandbox: BTreeMap<String, SandboxSettings>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SandboxSettings {
    /// Register this directory under the section's name at start, unless
    /// it is registered already.
    pub path: Option<PathBuf>,
    /// Excludes for a sandbox registered through `path`.
    #[serde(default)]
    pub excludes: Vec<String>,
    /// The object store of a sandbox registered through `path`.
    pub store: Option<PathBuf>,
    #[serde(default)]
    pub retention: Settings,
    /// Take an `auto` checkpoint once the tree has been quiet this long
    /// after changes. Off when absent.
    pub auto_checkpoint_ms: Option<u64>,
}

/// A diff summarises files larger than this, unless configured otherwise.
pub const DIFF_MAX_BYTES: u64 = 1 << 20;

/// How sandboxes are watched.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Watcher {
    /// fanotify when the daemon runs as root and the kernel has it (Linux
    /// 5.9), else inotify; a sandbox whose filesystem fanotify cannot
    /// watch falls back to inotify.
    #[default]
    Auto,
    /// fanotify, one mark per filesystem: no watch per directory, so no
    /// watch limit. Root only; without it, or on a filesystem it cannot
    /// watch, the sandbox is watched with inotify (the log says why, and
    /// `status` shows which watcher it has).
    Fanotify,
    /// inotify, a watch per directory (`fs.inotify.max_user_watches`).
    Inotify,
}

/// When a checkpoint or rollback is acknowledged.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Once the catalogue transaction commits: a crash of the daemon loses
    /// nothing acknowledged; a power loss may lose objects of the last
    /// checkpoints (`verify` then marks them broken).
    #[default]
    Commit,
    /// Once the objects (one `syncfs` of the store) and the catalogue
    /// (SQLite `synchronous = FULL`) are on disk; a rollback fsyncs each
    /// file before renaming it into place and each changed directory.
    Sync,
}

/// A sandbox the configuration registers at start.
#[derive(Clone, Debug, PartialEq)]
pub struct Registration {
    pub name: String,
    pub path: PathBuf,
    pub excludes: Vec<String>,
    pub store: Option<PathBuf>,
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

/// Why a configuration file could not be used, and which.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the configuration {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the configuration {}: {source}", path.display())]
    Parse { path: PathBuf, source: toml::de::Error },
}

impl FileConfig {
    /// Reads and checks a configuration file; an unknown key is an error.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })
    }

    /// Returns the quiet period of each sandbox with auto checkpoints.
    pub fn auto_checkpoints(&self) -> BTreeMap<String, std::time::Duration> {
        self.sandbox
            .iter()
            .filter_map(|(name, s)| s.auto_checkpoint_ms.map(|ms| (name.clone(), std::time::Duration::from_millis(ms))))
            .collect()
    }

    /// Returns the size past which a diff summarises a file.
    pub fn diff_max_bytes(&self) -> u64 {
        self.diff_max_bytes.unwrap_or(DIFF_MAX_BYTES)
    }

    /// Returns the connection limits, defaults where not set.
    pub fn limits(&self) -> Limits {
        let default = Limits::default();
        Limits {
            per_uid: self.max_connections_per_uid.unwrap_or(default.per_uid),
            idle: self.idle_timeout_ms.map_or(default.idle, std::time::Duration::from_millis),
            hello: default.hello,
        }
    }

    /// Returns the sandboxes to register at start.
    pub fn registrations(&self) -> Vec<Registration> {
        self.sandbox
            .iter()
            .filter_map(|(name, s)| {
                s.path.as_ref().map(|path| Registration {
                    name: name.clone(),
                    path: path.clone(),
                    excludes: s.excludes.clone(),
                    store: s.store.clone(),
                })
            })
            .collect()
    }

    pub fn retention(&self) -> Retention {
        Retention {
            default: Policy::default().with(&self.retention),
            sandboxes: self.sandbox.iter().map(|(k, v)| (k.clone(), v.retention.clone())).collect(),
        }
    }
}

/// Returns a systemd drop-in for `snapbackd.service` listing the directories
/// the configuration registers (and their stores) as `ReadWritePaths=`: the
/// unit's `ProtectSystem=strict` leaves everything else read-only.
pub fn systemd_dropin(config: &FileConfig) -> String {
    let mut out = String::from(
        "# Generated by `snapbackd --print-dropin` from the configuration file.\n\
         # Install as /etc/systemd/system/snapbackd.service.d/sandboxes.conf, then\n\
         # `systemctl daemon-reload && systemctl restart snapbackd`.\n[Service]\n",
    );
    for r in config.registrations() {
        for dir in std::iter::once(&r.path).chain(r.store.as_ref()) {
            let text = dir.to_str().filter(|t| !t.contains(['"', '\\']) && !t.chars().any(char::is_control));
            match text {
                // A leading `-`: a missing directory does not stop the service.
                Some(t) => out.push_str(&format!("ReadWritePaths=\"-{t}\"\n")),
                None => out.push_str(&format!("# not expressible in a unit file, add by hand: {}\n", dir.display())),
            }
        }
    }
    out
}

/// Limits that keep a careless or hostile client from holding the daemon's
/// memory or starving other clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections one uid may hold open at once. One more evicts that
    /// uid's longest-idle connection (never one with a request running);
    /// when all are busy, the new one is refused with `busy`.
    pub per_uid: usize,
    /// A connection that sends no complete line for this long is closed.
    pub idle: std::time::Duration,
    /// A connection that has not said hello within this long is closed.
    pub hello: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { per_uid: 64, idle: std::time::Duration::from_secs(600), hello: std::time::Duration::from_secs(10) }
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
        assert_eq!(cfg.socket_group.as_deref(), Some("snapback"));
        assert_eq!(cfg.excludes, ["node_modules", "*.pyc"]);
        assert_eq!(cfg.diff_max_bytes(), DIFF_MAX_BYTES);
        assert_eq!(FileConfig::default().diff_max_bytes(), DIFF_MAX_BYTES);
        assert_eq!(
            cfg.registrations(),
            [Registration {
                name: "my-project".into(),
                path: "/srv/agents/my-project".into(),
                excludes: vec!["target".into()],
                store: Some("/srv/agents/.snapback".into()),
            }]
        );
    }

    #[test]
    fn the_dropin_lists_configured_sandboxes_and_stores() {
        let cfg: FileConfig =
            toml::from_str("[sandbox.a]\npath = \"/srv/my agents/a\"\nstore = \"/srv/st\"\n[sandbox.b]\n").unwrap();
        let dropin = systemd_dropin(&cfg);
        assert!(
            dropin.ends_with("[Service]\nReadWritePaths=\"-/srv/my agents/a\"\nReadWritePaths=\"-/srv/st\"\n"),
            "{dropin}"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<FileConfig>("[retention]\nkeep_lots = 3\n").is_err());
        assert!(toml::from_str::<FileConfig>("colour = 1\n").is_err());
    }
}
