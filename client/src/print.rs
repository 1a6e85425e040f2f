//! How the CLI shows each answer as text (`--json` prints the answer
//! itself).

use snapback::proto::{
    CheckpointInfo, ExportReport, PlanInfo, PruneReport, RollbackReport, SandboxInfo, StatusReport, VerifyReport,
    WirePath,
};
use std::io::Write;

use snapback::utc;

/// `sandbox add`.
pub fn registered(i: &SandboxInfo) {
    outln!("registered {} at {}", i.name, i.path.display());
    outln!("clone method: {}", i.clone_note);
}

/// `sandbox remove`.
pub fn removed(i: &SandboxInfo, purge: bool) {
    if purge {
        outln!("removed {} and deleted its checkpoints", i.name);
    } else {
        outln!("removed {} ({} checkpoints kept; `snapback sandbox add` brings it back)", i.name, i.checkpoints);
    }
}

/// `checkpoint`.
pub fn taken(c: &CheckpointInfo) {
    outln!(
        "{}  checkpoint {} of {}: {} changed, {} files, {}",
        c.id,
        c.seq,
        c.sandbox,
        c.changed,
        c.files,
        human_bytes(c.bytes)
    );
}

/// `prune`.
pub fn pruned(r: &PruneReport) {
    outln!(
        "pruned {} checkpoints of {}, {} kept, {} freed",
        r.pruned.len(),
        r.sandbox,
        r.kept,
        human_bytes(r.freed_bytes)
    );
}

/// `export`.
pub fn exported(r: &ExportReport) {
    outln!(
        "exported {} to {}: {} files ({} cloned), {} directories, {} symlinks",
        r.checkpoint,
        r.dir.display(),
        r.files,
        r.cloned,
        r.dirs,
        r.symlinks
    );
    for (what, notes) in [("withheld", &r.withheld), ("left out", &r.skipped)] {
        if !notes.is_empty() {
            outln!("{what}: {} {}", notes.len(), if notes.len() == 1 { "path" } else { "paths" });
        }
        for n in notes {
            outln!("  {}: {}", n.path.display(), n.why);
        }
    }
}

/// `verify`.
pub fn verified(r: &VerifyReport) {
    outln!(
        "{} objects checked: {} missing, {} corrupt, {} unreferenced",
        r.objects,
        r.missing.len(),
        r.corrupt.len(),
        r.unreferenced.len()
    );
    for (what, list) in [
        ("missing", &r.missing),
        ("corrupt", &r.corrupt),
        ("unreferenced", &r.unreferenced),
        ("marked broken: checkpoint", &r.broken),
    ] {
        for id in list {
            outln!("  {what} {id}");
        }
    }
    for twice in &r.current_twice {
        outln!("  two current versions: {} {}", twice.sandbox, twice.path.display());
    }
}

/// `status`.
pub fn status(s: &StatusReport) {
    outln!("{} (protocol {}), pid {}, up {}s", s.daemon, s.protocol, s.pid, s.uptime_ms / 1000);
    outln!("socket     {}", s.socket.display());
    outln!("state dir  {}", s.state_dir.display());
    if s.collecting_garbage {
        outln!("collecting unreferenced objects in the background");
    }
    if s.hashing_objects {
        outln!("naming cloned objects by their content in the background");
    }
    if s.sandboxes.is_empty() {
        outln!("no sandboxes; register one with `snapback sandbox add DIR`");
        return;
    }
    let rows: Vec<Vec<String>> = s
        .sandboxes
        .iter()
        .map(|b| {
            vec![
                b.name.clone(),
                b.state.clone(),
                b.clone_method.as_str().into(),
                b.checkpoints.to_string(),
                human_bytes(b.store_bytes),
                b.watched_dirs.to_string(),
                b.dirty_paths.to_string(),
                b.last_checkpoint.clone().unwrap_or_else(|| "-".into()),
                b.path.display(),
            ]
        })
        .collect();
    print_table(
        &["SANDBOX", "STATE", "CLONE", "CHECKPOINTS", "STORED", "WATCHED DIRS", "DIRTY", "LAST", "PATH"],
        &rows,
    );
    for b in &s.sandboxes {
        match &b.watcher {
            Some(watcher) => outln!("{}: {} ({watcher})", b.name, b.watch),
            None => outln!("{}: {}", b.name, b.watch),
        }
        if let Some(r) = &b.recovery {
            outln!("{}: {r}", b.name);
        }
    }
    for b in &s.sandboxes {
        if let (Some(budget), Some(exclusive)) = (b.budget_bytes, b.exclusive_bytes) {
            outln!(
                "{}: storage budget {}, using {}; {} checkpoints pruned to fit so far",
                b.name,
                human_bytes(budget),
                human_bytes(exclusive),
                b.budget_pruned
            );
        }
    }
}

pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = std::io::stdout().lock();
    let line = |cells: Vec<String>| {
        let last = cells.len() - 1;
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s
    };
    let _ = writeln!(out, "{}", line(header.iter().map(|h| h.to_string()).collect()));
    for row in rows {
        let _ = writeln!(out, "{}", line(row.clone()));
    }
}

