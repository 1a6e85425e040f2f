//! The `restore` checkpoint that records what a rollback, revert or undo
//! left: made before the answer, written after it, and first by whatever
//! next takes the sandbox's lock.

use super::*;

/// A restore's record, made from the versions its plan wrote and not yet
/// written to the catalogue.
pub(super) struct OwedRecord {
    /// The checkpoint's id, given in the restore's answer.
    id: String,
    /// The seq of the checkpoint it follows: the restore's safety
    /// checkpoint, the sandbox's head when the restore was done.
    after: u64,
    /// Each path's restored version, or `None` for a path removed.
    desired: Vec<(Vec<u8>, Option<crate::manifest::Meta>)>,
    /// The paths written for their links, with their stat keys as the
    /// restore left them.
    linked: HashMap<Vec<u8>, StatKey>,
    reason: String,
    /// The intent its commit ends, if it is the one to.
    closes: Option<i64>,
}

impl OwedRecord {
    pub(super) fn id(&self) -> &str {
        &self.id
    }

    /// The same record under the id `id` (the one an answer gave it).
    pub(super) fn named(self, id: String) -> OwedRecord {
        OwedRecord { id, ..self }
    }
}

impl Engine {
    /// Writes a restore's record as the sandbox's newest checkpoint; the
    /// caller holds the sandbox's lock. Returns the checkpoint, or `None`
    /// after a failure, which is logged (and ends the intent it was to
    /// end: the restore is done).
    pub(super) fn write_record(
        &self,
        conn: &mut Connection,
        sandbox_id: i64,
        owed: OwedRecord,
    ) -> Option<CheckpointInfo> {
        let closes = owed.closes;
        let started = Instant::now();
        let recorded = (|| {
            let sb = catalogue::sandbox_by_id(conn, sandbox_id)?;
            let OwedRecord { id, after, desired, linked, reason, .. } = owed;
            if sb.head_seq != after {
                return Err(Error::Internal(format!(
                    "the sandbox's newest checkpoint is no longer the one the restore left (seq {after}, now {})",
                    sb.head_seq
                )));
            }
            let mut current = self.take_manifest(conn, &sb)?;
            let (ended, mut added) = restored_versions(&current, desired, &linked);
            // One version to an unhashed object (see `hasher.rs`): a
            // restored version of one takes a clone of its own. Only then is
            // the store's collection lock taken, from the clones until the
            // commit references them.
            let unhashed = |row: &catalogue::NewRow| row.meta.object.is_some_and(|o| o.is_unhashed());
            let store = match added.iter().any(unhashed) {
                true => Some(self.store(&sb.store)?),
                false => None,
            };
            let _storing = store.as_ref().map(|s| s.gc_lock.read().unwrap_or_else(|p| p.into_inner()));
            if let Some(store) = &store {
                for row in &mut added {
                    if let Some(id) = row.meta.object.filter(|o| o.is_unhashed()) {
                        let clone = store.clone_unhashed(&id).ctx(|| format!("cloning the object {id}"))?;
                        row.meta.object = Some(clone);
                    }
                }
            }
            let parent = catalogue::checkpoint_at(conn, sb.id, sb.head_seq)?;
            let info = restore_info(&sb, id, parent, (&ended, &added), reason);
            let ended_ids: Vec<i64> = ended.iter().map(|(_, id, ..)| *id).collect();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let write = CheckpointWrite {
                info: &info,
                sandbox_id: sb.id,
                scan_start_ns: now_ns(),
                ended: &ended_ids,
                added: &added,
                rekeyed: &[],
            };
            let ids = catalogue::write_checkpoint(&tx, &write)?;
            if let Some(intent) = closes {
                // The restore is done: one commit ends its intent too.
                catalogue::finish_intent(&tx, intent)?;
            }
            tx.commit()?;
            let gone = ended.iter().map(|(p, ..)| p.as_slice());
            self.update_shared_names(sb.id, (sb.head_seq, info.seq), gone, &added, &[]);
            for (path, ..) in &ended {
                current.remove(path.as_slice());
            }
            let inserted = added.len();
            for (row, id) in added.into_iter().zip(ids) {
                current.insert(row.path.into(), crate::manifest::Row { id, meta: row.meta, key: row.key });
            }
            self.put_manifest(sb.id, info.seq, current, inserted);
            Ok::<_, Error>(info)
        })();
        match recorded {
            Ok(info) => {
                tracing::debug!(sandbox = %info.sandbox, id = %info.id, ms = ms_since(started), "restore recorded");
                Some(info)
            }
            Err(e) => {
                tracing::warn!(sandbox_id, "recording the restored state: {e}");
                if let Some(intent) = closes
                    && let Err(e) = catalogue::finish_intent(conn, intent)
                {
                    tracing::warn!(intent, "closing a restore intent: {e}");
                }
                None
            }
        }
    }

