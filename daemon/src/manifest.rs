//! What a checkpoint records about one path, and how a live `lstat`
//! compares with it.

use std::collections::BTreeMap;
use std::fmt;

/// The type of a path.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A FIFO, socket or device node: recorded, never opened.
    Special,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::Special => "special",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "file" => Kind::File,
            "dir" => Kind::Dir,
            "symlink" => Kind::Symlink,
            "special" => Kind::Special,
            _ => return None,
        })
    }

    /// Returns the kind of an `st_mode`.
    pub fn of_mode(st_mode: u32) -> Kind {
        match st_mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            _ => Kind::Special,
        }
    }
}

/// The recorded state of one path: everything a rollback restores.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Meta {
    pub kind: Kind,
    /// Permission bits (`0o7777`); for specials, the full `st_mode`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Apparent size of a file; 0 otherwise.
    pub size: u64,
    /// Modification time of a file; 0 otherwise (directory times change
    /// with every entry and are not restored).
    pub mtime_ns: i64,
    /// Target of a symlink.
    pub target: Option<Target>,
    /// blake3 of a file's content: the name of its store object.
    pub object: Option<ObjectId>,
}

/// A symlink's target, behind one pointer: few versions are symlinks,
/// and a `Box<[u8]>` in every [`Meta`] would make each 8 bytes larger (8
/// MiB at a million paths).
#[derive(Clone, PartialEq, Eq)]
pub struct Target(Box<Box<[u8]>>);

impl std::ops::Deref for Target {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<&[u8]> for Target {
    fn from(b: &[u8]) -> Target {
        Target(Box::new(b.into()))
    }
}

impl From<Box<[u8]>> for Target {
    fn from(b: Box<[u8]>) -> Target {
        Target(Box::new(b))
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// What the live path looked like when it was last compared. Used to decide
/// whether a path must be read again; never restored.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct StatKey {
    pub ctime_ns: i64,
    pub ino: u64,
    /// The path changed so close to its scan that an equal stat later does
    /// not prove it unchanged.
    pub racy: bool,
    /// For a file, the most names its inode had while this version was
    /// current (1 for anything else): above
    /// 1, another name (perhaps outside the sandbox) can change it with no
    /// event for this one, so it is compared at every checkpoint; and
    /// versions of one state with its inode number are names of one file
    /// (see `crate::links`).
    pub nlink: u32,
}

impl StatKey {
    /// The key of a path whose `lstat` is `st`.
    pub fn of(st: &libc::stat, racy: bool) -> StatKey {
        StatKey {
            ctime_ns: crate::sys::ctime_ns(st),
            ino: st.st_ino,
            racy,
            nlink: st.st_nlink.clamp(1, u32::MAX as u64) as u32,
        }
    }
}

/// Whether a version is a file whose inode had other names: compared at
/// every checkpoint, and one of a link group (see `crate::links`).
pub fn has_other_names(meta: &Meta, key: &StatKey) -> bool {
    meta.kind == Kind::File && key.nlink > 1
}

/// One version of a path, as stored in the catalogue.
#[derive(Clone, Debug)]
pub struct Row {
    pub id: i64,
    pub meta: Meta,
    pub key: StatKey,
}

// What a path costs between checkpoints is mostly its manifest entry: a
// million paths take 16 MiB more for every 16 bytes added here.
const _: () = assert!(std::mem::size_of::<(Box<[u8]>, Row)>() <= 120);

/// A sandbox state: relative path to its version, sorted, so that a subtree
/// is one range.
pub type Manifest = BTreeMap<Box<[u8]>, Row>;

/// Builds a manifest with its nodes full (see [`compact`]) from entries in
/// any order, without first holding them all in a half-full one: entries
/// gather in a batch of at most [`Builder::BATCH`], and batches merge like
/// the digits of a binary counter, each merge a rebuild with full nodes.
/// A merge waits until the newer side is at least half the older, so an
/// entry moves a few times (about log2 of the entries over the batch), and
/// the peak is the compact size plus one batch.
#[derive(Default)]
pub struct Builder {
    /// Compact manifests, oldest first, each at least twice the next.
    levels: Vec<Manifest>,
    batch: Manifest,
}

impl Builder {
    pub const BATCH: usize = 1 << 15;

    /// A builder whose entries replace or join those of `start`.
    pub fn new(start: Manifest) -> Builder {
        Builder { levels: vec![start], batch: Manifest::new() }
    }

