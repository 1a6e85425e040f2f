//! The daemon's error type: the message names the action that failed and
//! never repeats its source. Which wire code each is chosen at the edge,
//! by the server (`server::refusal`).

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Ambiguous(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    PlanApplied(String),
    #[error("{message}")]
    Conflict { message: String, paths: Vec<Vec<u8>>, hint: String },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("catalogue: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("{0}")]
    Internal(String),
    /// The catalogue refused a write made from a manifest the daemon held
    /// in memory that no longer matches it.
    #[error("{0}")]
    Stale(String),
    /// The tree kept changing while a checkpoint read it.
    #[error("{0}")]
    Busy(String),
    /// A sandbox root or a store is no longer the directory that was
    /// registered (renamed, replaced, or reached through a symlink). With
    /// a sandbox id, the answer records `why` as the sandbox's `moved`
    /// note (see `Engine::answer`).
    #[error("{message}")]
    Moved { message: String, sandbox: Option<i64>, why: String, hint: String },
    /// Another error, with what the user may do about it: sent as the
    /// answer's `hint`, which the CLI prints on a line of its own.
    #[error("{error}")]
    Hinted { error: Box<Error>, hint: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// This error, with `hint` for the user.
    pub fn hinted(self, hint: impl Into<String>) -> Error {
        Error::Hinted { error: Box::new(self), hint: hint.into() }
    }

    /// What the user may do about it, if the error says.
    pub fn hint(&self) -> Option<&str> {
        match self {
            Error::Conflict { hint, .. } | Error::Moved { hint, .. } | Error::Hinted { hint, .. } => Some(hint),
            _ => None,
        }
    }
}

/// Adds the action that failed to an `io::Error`.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io { context: context(), source })
    }
}