    /// Leaves a restore's record to write after the answer (see
    /// [`Engine::hold`]): the pruner thread writes it once woken, unless a
    /// request takes the sandbox's lock first. Its intent, if it ends one,
    /// is marked applied first, with the record's id, so that a daemon
    /// stopped before the record is written records it at start (under
    /// that id) rather than apply the plan again.
    /// Outside a request, or when the intent cannot be marked, the record
    /// is written now. The caller holds the sandbox's lock.
    pub(super) fn owe_record(&self, conn: &mut Connection, sandbox_id: i64, owed: OwedRecord) {
        let marked = match owed.closes {
            Some(intent) => catalogue::intent_applied(conn, intent, &owed.id, now_ms())
                .inspect_err(|e| tracing::warn!(intent, "marking a restore intent applied: {e}"))
                .is_ok(),
            None => true,
        };
        if !deferring() || !marked {
            self.write_record(conn, sandbox_id, owed);
            return;
        }
        lock(&self.pruner.owed).records.insert(sandbox_id, Some(owed));
        self.later(Later::WakePruner);
    }

    /// Whether the record of a restore whose intent is `intent` is owed:
    /// then its commit ends the intent.
    pub(super) fn record_owed_for(&self, intent: i64) -> bool {
        lock(&self.pruner.owed).records.values().flatten().any(|o| o.closes == Some(intent))
    }

    /// Locks a sandbox (`guard` is its [`Engine::sandbox_lock`]) for an
    /// operation, and writes the record a restore left owed there first:
    /// whatever holds the lock sees the sandbox's history whole.
    pub(super) fn hold<'g>(&self, sandbox_id: i64, guard: &'g Mutex<()>) -> MutexGuard<'g, ()> {
        let held = lock(guard);
        self.write_owed_record(sandbox_id);
        held
    }

    /// Writes the record owed in a sandbox whose lock the caller holds, if
    /// there is one. It stays listed, empty, until its commit: a request
    /// that looks for records owed meanwhile waits on the lock for it (see
    /// [`Engine::settle_records`]).
    pub(super) fn write_owed_record(&self, sandbox_id: i64) {
        let Some(owed) = lock(&self.pruner.owed).records.get_mut(&sandbox_id).and_then(Option::take) else {
            return;
        };
        self.stop_before_record_hook();
        match self.db() {
            Ok(mut conn) => {
                self.write_record(&mut conn, sandbox_id, owed);
            }
            // Its intent still names it: the next start writes it, unless
            // the sandbox took a checkpoint since.
            Err(e) => tracing::warn!(sandbox_id, "recording the restored state: {e}"),
        }
        lock(&self.pruner.owed).records.remove(&sandbox_id);
    }

    /// Writes every record owed: after this, every restore answered so far
    /// is followed by its `restore` checkpoint. Called with no sandbox lock
    /// held.
    pub(super) fn settle_records(&self) {
        let owed: Vec<i64> = lock(&self.pruner.owed).records.keys().copied().collect();
        for sandbox_id in owed {
            let guard = self.sandbox_lock(sandbox_id);
            let _held = self.hold(sandbox_id, &guard);
        }
    }
}

/// A head version a restore ended: its path, id, kind and size.
type EndedVersion = (Vec<u8>, i64, Kind, u64);