    /// Inserts an entry; a later entry of the same path replaces it.
    pub fn insert(&mut self, path: impl Into<Box<[u8]>>, row: Row) {
        self.batch.insert(path.into(), row);
        if self.batch.len() >= Self::BATCH {
            let mut merged = std::mem::take(&mut self.batch);
            while let Some(top) = self.levels.last()
                && top.len() <= merged.len() * 2
            {
                merged = newer_over(self.levels.pop().unwrap_or_default(), merged);
            }
            self.levels.push(merged);
        }
    }

    pub fn finish(mut self) -> Manifest {
        let mut merged = std::mem::take(&mut self.batch);
        while let Some(older) = self.levels.pop() {
            merged = newer_over(older, merged);
        }
        merged
    }
}

/// `older` with the entries of `newer` added or replacing its own, rebuilt
/// with full nodes when both hold any.
fn newer_over(mut older: Manifest, mut newer: Manifest) -> Manifest {
    older.append(&mut newer);
    older
}

/// Rebuilds `m` with its nodes full. A `BTreeMap` filled one insertion at
/// a time splits each full node in two and ends a little over half full:
/// a manifest read from the catalogue or made by a first checkpoint took
/// about 300 bytes a path instead of 180 (a million paths: 290 against
/// 171 MiB). `append` of two non-empty maps builds a new tree from their
/// merged entries with every node full, freeing the old nodes as it goes,
/// so this costs one pass (90 ms at a million paths) and no second copy.
pub fn compact(m: &mut Manifest) {
    let Some((path, row)) = m.pop_first() else { return };
    let mut full = Manifest::new();
    full.insert(path, row);
    full.append(m);
    *m = full;
}

/// Returns the versions of `prefix` and everything below it.
pub fn subtree<'a>(m: &'a Manifest, prefix: &[u8]) -> impl Iterator<Item = (&'a [u8], &'a Row)> + 'a {
    use std::ops::Bound;
    let exact = m.get_key_value(prefix).filter(|_| !prefix.is_empty());
    let below = if prefix.is_empty() {
        m.range::<[u8], _>(..)
    } else {
        let mut lo = prefix.to_vec();
        lo.push(b'/');
        let mut hi = prefix.to_vec();
        hi.push(b'/' + 1);
        m.range::<[u8], _>((Bound::Included(&lo[..]), Bound::Excluded(&hi[..])))
    };
    exact.into_iter().chain(below).map(|(p, r)| (&**p, r))
}

/// The name of a store object: the blake3 hash of its content, or, for an
/// object cloned before it was read (see [`ObjectId::unhashed`]), a unique
/// name that says so, until the store's hasher replaces it with the hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub [u8; 32]);

/// The last 16 bytes of every unhashed object's id. A blake3 hash ends so
/// with a chance of 2^-128; if one ever did, the hasher would read its
/// object, find the hash it already has, and leave it be.
const UNHASHED: [u8; 16] = *b"snapback:unhashd";

impl ObjectId {
    /// A new name for an object whose content has not been read: a ULID
    /// (so that names made in turn sort in turn, and the catalogue's list
    /// of them grows at its end) followed by [`UNHASHED`]. Equal content
    /// cloned twice gets two of these; the hasher gives both its hash.
    pub fn unhashed() -> ObjectId {
        let mut id = [0u8; 32];
        id[..16].copy_from_slice(&ulid::Ulid::new().to_bytes());
        id[16..].copy_from_slice(&UNHASHED);
        ObjectId(id)
    }

    /// Whether this names an object not hashed yet, which equal content
    /// elsewhere does not share.
    pub fn is_unhashed(&self) -> bool {
        self.0[16..] == UNHASHED
    }

