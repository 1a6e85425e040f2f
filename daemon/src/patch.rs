//! Line diffs of two versions of one path, counted as `git diff --stat`
//! counts them and written as `git diff` writes them (git's extended
//! unified format), so that `git apply` and `patch -p1` take them.
//!
//! This module knows nothing of where the versions come from: the engine
//! reads them (from the store or the live tree, through the access rule)
//! and hands their bytes here.

use std::time::Duration;

use similar::{Algorithm, ChangeTag, TextDiff};
use snapback::proto::FileStat;

/// Lines of context around each change, as git's default.
const CONTEXT: usize = 3;

/// The longest a line diff may search for a minimal edit script before it
/// settles for a longer, still correct, one.
const DIFF_TIMEOUT: Duration = Duration::from_secs(2);

/// git's modes: what a patch can say about an entry.
pub const MODE_FILE: u32 = 0o100644;
pub const MODE_EXEC: u32 = 0o100755;
pub const MODE_SYMLINK: u32 = 0o120000;

/// Git's rule: a NUL byte in the first 8,000 bytes makes content binary.
pub fn is_binary(content: &[u8]) -> bool {
    content[..content.len().min(8000)].contains(&0)
}

/// One side of a change: git's mode (see [`MODE_FILE`]) and the content
/// (a symlink's is its target).
#[derive(Clone, Copy)]
pub struct Version<'a> {
    pub mode: u32,
    pub content: &'a [u8],
}

/// Compares two versions of `path` (`None`: the side where it does not
/// exist) and returns its line counts; with `out`, appends its patch.
/// A symlink that became a file (or back) is written as git writes it:
/// the old one deleted, then the new one created.
pub fn diff(
    path: &[u8],
    old: Option<Version<'_>>,
    new: Option<Version<'_>>,
    mut out: Option<&mut Vec<u8>>,
) -> FileStat {
    if let (Some(o), Some(n)) = (old, new)
        && (o.mode == MODE_SYMLINK) != (n.mode == MODE_SYMLINK)
    {
        let gone = diff(path, Some(o), None, out.as_deref_mut());
        let made = diff(path, None, Some(n), out);
        return FileStat {
            added: gone.added + made.added,
            removed: gone.removed + made.removed,
            binary: gone.binary || made.binary,
            old_size: gone.old_size,
            new_size: made.new_size,
            ..FileStat::default()
        };
    }
    let old_content = old.map_or(&[][..], |v| v.content);
    let new_content = new.map_or(&[][..], |v| v.content);
    let binary = is_binary(old_content) || is_binary(new_content);
    let mut stat = FileStat {
        binary,
        old_size: old_content.len() as u64,
        new_size: new_content.len() as u64,
        ..FileStat::default()
    };
    let same = old.is_some() && new.is_some() && old_content == new_content;
    let text = (!binary && !same).then(|| line_diff(old_content, new_content));
    if let Some(d) = &text {
        for op in d.ops() {
            for change in d.iter_changes(op) {
                match change.tag() {
                    ChangeTag::Insert => stat.added += 1,
                    ChangeTag::Delete => stat.removed += 1,
                    ChangeTag::Equal => {}
                }
            }
        }
    }
    if let Some(out) = out {
        write(out, path, (old, new), text.as_ref());
    }
    stat
}

/// Appends the patch of a change: the header and mode lines, then the
/// hunks of `text` (`None`: a binary change, or none of content).
fn write(
    out: &mut Vec<u8>,
    path: &[u8],
    (old, new): (Option<Version<'_>>, Option<Version<'_>>),
    text: Option<&TextDiff<'_, '_, [u8]>>,
) {
    let (old_content, new_content) = (old.map_or(&[][..], |v| v.content), new.map_or(&[][..], |v| v.content));
    let same = old.is_some() && new.is_some() && old_content == new_content;
    let (old_mode, new_mode) = (old.map(|v| v.mode), new.map(|v| v.mode));
    if same && old_mode == new_mode {
        return; // nothing git could show
    }
    header(out, path, old_mode, new_mode);
    if same || (old_content.is_empty() && new_content.is_empty()) {
        return;
    }
    let a = side_name(b"a/", path, old.is_some());
    let b = side_name(b"b/", path, new.is_some());
    match text {
        None => {
            // git's parser needs an index line before a binary change. The
            // ids name the content (blake3, as the store does), not git
            // blobs: git uses them only to apply a binary patch, which
            // this is not.
            let id = |v: Option<Version<'_>>| {
                v.map_or("0000000".into(), |v| blake3::hash(v.content).to_hex()[..7].to_owned())
            };
            let mode = match (old_mode, new_mode) {
                (Some(o), Some(n)) if o == n => format!(" {o:o}"),
                _ => String::new(),
            };
            out.extend_from_slice(format!("index {}..{}{mode}\n", id(old), id(new)).as_bytes());
            out.extend_from_slice(b"Binary files ");
            out.extend_from_slice(&a);
            out.extend_from_slice(b" and ");
            out.extend_from_slice(&b);
            out.extend_from_slice(b" differ\n");
        }
        Some(d) => {
            out.extend_from_slice(b"--- ");
            out.extend_from_slice(&a);
            out.extend_from_slice(b"\n+++ ");
            out.extend_from_slice(&b);
            out.push(b'\n');
            hunks(out, d);
        }
    }
}