pub fn print_sandboxes(list: &[SandboxInfo]) {
    if list.is_empty() {
        outln!("no sandboxes; register one with `snapback sandbox add DIR`");
        return;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.state.clone(),
                s.clone_method.as_str().into(),
                s.checkpoints.to_string(),
                s.path.display(),
            ]
        })
        .collect();
    print_table(&["NAME", "STATE", "CLONE", "CHECKPOINTS", "PATH"], &rows);
}

pub fn print_checkpoints(list: &[CheckpointInfo]) {
    if list.is_empty() {
        outln!("no checkpoints");
        return;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            vec![
                c.id.clone(),
                c.sandbox.clone(),
                c.seq.to_string(),
                c.kind.as_str().into(),
                utc(c.created_unix_ms),
                c.changed.to_string(),
                c.plan.clone().unwrap_or_else(|| "-".into()),
                c.tool.clone().unwrap_or_else(|| "-".into()),
                c.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(&["ID", "SANDBOX", "SEQ", "KIND", "CREATED (UTC)", "CHANGED", "PLAN", "TOOL", "REASON"], &rows);
}

pub fn print_checkpoint(c: &CheckpointInfo) {
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    outln!("id         {}", c.id);
    outln!("sandbox    {} (checkpoint {})", c.sandbox, c.seq);
    outln!("parent     {}", opt(&c.parent));
    outln!("created    {} UTC", utc(c.created_unix_ms));
    outln!("kind       {}{}", c.kind.as_str(), if c.pinned { ", pinned" } else { "" });
    outln!("plan       {}", opt(&c.plan));
    outln!("tool       {}", opt(&c.tool));
    outln!("phase      {}", opt(&c.phase));
    outln!("reason     {}", opt(&c.reason));
    for (k, v) in &c.labels {
        outln!("label      {k}={v}");
    }
    outln!("files      {} ({}), {} directories, {} symlinks", c.files, human_bytes(c.bytes), c.dirs, c.symlinks);
    outln!("changed    {} paths since its parent", c.changed);
    if let Some(why) = &c.broken {
        outln!("broken     {why}: it cannot be restored");
    }
    if let Some(b) = c.exclusive_bytes {
        outln!("exclusive  {} (what pruning it would free)", human_bytes(b));
    }
}

pub fn print_plan(p: &PlanInfo) {
    outln!("plan {} of {}: {} ({} checkpoints)", p.id, p.sandbox, p.state.as_str(), p.checkpoints.len());
    print_checkpoints(&p.checkpoints);
}

/// Which command a restore report answers, for its human output.
#[derive(Clone, Copy)]
pub enum Restore {
    Rollback,
    Revert,
    Undo,
}

pub fn print_rollback(r: &RollbackReport) {
    print_restore(Restore::Rollback, r)
}

pub fn print_restore(what: Restore, r: &RollbackReport) {
    let (done, would, rest) = match what {
        Restore::Rollback => ("rolled back", "would roll back", format!("{} to {}", r.sandbox, r.checkpoint)),
        Restore::Revert => ("reverted", "would revert", format!("{} in {}", r.checkpoint, r.sandbox)),
        Restore::Undo => (
            "undid the last restore of",
            "would undo the last restore of",
            format!("{}: back to {}", r.sandbox, r.checkpoint),
        ),
    };
    let verb = if r.dry_run { would } else { done };
    outln!(
        "{verb} {rest}: {} restored, {} created, {} deleted, {} unchanged",
        r.restored,
        r.created,
        r.deleted,
        r.unchanged
    );
    let marks = [("+", &r.created_paths), ("~", &r.restored_paths), ("-", &r.removed)];
    let mut lines: Vec<(&WirePath, &str)> =
        marks.iter().flat_map(|(mark, paths)| paths.iter().map(move |p| (p, *mark))).collect();
    lines.sort();
    for (p, mark) in lines {
        outln!("  {mark} {}", p.display());
    }
    for p in &r.skipped {
        outln!("  ! {} (left as it is)", p.display());
    }
    for p in &r.conflicts {
        outln!("  forced over a later change: {}", p.display());
    }
    if r.dry_run && r.preview_total.is_some() {
        outln!("what it would change, as `diff --stat` from the live tree:");
        crate::review::print_stat(&r.preview, r.preview_total.as_ref(), "  ");
    }
    if let Some(safety) = &r.safety_checkpoint {
        if matches!(what, Restore::Undo) && !r.changed.is_empty() {
            outln!(
                "discarded: the live state of {} paths since the restore it undid, kept in {safety}",
                r.changed.len()
            );
        }
        outln!("undo with: snapback rollback {safety}");
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

pub fn set_up(o: &crate::setup::Outcome) {
    let file = o.file.display();
    match (o.changed, o.dry_run) {
        (false, _) => eprintln!("{file}: nothing to change"),
        (true, true) => eprintln!("{file}: the change above would be written (dry run: nothing was)"),
        (true, false) => match &o.backup {
            Some(b) => eprintln!("{file}: written (it was kept as {} before snapback first changed it)", b.display()),
            None => eprintln!("{file}: written"),
        },
    }
    if let Some(next) = &o.next {
        eprintln!("next: {next}");
    }
}