/// Makes the record of the state a restore left (see `record.rs`): the
/// head's versions, with `desired` (each path's restored version, or
/// `None` for a path removed) put in place. So the next checkpoint, and a
/// revert of it, hold the next step only, while `undo` still goes back to
/// the safety checkpoint before the restore. Nothing is read again: the
/// versions are the ones the restore wrote, marked racy, so the next
/// checkpoint reads again any of them that got an event; only names of
/// one file (`linking`) are stat'ed, now, for their inode. A restore that
/// wrote nothing records no checkpoint (`None`). It follows checkpoint
/// `after` (seq), and is written only while that is the newest. `reason`
/// is the checkpoint's, and its commit ends the intent `closes`, if any.
pub(super) fn restored_record<'a>(
    desired: impl Iterator<Item = (&'a [u8], Option<&'a crate::manifest::Meta>)>,
    linking: &std::collections::HashSet<&[u8]>,
    root: std::os::fd::BorrowedFd<'_>,
    after: u64,
    (reason, closes): (String, Option<i64>),
) -> Option<OwedRecord> {
    let desired: Vec<_> = desired.map(|(p, meta)| (p.to_vec(), meta.cloned())).collect();
    if desired.is_empty() {
        return None;
    }
    let linked = desired
        .iter()
        .filter(|(p, _)| linking.contains(p.as_slice()))
        .map(|(p, _)| (p.clone(), restored_key(root, p)))
        .collect();
    Some(OwedRecord { id: ulid::Ulid::new().to_string(), after, desired, linked, reason, closes })
}

/// The versions a restore changed, against the head's (`current`): those
/// it ended and those it wrote (`desired`). Paths that already hold their
/// version are left out, unless written for their links (`linked`, with
/// their stat keys); every other version written is racy, with no inode.
fn restored_versions(
    current: &Manifest,
    desired: Vec<(Vec<u8>, Option<crate::manifest::Meta>)>,
    linked: &HashMap<Vec<u8>, StatKey>,
) -> (Vec<EndedVersion>, Vec<catalogue::NewRow>) {
    let mut ended = Vec::new();
    let mut added = Vec::new();
    for (path, want) in desired {
        let have = current.get(path.as_slice());
        // A path written for its links alone gets a version for its new
        // inode.
        let link_key = linked.get(&path).copied();
        if have.map(|r| &r.meta) == want.as_ref() && link_key.is_none() {
            continue;
        }
        if let Some(r) = have {
            ended.push((path.clone(), r.id, r.meta.kind, r.meta.size));
        }
        if let Some(meta) = want {
            let key = link_key.unwrap_or(UNKNOWN_KEY);
            added.push(catalogue::NewRow { path, meta, key });
        }
    }
    (ended, added)
}

/// The stat key of a version a restore wrote: racy, so the next
/// checkpoint that meets it reads it again (its own writes are events for
/// the watcher).
const UNKNOWN_KEY: StatKey = StatKey { ctime_ns: 0, ino: 0, racy: true, nlink: 1 };

/// The stat key of a name of one file a restore wrote, taken now: it needs
/// its inode, to be found as such.
fn restored_key(root: std::os::fd::BorrowedFd<'_>, path: &[u8]) -> StatKey {
    match sys::lstat_beneath(root, path) {
        Ok(st) => StatKey::of(&st, true),
        Err(_) => UNKNOWN_KEY,
    }
}

/// The record of the `restore` checkpoint after `parent` that ends and
/// adds these versions.
fn restore_info(
    sb: &Sandbox,
    id: String,
    parent: Option<Checkpoint>,
    (ended, added): (&[EndedVersion], &[catalogue::NewRow]),
    reason: String,
) -> CheckpointInfo {
    let counts = Counts::after(
        parent.as_ref(),
        ended.iter().map(|(_, _, kind, size)| (*kind, *size)),
        added.iter().map(|a| (a.meta.kind, a.meta.size)),
    );
    let mut changed: Vec<&[u8]> =
        ended.iter().map(|(p, ..)| p.as_slice()).chain(added.iter().map(|a| a.path.as_slice())).collect();
    changed.sort();
    changed.dedup();
    CheckpointInfo {
        id,
        sandbox: sb.name.clone(),
        seq: sb.head_seq + 1,
        parent: parent.map(|p| p.info.id),
        plan: None,
        reason: Some(reason),
        tool: None,
        phase: None,
        labels: Default::default(),
        kind: CheckpointKind::Restore,
        pinned: false,
        created_unix_ms: now_ns() / 1_000_000,
        files: counts.files,
        dirs: counts.dirs,
        symlinks: counts.symlinks,
        bytes: counts.bytes,
        changed: changed.len() as u64,
        exclusive_bytes: None,
        scanned: None,
        full_scan: None,
        broken: None,
    }
}