fn line_diff<'a>(old: &'a [u8], new: &'a [u8]) -> TextDiff<'a, 'a, [u8]> {
    TextDiff::configure().algorithm(Algorithm::Myers).timeout(DIFF_TIMEOUT).diff_lines(old, new)
}

/// `diff --git a/P b/P` and the mode lines.
fn header(out: &mut Vec<u8>, path: &[u8], old: Option<u32>, new: Option<u32>) {
    out.extend_from_slice(b"diff --git ");
    out.extend_from_slice(&side_name(b"a/", path, true));
    out.push(b' ');
    out.extend_from_slice(&side_name(b"b/", path, true));
    out.push(b'\n');
    match (old, new) {
        (None, Some(m)) => out.extend_from_slice(format!("new file mode {m:o}\n").as_bytes()),
        (Some(m), None) => out.extend_from_slice(format!("deleted file mode {m:o}\n").as_bytes()),
        (Some(o), Some(n)) if o != n => out.extend_from_slice(format!("old mode {o:o}\nnew mode {n:o}\n").as_bytes()),
        _ => {}
    }
}

/// The unified hunks of a line diff, with git's "no newline" marker.
fn hunks(out: &mut Vec<u8>, d: &TextDiff<'_, '_, [u8]>) {
    for group in d.grouped_ops(CONTEXT) {
        let (Some(first), Some(last)) = (group.first(), group.last()) else { continue };
        let old = first.old_range().start..last.old_range().end;
        let new = first.new_range().start..last.new_range().end;
        out.extend_from_slice(format!("@@ -{} +{} @@\n", range(old), range(new)).as_bytes());
        for op in &group {
            for change in d.iter_changes(op) {
                out.push(match change.tag() {
                    ChangeTag::Equal => b' ',
                    ChangeTag::Delete => b'-',
                    ChangeTag::Insert => b'+',
                });
                out.extend_from_slice(change.value());
                if change.missing_newline() {
                    out.extend_from_slice(b"\n\\ No newline at end of file\n");
                }
            }
        }
    }
}

/// A hunk's range as git writes it: `start,len`, `start` alone for one
/// line, and the line before for an empty range.
fn range(r: std::ops::Range<usize>) -> String {
    match r.len() {
        1 => format!("{}", r.start + 1),
        0 => format!("{},0", r.start),
        n => format!("{},{n}", r.start + 1),
    }
}

/// `a/P` or `b/P` (quoted as git quotes names), or `/dev/null` for a side
/// where the path does not exist.
fn side_name(prefix: &[u8], path: &[u8], exists: bool) -> Vec<u8> {
    if !exists {
        return b"/dev/null".to_vec();
    }
    let mut name = prefix.to_vec();
    name.extend_from_slice(path);
    quoted(&name)
}

