//! Sandboxes and stores as the catalogue records them.

use super::*;

/// A registered sandbox, as stored.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub id: i64,
    pub name: String,
    pub root: Vec<u8>,
    pub store: Vec<u8>,
    pub clone_method: CloneMethod,
    pub clone_note: String,
    pub excludes: Vec<String>,
    pub owner_uid: u32,
    pub state: SandboxState,
    pub head_seq: u64,
    pub created_ms: i64,
    /// The root's device and inode when it was registered; `None` for a
    /// sandbox registered before they were recorded.
    pub identity: Option<Identity>,
    /// Why the root is no longer the registered directory, once an
    /// operation found it so; cleared by registering it again.
    pub moved: Option<String>,
}

pub(super) const SANDBOX_COLS: &str = "id, name, root, store, clone_method, clone_note, excludes, owner_uid, state, head_seq, \
     created_ms, root_dev, root_ino, moved";

pub(super) fn sandbox_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Sandbox> {
    let id: i64 = r.get(0)?;
    let excludes: String = r.get(6)?;
    Ok(Sandbox {
        id,
        name: r.get(1)?,
        root: r.get(2)?,
        store: r.get(3)?,
        clone_method: column::<Stored<CloneMethod>>(r, 4, "sandboxes", id, "clone_method")?.0,
        clone_note: r.get(5)?,
        excludes: serde_json::from_str(&excludes).map_err(|e| undecodable("sandboxes", id, "excludes", e))?,
        owner_uid: r.get(7)?,
        state: column(r, 8, "sandboxes", id, "state")?,
        head_seq: r.get::<_, i64>(9)? as u64,
        created_ms: r.get(10)?,
        identity: identity_from(r.get(11)?, r.get(12)?),
        moved: r.get(13)?,
    })
}

pub(super) fn identity_from(dev: Option<i64>, ino: Option<i64>) -> Option<Identity> {
    Some(Identity { dev: dev? as u64, ino: ino? as u64 })
}

pub fn sandboxes(conn: &Connection) -> Result<Vec<Sandbox>> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {SANDBOX_COLS} FROM sandboxes ORDER BY name"))?;
    let rows = stmt.query_map([], sandbox_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Finds a sandbox by name, or by its root path given as an absolute path.
pub fn sandbox_by_ref(conn: &Connection, reference: &str) -> Result<Sandbox> {
    let sql = format!("SELECT {SANDBOX_COLS} FROM sandboxes WHERE name = ?1 OR root = ?2");
    conn.prepare_cached(&sql)?
        .query_row(params![reference, reference.as_bytes()], sandbox_from_row)
        .optional()?
        .ok_or_else(|| CatalogueError::NotFound(format!("no sandbox named or rooted at {reference:?}")))
}

pub fn sandbox_by_id(conn: &Connection, id: i64) -> Result<Sandbox> {
    let sql = format!("SELECT {SANDBOX_COLS} FROM sandboxes WHERE id = ?1");
    conn.prepare_cached(&sql)?
        .query_row([id], sandbox_from_row)
        .optional()?
        .ok_or_else(|| CatalogueError::NotFound(format!("no sandbox with id {id}")))
}

/// Inserts a sandbox and returns its id.
pub fn insert_sandbox(conn: &Connection, s: &Sandbox) -> Result<i64> {
    conn.prepare_cached(
        "INSERT INTO sandboxes (name, root, store, clone_method, clone_note, excludes, owner_uid, state, head_seq,
                                created_ms, root_dev, root_ino)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'active', 0, ?8, ?9, ?10)",
    )?
    .execute(params![
        s.name,
        s.root,
        s.store,
        Stored(s.clone_method),
        s.clone_note,
        serde_json::to_string(&s.excludes).map_err(|e| CatalogueError::Damaged(e.to_string()))?,
        s.owner_uid,
        s.created_ms,
        s.identity.map(|i| i.dev as i64),
        s.identity.map(|i| i.ino as i64),
    ])?;
    Ok(conn.last_insert_rowid())
}

pub fn set_sandbox_state(conn: &Connection, id: i64, state: SandboxState) -> Result<()> {
    conn.prepare_cached("UPDATE sandboxes SET state = ?2 WHERE id = ?1")?.execute(params![id, state])?;
    Ok(())
}

/// Records the directory a sandbox's root now is (registered again, or
/// adopted by a sandbox from before identities were recorded), and clears
/// its `moved` note.
pub fn set_sandbox_identity(conn: &Connection, id: i64, identity: Identity) -> Result<()> {
    conn.prepare_cached("UPDATE sandboxes SET root_dev = ?2, root_ino = ?3, moved = NULL WHERE id = ?1")?
        .execute(params![id, identity.dev as i64, identity.ino as i64])?;
    Ok(())
}

/// Records why a sandbox's root is no longer the registered directory.
pub fn set_sandbox_moved(conn: &Connection, id: i64, why: &str) -> Result<()> {
    conn.prepare_cached("UPDATE sandboxes SET moved = ?2 WHERE id = ?1")?.execute(params![id, why])?;
    Ok(())
}

/// The recorded identity of the store at `path`, if it was opened before.
pub fn store_identity(conn: &Connection, path: &[u8]) -> Result<Option<Identity>> {
    Ok(conn
        .prepare_cached("SELECT dev, ino FROM stores WHERE path = ?1")?
        .query_row([path], |r| Ok(Identity { dev: r.get::<_, i64>(0)? as u64, ino: r.get::<_, i64>(1)? as u64 }))
        .optional()?)
}

/// Records the identity of a store opened for the first time.
pub fn insert_store(conn: &Connection, path: &[u8], identity: Identity) -> Result<()> {
    conn.prepare_cached("INSERT INTO stores (path, dev, ino) VALUES (?1, ?2, ?3)")?.execute(params![
        path,
        identity.dev as i64,
        identity.ino as i64
    ])?;
    Ok(())
}

pub fn delete_sandbox(conn: &Connection, id: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM sandboxes WHERE id = ?1")?.execute([id])?;
    Ok(())
}

/// Returns the distinct object stores in use.
pub fn stores(conn: &Connection) -> Result<Vec<Vec<u8>>> {
    let mut stmt = conn.prepare_cached("SELECT DISTINCT store FROM sandboxes")?;
    let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn add_budget_pruned(conn: &Connection, sandbox_id: i64, n: u64) -> Result<()> {
    conn.prepare_cached("UPDATE sandboxes SET budget_pruned = budget_pruned + ?2 WHERE id = ?1")?
        .execute(params![sandbox_id, n as i64])?;
    Ok(())
}

pub fn budget_pruned(conn: &Connection, sandbox_id: i64) -> Result<u64> {
    Ok(conn
        .prepare_cached("SELECT budget_pruned FROM sandboxes WHERE id = ?1")?
        .query_row([sandbox_id], |r| r.get::<_, i64>(0))? as u64)
}
