//! Whole-tree snapshots for comparing a sandbox with what it should be:
//! type, mode, content, symlink target and file mtime of every path.

use std::collections::BTreeMap;
use std::hash::Hasher;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, size: u64, mtime_ns: i64, content: u64 },
    Symlink { target: Vec<u8> },
    Other { mode: u32 },
}

/// Maps every path below `root` (as bytes) to what it is.
pub fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn content_hash(path: &Path) -> u64 {
    let mut f = std::fs::File::open(path).expect("open file");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read file");
        if n == 0 {
            return h.finish();
        }
        h.write(&buf[..n]);
    }
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<Vec<u8>, Node>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("read_dir").map(|e| e.expect("entry")).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let rel = path.strip_prefix(root).expect("below root").as_os_str().as_bytes().to_vec();
        let meta = std::fs::symlink_metadata(&path).expect("lstat");
        let mode = meta.mode() & 0o7777;
        let node = if meta.file_type().is_symlink() {
            Node::Symlink { target: std::fs::read_link(&path).expect("readlink").as_os_str().as_bytes().to_vec() }
        } else if meta.is_dir() {
            walk(root, &path, out);
            Node::Dir { mode }
        } else if meta.is_file() {
            Node::File {
                mode,
                size: meta.size(),
                mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                content: content_hash(&path),
            }
        } else {
            Node::Other { mode: meta.mode() }
        };
        out.insert(rel, node);
    }
}

/// Asserts two snapshots are equal, listing the paths that differ.
pub fn assert_same(actual: &BTreeMap<Vec<u8>, Node>, expected: &BTreeMap<Vec<u8>, Node>, what: &str) {
    if actual == expected {
        return;
    }
    let mut report = String::new();
    for (p, e) in expected {
        match actual.get(p) {
            None => report.push_str(&format!("  missing {:?}: {e:?}\n", p.escape_ascii().to_string())),
            Some(a) if a != e => {
                report.push_str(&format!("  differs {:?}: {a:?} != {e:?}\n", p.escape_ascii().to_string()))
            }
            _ => {}
        }
    }
    for p in actual.keys().filter(|p| !expected.contains_key(*p)) {
        report.push_str(&format!("  extra   {:?}\n", p.escape_ascii().to_string()));
    }
    panic!("{what}: the tree differs from what was expected:\n{report}");
}

/// The names of one file below `root`: each set of two or more regular
/// files that share an inode, as sorted relative paths.
pub fn link_sets(root: &Path) -> std::collections::BTreeSet<Vec<Vec<u8>>> {
    let mut by_inode: BTreeMap<(u64, u64), Vec<Vec<u8>>> = BTreeMap::new();
    for (rel, node) in snapshot(root) {
        if matches!(node, Node::File { .. }) {
            let meta = std::fs::symlink_metadata(root.join(std::ffi::OsStr::from_bytes(&rel))).expect("lstat");
            if meta.nlink() > 1 {
                by_inode.entry((meta.dev(), meta.ino())).or_default().push(rel);
            }
        }
    }
    by_inode.into_values().filter(|names| names.len() > 1).collect()
}