    /// Parses 64 lowercase hex digits.
    pub fn from_hex(s: &[u8]) -> Option<ObjectId> {
        if s.len() != 64 {
            return None;
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (i, pair) in s.chunks(2).enumerate() {
            out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Some(ObjectId(out))
    }

    /// Parses the 32 bytes stored in the catalogue.
    pub fn from_slice(b: &[u8]) -> Option<ObjectId> {
        b.try_into().ok().map(ObjectId)
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({self})")
    }
}

/// A live path's stat, reduced to what capture compares: the version it
/// would record, short of what must be read (a symlink's target, a file's
/// object), and its stat key.
#[derive(Clone, Debug)]
pub struct Live {
    pub meta: Meta,
    pub key: StatKey,
}

impl Live {
    /// Reduces an `lstat` result. `racy_after_ns`: a path whose mtime or
    /// ctime is at or after this instant is marked racy.
    pub fn from_stat(st: &libc::stat, racy_after_ns: i64) -> Live {
        let kind = Kind::of_mode(st.st_mode);
        let (size, mtime_ns) = match kind {
            Kind::File => (st.st_size as u64, crate::sys::mtime_ns(st)),
            _ => (0, 0),
        };
        let racy = crate::sys::ctime_ns(st) >= racy_after_ns || crate::sys::mtime_ns(st) >= racy_after_ns;
        let mode = match kind {
            Kind::Special => st.st_mode,
            _ => st.st_mode & 0o7777,
        };
        let mut key = StatKey::of(st, racy);
        if kind != Kind::File {
            // Only a file's other names matter; a directory's link count
            // counts its subdirectories, and is kept out of the names
            // compared at every checkpoint and out of link groups.
            key.nlink = 1;
        }
        Live {
            meta: Meta { kind, mode, uid: st.st_uid, gid: st.st_gid, size, mtime_ns, target: None, object: None },
            key,
        }
    }

    /// Whether this stat proves the path still holds `row` without reading
    /// it: same type, metadata, inode and ctime, and the row was not racy.
    pub fn matches(&self, row: &Row) -> bool {
        let (m, l) = (&row.meta, &self.meta);
        !row.key.racy
            && self.key.ino == row.key.ino
            && self.key.ctime_ns == row.key.ctime_ns
            && (l.kind, l.mode, l.uid, l.gid, l.size, l.mtime_ns) == (m.kind, m.mode, m.uid, m.gid, m.size, m.mtime_ns)
    }

    /// Builds the recorded state from this stat plus what had to be read.
    pub fn to_meta(&self, target: Option<Box<[u8]>>, object: Option<ObjectId>) -> Meta {
        Meta { target: target.map(Target::from), object, ..self.meta.clone() }
    }
}

/// Whether `path` is `prefix` itself or lies below it (`prefix` empty: any).
pub fn is_within(path: &[u8], prefix: &[u8]) -> bool {
    prefix.is_empty() || (path.starts_with(prefix) && (path.len() == prefix.len() || path[prefix.len()] == b'/'))
}

/// Joins a relative directory and a name.
pub fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        return name.to_vec();
    }
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    p.extend_from_slice(dir);
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The test binary's allocator: the system's, counting what each
    /// thread holds, so that a test can weigh what it builds while other
    /// tests run beside it.
    struct Counting;

    std::thread_local! {
        static HELD: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
    }

