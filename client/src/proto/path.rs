//! Paths on the wire: bytes, as text when they are UTF-8 and as base64
//! otherwise, and the checks a request's paths must pass.

use super::*;

/// A path as bytes. Linux file names need not be UTF-8, so a path travels as
/// `{"text": "..."}` when it is valid UTF-8 and as `{"bytes": "<base64>"}`
/// otherwise.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct WirePath(pub Vec<u8>);

impl WirePath {
    /// Returns the path's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Returns the path as a `Path` (no conversion: Unix paths are bytes).
    pub fn as_path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.0))
    }

    /// Returns a printable form: the text itself when it is UTF-8 without
    /// control characters, else a quoted form with escapes.
    pub fn display(&self) -> String {
        match std::str::from_utf8(&self.0) {
            Ok(s) if !s.chars().any(char::is_control) => s.to_owned(),
            _ => format!("\"{}\"", self.0.escape_ascii()),
        }
    }
}

impl From<&Path> for WirePath {
    fn from(p: &Path) -> Self {
        WirePath(p.as_os_str().as_bytes().to_vec())
    }
}

impl From<&[u8]> for WirePath {
    fn from(p: &[u8]) -> Self {
        WirePath(p.to_vec())
    }
}

impl From<Vec<u8>> for WirePath {
    fn from(p: Vec<u8>) -> Self {
        WirePath(p)
    }
}

impl fmt::Debug for WirePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0.escape_ascii().to_string())
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum WirePathRepr {
    Text(String),
    Bytes(String),
}

impl WirePathRepr {
    fn of(bytes: &[u8]) -> WirePathRepr {
        match std::str::from_utf8(bytes) {
            Ok(text) => WirePathRepr::Text(text.to_owned()),
            Err(_) => WirePathRepr::Bytes(BASE64.encode(bytes)),
        }
    }
}

impl Serialize for WirePath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        WirePathRepr::of(&self.0).serialize(s)
    }
}

impl<'de> Deserialize<'de> for WirePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match WirePathRepr::deserialize(d)? {
            WirePathRepr::Text(t) => Ok(WirePath(t.into_bytes())),
            WirePathRepr::Bytes(b) => BASE64
                .decode(b)
                .map(WirePath)
                .map_err(|e| serde::de::Error::custom(format!("invalid base64 path: {e}"))),
        }
    }
}

/// Bytes that are usually text (a piece of a patch): on the wire like a
/// [`WirePath`], `{"text": "..."}` when UTF-8, else `{"bytes": "<base64>"}`.
#[derive(Clone, PartialEq, Eq, Default, Debug)]
pub struct WireBytes(pub Vec<u8>);

impl Serialize for WireBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        WirePathRepr::of(&self.0).serialize(s)
    }
}

impl<'de> Deserialize<'de> for WireBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        WirePath::deserialize(d).map(|p| WireBytes(p.0))
    }
}

/// Checks a request field that names a place on the filesystem: absolute,
/// and without a NUL byte (which no system call could be handed).
pub(super) fn check_absolute(field: &str, p: &WirePath) -> Result<(), String> {
    if p.0.contains(&0) {
        return Err(format!("{field}: {} contains a NUL byte", p.display()));
    }
    if p.0.first() != Some(&b'/') {
        return Err(format!("{field}: {} is not an absolute path", p.display()));
    }
    Ok(())
}

/// Checks a request field that names a path inside a sandbox: absolute (below
/// its root) or relative to its root, without a NUL byte or a `..`.
pub(super) fn check_sandbox_path(field: &str, p: &WirePath) -> Result<(), String> {
    if p.0.contains(&0) {
        return Err(format!("{field}: {} contains a NUL byte", p.display()));
    }
    if p.0.is_empty() || p.0.split(|&b| b == b'/').any(|c| c == b"..") {
        return Err(format!("{field}: {} is not a path inside a sandbox", p.display()));
    }
    Ok(())
}
