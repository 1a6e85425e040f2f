//! Many clients at once: 32 threads, 2,000 requests over 8 sandboxes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use snapback::Client;
use snapback::proto::{CheckpointRequest, DiffRequest, ListRequest, RollbackRequest};

use crate::fixture::{TestDaemon, write};
use crate::tree::{Node, assert_same, snapshot};

const SANDBOXES: usize = 8;
const CLIENTS_PER_SANDBOX: usize = 4;
const REQUESTS_PER_CLIENT: usize = 63; // 32 x 63 = 2,016

/// The one client of a sandbox that writes files: checkpoints after each
/// change, rolls back now and then, and checks every rollback against the
/// tree it recorded. Returns the checkpoint its last rollback went to.
fn writer(socket: PathBuf, name: String, root: PathBuf) -> (String, BTreeMap<Vec<u8>, Node>) {
    let mut client = Client::connect(&socket).unwrap();
    let mut recorded: Vec<(String, BTreeMap<Vec<u8>, Node>)> = Vec::new();
    let mut last = None;
    for i in 0..REQUESTS_PER_CLIENT {
        if i % 5 == 4 || i == REQUESTS_PER_CLIENT - 1 {
            let (id, tree) = recorded[(i * 7) % recorded.len()].clone();
            let req = RollbackRequest { checkpoint: id.clone(), paths: vec![], dry_run: false };
            client.rollback(req).unwrap_or_else(|e| panic!("{name}: rollback {i}: {e}"));
            assert_same(&snapshot(&root), &tree, &format!("{name}: after rollback {i}"));
            last = Some((id, tree));
        } else {
            write(&root.join(format!("f{}", i % 10)), format!("{name} step {i}"));
            if i % 3 == 0 {
                write(&root.join(format!("dir{i}/g")), "nested");
            }
            let req = CheckpointRequest { sandbox: name.clone(), pin: true, ..Default::default() };
            let info = client.checkpoint(req).unwrap_or_else(|e| panic!("{name}: checkpoint {i}: {e}"));
            recorded.push((info.id, snapshot(&root)));
        }
    }
    last.expect("the last request is a rollback")
}

/// A client that only reads and checkpoints (which never changes the tree).
/// Its diffs start from `base`, a pinned checkpoint: retention may prune
/// any unpinned one between a list and a diff.
fn reader(socket: PathBuf, name: String, base: String, n: usize) {
    let mut client = Client::connect(&socket).unwrap();
    for i in 0..REQUESTS_PER_CLIENT {
        match (i + n) % 3 {
            0 => {
                let req =
                    CheckpointRequest { sandbox: name.clone(), tool: Some("reader".into()), ..Default::default() };
                client.checkpoint(req).unwrap_or_else(|e| panic!("{name}: checkpoint {i}: {e}"));
            }
            1 => {
                let req = ListRequest { sandbox: Some(name.clone()), plan: None };
                client.list(req).unwrap_or_else(|e| panic!("{name}: list {i}: {e}"));
            }
            _ => {
                let req = DiffRequest { from: base.clone(), ..DiffRequest::default() };
                client.diff(req).unwrap_or_else(|e| panic!("{name}: diff {i}: {e}"));
            }
        }
    }
}

#[test]
fn thirty_two_clients_and_two_thousand_requests_all_answered_and_consistent() {
    let d = TestDaemon::start();
    let mut roots = Vec::new();
    let mut bases = Vec::new();
    for k in 0..SANDBOXES {
        let root = d.path(&format!("sb{k}"));
        write(&root.join("base.txt"), format!("sandbox {k}"));
        d.add_sandbox(&format!("sb{k}"), &root, &[]);
        bases.push(d.json(&["checkpoint", &format!("sb{k}"), "--pin"])["id"].as_str().unwrap().to_owned());
        roots.push(root);
    }
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for (k, root) in roots.iter().enumerate() {
        let name = format!("sb{k}");
        let (socket, root, n) = (d.socket.clone(), root.clone(), name.clone());
        writers.push(std::thread::spawn(move || writer(socket, n, root)));
        for c in 1..CLIENTS_PER_SANDBOX {
            let (socket, n, base) = (d.socket.clone(), name.clone(), bases[k].clone());
            readers.push(std::thread::spawn(move || reader(socket, n, base, c)));
        }
    }
    for r in readers {
        r.join().expect("a reading client failed");
    }
    for (k, w) in writers.into_iter().enumerate() {
        let (id, tree) = w.join().expect("a writing client failed");
        assert_same(&snapshot(&roots[k]), &tree, &format!("sb{k}: the final tree is its last rollback's ({id})"));
    }
    d.assert_verified();
}
