//! Hardlinks: which names of a recorded state are one file, and which
//! paths a restore must write again so that they come back as one file.
//!
//! A version records the inode number and link count its path had when it
//! was last compared. Files of one state with the same inode number, more
//! than one link and the same recorded content and metadata are names of
//! one file (a link group). The capture makes a new version, not a new key,
//! when a multi-link path's inode changes, and a version keeps the most
//! links it had, so a past state's groups stay as that state had them when
//! their other names are gone. Two such files with equal content, mode, owner
//! and mtime could in theory be distinct inodes that reused a number
//! between two scans; restoring them as one file keeps every byte and
//! mode, and loses nothing but that distinction.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::error::Result;
use crate::manifest::{Manifest, ObjectId, Row, has_other_names};

/// What makes two names one file in a recorded state.
type GroupKey = (u64, Option<ObjectId>, u32, u32, u32, u64, i64);

fn group_key(row: &Row) -> Option<GroupKey> {
    let m = &row.meta;
    has_other_names(m, &row.key).then_some((row.key.ino, m.object, m.mode, m.uid, m.gid, m.size, m.mtime_ns))
}

/// The link groups among `rows`: names of one file, two or more, sorted.
pub fn groups<'a>(rows: impl IntoIterator<Item = (&'a Box<[u8]>, &'a Row)>) -> Vec<Vec<Vec<u8>>> {
    let mut by_key: HashMap<GroupKey, Vec<Vec<u8>>> = HashMap::new();
    for (path, row) in rows {
        if let Some(key) = group_key(row) {
            by_key.entry(key).or_default().push(path.to_vec());
        }
    }
    let mut out: Vec<Vec<Vec<u8>>> = by_key.into_values().filter(|g| g.len() > 1).collect();
    for g in &mut out {
        g.sort();
    }
    out.sort();
    out
}

/// The versions of one state with more than one link, by inode number.
pub trait Linked {
    /// Versions recorded with inode `ino` and more than one link: at the
    /// restore's target (`live` false) or in the live state (`live` true).
    fn linked(&self, live: bool, ino: u64) -> Result<Manifest>;
}

/// Both states held in memory.
pub struct InMemory {
    by_ino: [HashMap<u64, Manifest>; 2],
}

impl InMemory {
    pub fn new(target: &Manifest, live: &Manifest) -> InMemory {
        let index = |m: &Manifest| {
            let mut by: HashMap<u64, Manifest> = HashMap::new();
            for (p, r) in m.iter().filter(|(_, r)| has_other_names(&r.meta, &r.key)) {
                by.entry(r.key.ino).or_default().insert(p.clone(), r.clone());
            }
            by
        };
        InMemory { by_ino: [index(target), index(live)] }
    }
}

impl Linked for InMemory {
    fn linked(&self, live: bool, ino: u64) -> Result<Manifest> {
        Ok(self.by_ino[live as usize].get(&ino).cloned().unwrap_or_default())
    }
}

/// Which paths a restore may write again for their links alone.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Reach {
    /// Any name of a group: a path outside the difference has one version
    /// in both states (a rollback or an undo).
    Groups,
    /// Only the paths of the difference, and a group comes back as far as
    /// they go (a revert, which leaves alone what its step did not change).
    Difference,
}

/// Widens the two sides of a restore's difference (`target`: the target's
/// versions of the paths that differ, `live`: their live versions) with the
/// paths whose link groups differ between the two states, and returns
/// those paths: a restore writes them again even where their own version
/// holds, so that names of one target file end as one file, and names of
/// one live file that the target holds apart end apart. `reach` says
/// which paths may be written again so (see [`Reach`]).
pub fn relink(
    linked: &impl Linked,
    target: &mut Manifest,
    live: &mut Manifest,
    reach: Reach,
) -> Result<BTreeSet<Vec<u8>>> {
    let inos = |m: &Manifest| -> BTreeSet<u64> {
        m.values().filter(|r| has_other_names(&r.meta, &r.key)).map(|r| r.key.ino).collect()
    };
    let (target_inos, live_inos) = (inos(target), inos(live));
    let mut forced = BTreeSet::new();
    if target_inos.is_empty() && live_inos.is_empty() {
        // No name of the difference has others: the common case, at no cost.
        return Ok(forced);
    }
    let differing: HashSet<Box<[u8]>> = target.keys().chain(live.keys()).cloned().collect();
    for (from_live, inos) in [(false, target_inos), (true, live_inos)] {
        for ino in inos {
            let rows = linked.linked(from_live, ino)?;
            for group in groups(&rows) {
                // This side's versions of the group, and the other side's.
                let (this, other) = if from_live { (&*live, &*target) } else { (&*target, &*live) };
                let other_of = |p: &[u8]| -> Option<Row> {
                    if differing.contains(p) {
                        other.get(p).cloned()
                    } else {
                        rows.get(p).or_else(|| this.get(p)).cloned()
                    }
                };
                let pairs: Vec<(Vec<u8>, Row, Option<Row>)> =
                    group.iter().map(|p| (p.clone(), rows[p.as_slice()].clone(), other_of(p))).collect();
                if holds(linked, !from_live, &pairs)? {
                    continue;
                }
                for (path, here, there) in pairs {
                    let same = there.as_ref().is_some_and(|t| t.meta == here.meta);
                    if !(differing.contains(path.as_slice()) || (reach == Reach::Groups && same)) {
                        continue;
                    }
                    let (t, l) = if from_live { (there, Some(here)) } else { (Some(here), there) };
                    if let Some(t) = t {
                        target.insert(path[..].into(), t);
                    }
                    if let Some(l) = l {
                        live.insert(path[..].into(), l);
                    }
                    forced.insert(path);
                }
            }
        }
    }
    Ok(forced)
}

