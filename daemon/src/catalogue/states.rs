//! The states the catalogue stores as text, as types: each is written by
//! name and read back strictly. A name the daemon does not know is an
//! error naming the row it came from (see [`undecodable`]), never a
//! default: a damaged row must not quietly change what the daemon does.

use std::fmt;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

/// Defines an enum stored as one of a fixed set of names.
macro_rules! stored_names {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            pub fn parse(s: &str) -> Option<$name> {
                match s {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $name {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<$name> {
                let text = value.as_str()?;
                $name::parse(text).ok_or_else(|| {
                    FromSqlError::Other(format!("{:?} is not a {}", text, stringify!($name)).into())
                })
            }
        }
    };
}

stored_names! {
    /// Whether a registered sandbox is in use.
    SandboxState {
        Active = "active",
        /// Removed with its checkpoints kept: `sandbox add` takes it back.
        Removed = "removed",
    }
}

stored_names! {
    /// What a restore intent restores.
    IntentKind {
        Rollback = "rollback",
        Revert = "revert",
        Undo = "undo",
    }
}

stored_names! {
    /// Where a restore intent stands.
    IntentState {
        /// Recorded, nothing touched yet.
        Pending = "pending",
        /// Its safety checkpoint is written; the tree is being changed.
        Applying = "applying",
        /// Cut short by a stop, and finished at the next start.
        Resumed = "resumed",
        /// Cut short, and could not be finished.
        Failed = "failed",
    }
}

/// A state the wire defines (a checkpoint's kind, a clone method, a plan's
/// state), which the catalogue stores by its wire name.
pub trait WireName: Sized + Copy {
    const WHAT: &'static str;
    fn name(self) -> &'static str;
    fn from_name(s: &str) -> Option<Self>;
}

macro_rules! wire_names {
    ($($ty:ident: $what:literal),+ $(,)?) => {
        $(impl WireName for snapback::proto::$ty {
            const WHAT: &'static str = $what;
            fn name(self) -> &'static str {
                self.as_str()
            }
            fn from_name(s: &str) -> Option<Self> {
                Self::parse(s)
            }
        })+
    };
}

wire_names!(CheckpointKind: "checkpoint kind", CloneMethod: "clone method", PlanState: "plan state");

/// A wire state as a catalogue column: written by name, read back strictly.
#[derive(Clone, Copy, Debug)]
pub struct Stored<T>(pub T);

impl<T: WireName> ToSql for Stored<T> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.0.name()))
    }
}

impl<T: WireName> FromSql for Stored<T> {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Stored<T>> {
        let text = value.as_str()?;
        T::from_name(text)
            .map(Stored)
            .ok_or_else(|| FromSqlError::Other(format!("{text:?} is not a {}", T::WHAT).into()))
    }
}

/// The error for a column of row `id` of `table` that does not decode.
pub(super) fn undecodable(table: &str, id: impl fmt::Display, column: &str, why: impl fmt::Display) -> rusqlite::Error {
    let message = format!("the catalogue's {table} row {id} has an unreadable {column}: {why}");
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, message.into())
}

/// Reads column `i` (named `column`) of row `id` of `table` as `T`, or
/// fails naming the row.
pub(super) fn column<T: FromSql>(
    r: &rusqlite::Row<'_>,
    i: usize,
    table: &str,
    id: impl fmt::Display,
    column: &str,
) -> rusqlite::Result<T> {
    r.get(i).map_err(|e| match e {
        rusqlite::Error::FromSqlConversionFailure(_, _, why) => undecodable(table, id, column, why),
        rusqlite::Error::InvalidColumnType(_, _, ty) => undecodable(table, id, column, format!("a {ty} value")),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_reads_back_and_others_are_refused() {
        for s in [SandboxState::Active, SandboxState::Removed] {
            assert_eq!(SandboxState::parse(s.as_str()), Some(s));
        }
        for k in [IntentKind::Rollback, IntentKind::Revert, IntentKind::Undo] {
            assert_eq!(IntentKind::parse(k.as_str()), Some(k));
        }
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let read = |text: &str| -> rusqlite::Result<IntentState> {
            conn.query_row("SELECT 7, ?1", [text], |r| column(r, 1, "intents", r.get::<_, i64>(0)?, "state"))
        };
        assert_eq!(read("applying").unwrap(), IntentState::Applying);
        let e = read("applyin").unwrap_err().to_string();
        assert!(e.contains("intents row 7") && e.contains("state") && e.contains("\"applyin\""), "{e}");
    }
}