/// A name as git writes it in a patch header: as is, or, when it holds a
/// byte git would not print (a control character, `"`, `\`, anything
/// past ASCII), in double quotes with C escapes and octal bytes. Both
/// `git apply` and GNU `patch` read that form.
pub fn quoted(name: &[u8]) -> Vec<u8> {
    let needs = |b: u8| b < 0x20 || b == b'"' || b == b'\\' || b >= 0x7f;
    if !name.iter().any(|&b| needs(b)) {
        return name.to_vec();
    }
    let mut out = vec![b'"'];
    for &b in name {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            0x07 => out.extend_from_slice(b"\\a"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0b => out.extend_from_slice(b"\\v"),
            0x0c => out.extend_from_slice(b"\\f"),
            b if needs(b) => out.extend_from_slice(format!("\\{b:03o}").as_bytes()),
            b => out.push(b),
        }
    }
    out.push(b'"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(content: &[u8]) -> Option<Version<'_>> {
        Some(Version { mode: MODE_FILE, content })
    }

    fn patch(path: &[u8], old: Option<Version<'_>>, new: Option<Version<'_>>) -> (String, FileStat) {
        let mut out = Vec::new();
        let stat = diff(path, old, new, Some(&mut out));
        (String::from_utf8(out).unwrap(), stat)
    }

    #[test]
    fn an_edit_is_written_and_counted_as_git_does() {
        let (p, stat) = patch(b"src/a.txt", file(b"1\n2\n3\n4\n5\n6\n7\n8\n"), file(b"1\n2\n3\nfour\n5\n6\n7\n8\n9\n"));
        assert_eq!(
            p,
            "diff --git a/src/a.txt b/src/a.txt\n--- a/src/a.txt\n+++ b/src/a.txt\n\
             @@ -1,8 +1,9 @@\n 1\n 2\n 3\n-4\n+four\n 5\n 6\n 7\n 8\n+9\n"
        );
        assert_eq!((stat.added, stat.removed, stat.binary), (2, 1, false));
    }

    #[test]
    fn new_deleted_empty_and_unterminated_files() {
        let (p, stat) = patch(b"n", None, file(b"x\ny"));
        assert_eq!(
            p,
            "diff --git a/n b/n\nnew file mode 100644\n--- /dev/null\n+++ b/n\n@@ -0,0 +1,2 @@\n+x\n+y\n\\ No newline at end of file\n"
        );
        assert_eq!((stat.added, stat.removed), (2, 0));
        let (p, stat) = patch(b"d", file(b"gone\n"), None);
        assert_eq!(p, "diff --git a/d b/d\ndeleted file mode 100644\n--- a/d\n+++ /dev/null\n@@ -1 +0,0 @@\n-gone\n");
        assert_eq!((stat.added, stat.removed), (0, 1));
        let (p, _) = patch(b"e", None, file(b""));
        assert_eq!(p, "diff --git a/e b/e\nnew file mode 100644\n");
    }

    #[test]
    fn modes_symlinks_and_binaries() {
        let exec = Some(Version { mode: MODE_EXEC, content: b"#!/bin/sh\n" });
        let (p, stat) = patch(b"run", file(b"#!/bin/sh\n"), exec);
        assert_eq!(p, "diff --git a/run b/run\nold mode 100644\nnew mode 100755\n");
        assert_eq!((stat.added, stat.removed), (0, 0));
        let link = |t: &'static [u8]| Some(Version { mode: MODE_SYMLINK, content: t });
        let (p, _) = patch(b"l", link(b"old"), link(b"new"));
        assert_eq!(
            p,
            "diff --git a/l b/l\n--- a/l\n+++ b/l\n@@ -1 +1 @@\n-old\n\\ No newline at end of file\n+new\n\\ No newline at end of file\n"
        );
        let (p, stat) = patch(b"l", link(b"t"), file(b"t\n"));
        assert!(p.starts_with("diff --git a/l b/l\ndeleted file mode 120000\n"), "{p}");
        assert!(p.contains("diff --git a/l b/l\nnew file mode 100644\n"), "{p}");
        assert_eq!((stat.added, stat.removed), (1, 1));
        let (p, stat) = patch(b"b", file(b"a\0b"), file(b"a\0c"));
        let id = |c: &[u8]| blake3::hash(c).to_hex()[..7].to_owned();
        let index = format!("index {}..{} 100644\n", id(b"a\0b"), id(b"a\0c"));
        assert_eq!(p, format!("diff --git a/b b/b\n{index}Binary files a/b and b/b differ\n"));
        assert!(stat.binary);
        assert_eq!((stat.added, stat.removed, stat.old_size, stat.new_size), (0, 0, 3, 3));
    }

    #[test]
    fn names_git_would_not_print_are_quoted() {
        assert_eq!(quoted(b"a/plain name"), b"a/plain name");
        assert_eq!(quoted(b"a/caf\xc3\xa9"), b"\"a/caf\\303\\251\"");
        assert_eq!(quoted(b"a/x\"y\\z\tw\x01"), b"\"a/x\\\"y\\\\z\\tw\\001\"");
        let (p, _) = patch(b"\xff", None, file(b"x\n"));
        assert!(p.starts_with("diff --git \"a/\\377\" \"b/\\377\"\n"), "{p}");
        assert!(p.contains("+++ \"b/\\377\"\n"), "{p}");
    }

    #[test]
    fn counting_alone_writes_nothing() {
        let stat = diff(b"x", file(b"a\nb\n"), file(b"a\nc\n"), None);
        assert_eq!((stat.added, stat.removed), (1, 1));
    }
}