/// Whether the names of a group of one state (`pairs`: path, its version
/// there, its version in the other state) are one file, and the whole of
/// it, in the other state (`other_live`: which state that is).
fn holds(linked: &impl Linked, other_live: bool, pairs: &[(Vec<u8>, Row, Option<Row>)]) -> Result<bool> {
    let mut ino = None;
    for (_, here, there) in pairs {
        let Some(there) = there else { return Ok(false) };
        if there.meta != here.meta || there.key.nlink < 2 || ino.is_some_and(|i| i != there.key.ino) {
            return Ok(false);
        }
        ino = Some(there.key.ino);
    }
    let Some(ino) = ino else { return Ok(false) };
    let rows = linked.linked(other_live, ino)?;
    let first = &pairs[0].0;
    let theirs = groups(&rows).into_iter().find(|g| g.contains(first)).unwrap_or_default();
    Ok(theirs.len() == pairs.len() && pairs.iter().all(|(p, ..)| theirs.contains(p)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Kind, Meta, StatKey};

    fn file(ino: u64, nlink: u32, content: u8) -> Row {
        let meta = Meta {
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 1,
            mtime_ns: 7,
            target: None,
            object: Some(ObjectId([content; 32])),
        };
        Row { id: 0, meta, key: StatKey { ctime_ns: 0, ino, racy: false, nlink } }
    }

    fn state(rows: &[(&str, Row)]) -> Manifest {
        rows.iter().map(|(p, r)| (p.as_bytes().into(), r.clone())).collect()
    }

    fn paths(set: &BTreeSet<Vec<u8>>) -> Vec<&str> {
        set.iter().map(|p| std::str::from_utf8(p).unwrap()).collect()
    }

    /// Runs [`relink`] on the whole of two states, as a dry run does.
    fn relink_states(target: &Manifest, live: &Manifest) -> (Vec<String>, Manifest, Manifest) {
        let differ = |a: &Manifest, b: &Manifest| -> Manifest {
            a.iter()
                .filter(|(p, r)| b.get(*p).is_none_or(|o| o.meta != r.meta || o.key != r.key))
                .map(|(p, r)| (p.clone(), r.clone()))
                .collect()
        };
        let (mut t, mut l) = (differ(target, live), differ(live, target));
        let forced = relink(&InMemory::new(target, live), &mut t, &mut l, Reach::Groups).unwrap();
        (paths(&forced).into_iter().map(String::from).collect(), t, l)
    }

    #[test]
    fn names_of_one_file_are_grouped_by_inode_and_content() {
        let s = state(&[("a", file(5, 2, 1)), ("b", file(5, 2, 1)), ("c", file(5, 2, 2)), ("d", file(6, 1, 1))]);
        assert_eq!(groups(&s), vec![vec![b"a".to_vec(), b"b".to_vec()]]);
    }

    #[test]
    fn a_group_broken_live_is_written_again_whole() {
        // a and b were one file; b was then replaced by an equal copy.
        let target = state(&[("a", file(5, 2, 1)), ("b", file(5, 2, 1))]);
        let live = state(&[("a", file(5, 1, 1)), ("b", file(9, 1, 1))]);
        let (forced, t, l) = relink_states(&target, &live);
        assert_eq!(forced, ["a", "b"]);
        assert_eq!((t.len(), l.len()), (2, 2));
    }

    #[test]
    fn a_group_that_holds_under_other_numbers_is_left_alone() {
        // Restored once already: one file still, with a new inode.
        let target = state(&[("a", file(5, 2, 1)), ("b", file(5, 2, 1))]);
        let live = state(&[("a", file(8, 2, 1)), ("b", file(8, 2, 1))]);
        assert!(relink_states(&target, &live).0.is_empty());
    }

    #[test]
    fn names_joined_live_are_parted() {
        let target = state(&[("a", file(5, 1, 1)), ("b", file(6, 1, 1))]);
        let live = state(&[("a", file(6, 2, 1)), ("b", file(6, 2, 1))]);
        assert_eq!(relink_states(&target, &live).0, ["a", "b"]);
    }

    #[test]
    fn a_live_group_larger_than_the_target_one_is_rebuilt() {
        let target = state(&[("a", file(5, 2, 1)), ("b", file(5, 2, 1)), ("c", file(7, 1, 1))]);
        let live = state(&[("a", file(5, 3, 1)), ("b", file(5, 3, 1)), ("c", file(5, 3, 1))]);
        assert_eq!(relink_states(&target, &live).0, ["a", "b", "c"]);
    }

    #[test]
    fn a_revert_writes_again_only_the_paths_of_its_step() {
        // a, b and c were one file; the step replaced a and b; c is
        // outside the revert's difference and stays as it is.
        let target = state(&[("a", file(5, 3, 1)), ("b", file(5, 3, 1)), ("c", file(5, 3, 1))]);
        let live = state(&[("a", file(8, 1, 2)), ("b", file(9, 1, 2)), ("c", file(5, 1, 1))]);
        let mut t = state(&[("a", file(5, 3, 1)), ("b", file(5, 3, 1))]);
        let mut l = state(&[("a", file(8, 1, 2)), ("b", file(9, 1, 2))]);
        let forced = relink(&InMemory::new(&target, &live), &mut t, &mut l, Reach::Difference).unwrap();
        assert_eq!(paths(&forced), ["a", "b"]);
        assert_eq!(t.keys().map(|p| &p[..]).collect::<Vec<_>>(), [b"a", b"b"]);
    }
}
