//! What the catalogue can fail with. The engine turns each into the
//! daemon's `Error` (see the `From` below); the catalogue itself knows
//! nothing of requests or the wire.

use super::*;

#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error("catalogue: {0}")]
    Db(#[from] rusqlite::Error),
    /// No sandbox or checkpoint by that reference.
    #[error("{0}")]
    NotFound(String),
    /// A checkpoint id prefix that matches several.
    #[error("{0}")]
    Ambiguous(String),
    /// A reference that cannot be a checkpoint id at all.
    #[error("{0}")]
    NotAnId(String),
    /// A write made from a manifest held in memory that no longer matches
    /// the catalogue: nothing was written, and the manifest must be read
    /// again.
    #[error("{0}")]
    Stale(String),
    /// The catalogue holds what this daemon cannot use (a schema from a
    /// newer snapbackd, a value that does not decode, a migration that
    /// failed).
    #[error("{0}")]
    Damaged(String),
}

impl From<CatalogueError> for Error {
    fn from(e: CatalogueError) -> Error {
        match e {
            CatalogueError::Db(e) => Error::Db(e),
            CatalogueError::NotFound(m) => Error::NotFound(m),
            CatalogueError::Ambiguous(m) => Error::Ambiguous(m),
            CatalogueError::NotAnId(m) => Error::InvalidRequest(m),
            CatalogueError::Stale(m) => Error::Stale(m),
            CatalogueError::Damaged(m) => Error::Internal(m),
        }
    }
}
