//! The daemon's modules in layers: each may use modules of its own layer
//! or below, never above, and no two modules use each other, however
//! indirectly. `docs/architecture.md` ("Layers") says why; this test reads
//! every `crate::` path outside comments in `daemon/src` and fails on an
//! import that climbs or closes a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers, lowest first.
const LAYERS: &[(&str, &[&str])] = &[
    ("leaves", &["sys", "error", "manifest", "links", "wal", "progress", "parts", "patch", "hooks", "systemd"]),
    ("storage", &["store", "catalogue", "retention", "config"]),
    ("work", &["capture", "restore", "export", "watcher", "fanotify", "access"]),
    ("engine", &["engine"]),
    ("server", &["server"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, modules)| modules.contains(&module))
}

/// The module a source file belongs to (`engine/checkpoint.rs`: engine).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_owned()
}

/// The modules `text` names as `crate::x`, outside comments.
fn uses(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module graph of `daemon/src`: who uses whom.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let module = module_of(&src, &file);
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let used = uses(&text).into_iter().filter(|m| *m != module).collect::<BTreeSet<_>>();
        graph.entry(module).or_default().extend(used);
    }
    graph
}

#[test]
fn every_module_has_a_layer() {
    let unplaced: Vec<String> = graph().into_keys().filter(|m| layer_of(m).is_none()).collect();
    assert!(unplaced.is_empty(), "modules in no layer (add them to LAYERS and to docs/architecture.md): {unplaced:?}");
}

#[test]
fn no_import_climbs_a_layer() {
    let mut climbing = Vec::new();
    for (module, used) in graph() {
        let Some(own) = layer_of(&module) else { continue };
        for u in used {
            if let Some(theirs) = layer_of(&u)
                && theirs > own
            {
                climbing.push(format!("{module} ({}) uses {u} ({})", LAYERS[own].0, LAYERS[theirs].0));
            }
        }
    }
    assert!(climbing.is_empty(), "imports that climb a layer:\n{}", climbing.join("\n"));
}

#[test]
fn no_modules_use_each_other() {
    let graph = graph();
    // Depth-first, three colours: a grey module met again closes a circle.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        colour: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match colour.get(m) {
            Some(1) => {
                let from = path.iter().position(|p| p == m).unwrap_or(0);
                let mut circle = path[from..].to_vec();
                circle.push(m.to_owned());
                return Some(circle);
            }
            Some(2) => return None,
            _ => {}
        }
        colour.insert(m.to_owned(), 1);
        path.push(m.to_owned());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, colour, path) {
                return Some(circle);
            }
        }
        path.pop();
        colour.insert(m.to_owned(), 2);
        None
    }
    let mut colour = BTreeMap::new();
    for m in graph.keys() {
        if let Some(circle) = visit(m, &graph, &mut colour, &mut Vec::new()) {
            panic!("modules that use each other: {}", circle.join(" -> "));
        }
    }
}

#[test]
fn the_check_sees_a_climbing_import() {
    // The reader the checks rest on finds a use in code, not in comments.
    let text = "use crate::engine::Engine;\n// crate::server in a comment\nfn f() { crate::store::x(); }";
    assert_eq!(uses(text), BTreeSet::from(["engine".to_owned(), "store".to_owned()]));
}
