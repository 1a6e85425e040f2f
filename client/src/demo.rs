//! `snapback demo`: a guided run against a private daemon, so a newcomer
//! sees the whole loop (register, checkpoint, edit, diff, roll back) on a
//! fresh machine without installing or configuring anything.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snapback::Client;
use snapback::proto::{CheckpointRequest, DiffDetail, DiffRequest, RollbackRequest, SandboxAdd, WirePath};

use crate::Failure;
use crate::print::print_rollback;

/// A private daemon and its temporary directory, stopped and removed on drop.
struct Private {
    dir: PathBuf,
    daemon: Child,
}

impl Drop for Private {
    fn drop(&mut self) {
        // SAFETY: kill on the pid of a child we started and have not reaped.
        unsafe { libc::kill(self.daemon.id() as i32, libc::SIGTERM) };
        let _ = self.daemon.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fail(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure::Refused(format!("demo: {what}: {e}"))
}

/// Finds `snapbackd` next to this executable, else on `PATH`.
fn daemon_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("snapbackd")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("snapbackd"))
}

fn start() -> Result<(Private, Client), Failure> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("snapback-demo-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| fail("creating a temporary directory", e))?;
    let socket = dir.join("snapbackd.sock");
    let log = std::fs::File::create(dir.join("snapbackd.log")).map_err(|e| fail("creating the log", e))?;
    let binary = daemon_binary();
    let daemon = Command::new(&binary)
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| fail(&format!("starting {}", binary.display()), e))?;
    let mut private = Private { dir, daemon };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(client) = Client::connect(&socket) {
            return Ok((private, client));
        }
        if let Ok(Some(status)) = private.daemon.try_wait() {
            let log = std::fs::read_to_string(private.dir.join("snapbackd.log")).unwrap_or_default();
            return Err(fail("snapbackd exited", format!("{status}\n{log}")));
        }
        if Instant::now() > deadline {
            return Err(fail("snapbackd did not answer within 10 s", socket.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write(path: &Path, text: &str) -> Result<(), Failure> {
    std::fs::write(path, text).map_err(|e| fail(&format!("writing {}", path.display()), e))
}

fn say(json: bool, text: &str) {
    if !json {
        outln!("{text}");
    }
}

pub fn run(json: bool) -> Result<(), Failure> {
    let (private, mut client) = start()?;
    let project = private.dir.join("project");
    std::fs::create_dir_all(project.join("src")).map_err(|e| fail("creating the sandbox", e))?;
    write(&project.join("src/app.py"), "print('hello')\n")?;
    write(&project.join("README.md"), "# demo project\n")?;

    say(json, &format!("A private snapbackd runs in {}.\n", private.dir.display()));
    say(json, "$ snapback sandbox add project");
    let sandbox = client.sandbox_add(SandboxAdd {
        path: WirePath::from(project.as_path()),
        name: Some("project".into()),
        excludes: vec![],
        store: None,
    })?;
    say(json, &format!("registered project ({})\n", sandbox.clone_note));

    say(json, "$ snapback checkpoint project --reason 'before the agent edits'");
    let before = client.checkpoint(CheckpointRequest {
        sandbox: "project".into(),
        reason: Some("before the agent edits".into()),
        ..CheckpointRequest::default()
    })?;
    say(json, &format!("{}  {} files captured\n", before.id, before.files));

    say(json, "The agent now rewrites src/app.py, deletes README.md and adds notes.txt.\n");
    write(&project.join("src/app.py"), "import shutil\nshutil.rmtree('/')  # oops\n")?;
    std::fs::remove_file(project.join("README.md")).map_err(|e| fail("deleting README.md", e))?;
    write(&project.join("notes.txt"), "scratch\n")?;

    say(json, &format!("$ snapback diff {} --stat", before.id));
    let diff =
        client.diff(DiffRequest { from: before.id.clone(), detail: DiffDetail::Stat, ..DiffRequest::default() })?;
    if !json {
        crate::review::print_stat(&diff.changes, diff.total.as_ref(), " ");
        outln!();
    }

    say(json, &format!("$ snapback rollback {}", before.id));
    let rollback = client.rollback(RollbackRequest { checkpoint: before.id.clone(), paths: vec![], dry_run: false })?;
    if !json {
        print_rollback(&rollback);
        outln!();
    }

    let app = std::fs::read_to_string(project.join("src/app.py")).map_err(|e| fail("reading src/app.py", e))?;
    let readme = project.join("README.md").exists();
    let notes = project.join("notes.txt").exists();
    let back = app == "print('hello')\n" && readme && !notes;
    if json {
        let doc = serde_json::json!({
            "checkpoint": before,
            "diff": diff,
            "rollback": rollback,
            "restored_exactly": back,
        });
        outln!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else if back {
        outln!("The sandbox is back as it was: src/app.py restored, README.md recreated, notes.txt removed.");
        outln!("Next: run `snapbackd` yourself and `snapback --help`; see README.md.");
    }
    drop(private);
    if back { Ok(()) } else { Err(fail("the sandbox did not come back as it was", "see above")) }
}
