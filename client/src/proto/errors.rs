//! Errors on the wire: a code a client can act on, a message, and the
//! paths concerned.

use super::*;

/// A stable error code; scripts match on these, never on messages.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    /// A checkpoint prefix matched more than one checkpoint.
    Ambiguous,
    AlreadyExists,
    PlanApplied,
    /// A revert would overwrite later changes; the paths are listed.
    Conflict,
    PermissionDenied,
    InvalidRequest,
    ProtocolMismatch,
    /// A sandbox root or store is no longer the directory that was
    /// registered; its owner registers it again to go on.
    Moved,
    Busy,
    Io,
    Internal,
    /// A code this client does not know (from a newer daemon).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::Ambiguous => "ambiguous",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::PlanApplied => "plan_applied",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::ProtocolMismatch => "protocol_mismatch",
            ErrorCode::Moved => "moved",
            ErrorCode::Busy => "busy",
            ErrorCode::Io => "io",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// The paths the error is about, when there are several (a revert's
    /// conflicts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<WirePath>,
    /// What the user may do about it, apart from the message (protocol 2;
    /// absent when there is nothing to suggest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code.as_str())
    }
}