    // SAFETY: every call is passed to `System` unchanged; the count is a
    // thread-local `Cell` that neither allocates nor has a destructor.
    unsafe impl std::alloc::GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            let _ = HELD.try_with(|h| h.set(h.get() + layout.size() as isize));
            unsafe { std::alloc::System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            let _ = HELD.try_with(|h| h.set(h.get() - layout.size() as isize));
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
            let _ = HELD.try_with(|h| h.set(h.get() + new_size as isize - layout.size() as isize));
            unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Counting = Counting;

    /// Bytes this thread holds after `f` runs, less those before, with
    /// what `f` returns (dropped after the weighing).
    pub(crate) fn weigh<T>(f: impl FnOnce() -> T) -> (T, isize) {
        let before = HELD.with(|h| h.get());
        let out = f();
        (out, HELD.with(|h| h.get()) - before)
    }

    pub(crate) fn row(id: i64) -> Row {
        Row {
            id,
            meta: Meta { kind: Kind::File, mode: 0, uid: 0, gid: 0, size: 0, mtime_ns: 0, target: None, object: None },
            key: StatKey { ctime_ns: 0, ino: 0, racy: false, nlink: 1 },
        }
    }

    fn ids(m: &Manifest) -> Vec<(&[u8], i64)> {
        m.iter().map(|(p, r)| (&p[..], r.id)).collect()
    }

    #[test]
    fn a_built_or_compacted_manifest_holds_the_same_versions_in_full_nodes() {
        // Paths as a tree of 1,000 directories names them, in an order
        // that is not sorted, a fifth of them twice: the later version
        // wins.
        let n = 4 * Builder::BATCH + 123;
        let entries: Vec<(Vec<u8>, i64)> = (0..n)
            .map(|i| (i * 7919) % n)
            .chain((0..n / 5).map(|i| i * 5))
            .enumerate()
            .map(|(id, k)| (format!("d{:03}/f{k:07}.dat", k % 1000).into_bytes(), id as i64))
            .collect();
        let start: Manifest = entries[..1000].iter().map(|(p, _)| (p[..].into(), row(-1))).collect();
        let (built, size) = weigh(|| {
            let mut b = Builder::new(start.clone());
            for (p, id) in &entries {
                b.insert(p.clone(), row(*id));
            }
            b.finish()
        });
        // What the entries themselves take; a tree of full nodes adds
        // about a tenth for its inner nodes.
        let entry = std::mem::size_of::<(Box<[u8]>, Row)>();
        let floor: usize = built.keys().map(|p| entry + p.len()).sum();
        let full = |bytes: isize| (bytes as f64 / floor as f64) < 1.15;
        assert!(full(size), "built: {size} bytes for {floor} of entries");
        // One at a time, in order, as the catalogue gives them.
        let (mut sparse, sparse_size) = weigh(|| {
            let mut m = Manifest::new();
            for (p, r) in &built {
                m.insert(p.clone(), r.clone());
            }
            m
        });
        assert!(!full(sparse_size), "inserted one at a time: {sparse_size} bytes for {floor}");
        let ((), change) = weigh(|| compact(&mut sparse));
        assert_eq!(ids(&sparse), ids(&built));
        assert!(full(sparse_size + change), "compacted: {} bytes for {floor}", sparse_size + change);
        // The same versions as inserting them all one at a time.
        let mut expected = start;
        for (p, id) in &entries {
            expected.insert(p[..].into(), row(*id));
        }
        assert_eq!(ids(&built), ids(&expected));
    }

    #[test]
    fn only_a_file_counts_its_other_names() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("d/sub")).unwrap();
        std::fs::write(t.path().join("f"), "x").unwrap();
        std::fs::hard_link(t.path().join("f"), t.path().join("g")).unwrap();
        let root = std::fs::File::open(t.path()).unwrap();
        let live = |name: &str| {
            let st = crate::sys::lstatat(std::os::fd::AsFd::as_fd(&root), name.as_bytes()).unwrap();
            Live::from_stat(&st, i64::MAX)
        };
        let (file, dir) = (live("f"), live("d"));
        assert_eq!(file.key.nlink, 2);
        assert!(has_other_names(&file.meta, &file.key));
        // Three links (its name, its ".", "sub/.."), and none of them other
        // names of a file.
        assert_eq!(dir.key.nlink, 1);
        assert!(!has_other_names(&dir.meta, &dir.key));
    }

    #[test]
    fn object_ids_round_trip_through_hex() {
        let id = ObjectId(*blake3::hash(b"x").as_bytes());
        assert_eq!(ObjectId::from_hex(id.to_string().as_bytes()), Some(id));
        assert_eq!(id.to_string(), blake3::hash(b"x").to_hex().as_str());
        assert_eq!(ObjectId::from_hex(b"zz"), None);
        assert_eq!(ObjectId::from_hex(&[b'G'; 64]), None);
    }

    #[test]
    fn subtree_is_the_prefix_and_what_lies_below_it() {
        let row = |id| Row {
            id,
            meta: Meta { kind: Kind::File, mode: 0, uid: 0, gid: 0, size: 0, mtime_ns: 0, target: None, object: None },
            key: StatKey { ctime_ns: 0, ino: 0, racy: false, nlink: 1 },
        };
        let m: Manifest = [&b"a"[..], b"a.b", b"a/b", b"a/b/c", b"ab", b"b"]
            .iter()
            .enumerate()
            .map(|(i, p)| (Box::from(*p), row(i as i64)))
            .collect();
        let under_a: Vec<&[u8]> = subtree(&m, b"a").map(|(p, _)| p).collect();
        assert_eq!(under_a, [&b"a"[..], b"a/b", b"a/b/c"]);
        assert_eq!(subtree(&m, b"").count(), 6);
        assert_eq!(subtree(&m, b"zz").count(), 0);
    }

    #[test]
    fn within_respects_component_boundaries() {
        assert!(is_within(b"a/b", b"a"));
        assert!(is_within(b"a", b"a"));
        assert!(!is_within(b"ab", b"a"));
        assert!(is_within(b"x", b""));
        assert_eq!(join(b"", b"x"), b"x");
        assert_eq!(join(b"a", b"x"), b"a/x");
    }
}
