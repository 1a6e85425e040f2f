"""The Python client against a real snapbackd.

Each test class starts the daemon named by $SNAPBACKD (the `snapbackd`
binary; `cargo test --workspace` sets it) on a private socket and state
directory, and stops it at the end.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import snapback  # noqa: E402

DAEMON = os.environ.get("SNAPBACKD")


@unittest.skipUnless(DAEMON, "set SNAPBACKD to the snapbackd binary to run these tests")
class AgainstTheDaemon(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="snapback-py-")
        cls.socket = os.path.join(cls.dir, "run", "snapbackd.sock")
        env = dict(os.environ, SNAPBACK_LOG="warn", HOME="/nonexistent")
        cls.daemon = subprocess.Popen(
            [DAEMON, "--socket", cls.socket, "--state-dir", os.path.join(cls.dir, "state")],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                snapback.connect(cls.socket).close()
                break
            except snapback.DaemonUnreachable:
                if cls.daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("snapbackd did not start: %s" % cls.daemon.stderr.read())
                time.sleep(0.01)

    @classmethod
    def tearDownClass(cls):
        cls.daemon.send_signal(signal.SIGTERM)
        cls.daemon.wait(timeout=30)
        cls.daemon.stderr.close()
        shutil.rmtree(cls.dir)

    def setUp(self):
        self.client = snapback.connect(self.socket, timeout=60)
        self.root = tempfile.mkdtemp(prefix="sb-", dir=self.dir)
        self.name = os.path.basename(self.root)
        self.client.sandbox_add(self.root, name=self.name)

    def tearDown(self):
        self.client.close()

    def write(self, rel, data):
        path = os.path.join(os.fsencode(self.root), os.fsencode(rel))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def read(self, rel):
        with open(os.path.join(os.fsencode(self.root), os.fsencode(rel)), "rb") as f:
            return f.read()

    def test_checkpoint_edit_rollback_round_trip_with_a_non_utf8_name(self):
        odd = b"caf\xe9.txt"  # Latin-1, not UTF-8
        self.write("src/app.py", b"print('v1')\n")
        self.write(odd, b"bytes name")
        cp = self.client.checkpoint(self.name, reason="before edit", tool="Edit", phase="pre")
        self.assertEqual(cp["files"], 2)
        self.assertEqual(cp["tool"], "Edit")

        self.write("src/app.py", b"print('v2')\n")
        os.remove(os.path.join(os.fsencode(self.root), odd))
        self.write("new.txt", b"new")

        diff = self.client.diff(cp["id"])
        changes = {snapback.path_bytes(c["path"]): c["change"] for c in diff["changes"]}
        self.assertEqual(changes, {b"src/app.py": "modified", odd: "deleted", b"new.txt": "added"})

        report = self.client.rollback(cp["id"])
        self.assertEqual((report["restored"], report["created"], report["deleted"]), (1, 1, 1))
        changed = sorted(snapback.path_bytes(p) for p in report["changed"])
        self.assertEqual(changed, sorted([b"src/app.py", odd, b"new.txt"]))
        self.assertEqual(self.read("src/app.py"), b"print('v1')\n")
        self.assertEqual(self.read(odd), b"bytes name")
        self.assertFalse(os.path.exists(os.path.join(self.root, "new.txt")))

    def test_list_filters_by_plan_and_an_applied_plan_is_never_rolled_back(self):
        self.write("a.txt", b"1")
        step1 = self.client.checkpoint(self.name, plan="plan-py", tool="Write", phase="pre")
        self.write("a.txt", b"2")
        self.client.checkpoint(self.name, plan="plan-py", tool="Write", phase="post")
        self.client.checkpoint(self.name)  # no plan
        in_plan = self.client.list(sandbox=self.name, plan="plan-py")
        self.assertEqual([c["phase"] for c in in_plan], ["pre", "post"])
        self.assertEqual(len(self.client.list(sandbox=self.name)), 3)

        applied = self.client.plan_apply("plan-py")
        self.assertEqual(applied["state"], "applied")
        with self.assertRaises(snapback.SnapbackError) as refused:
            self.client.plan_rollback("plan-py", step1["id"])
        self.assertEqual(refused.exception.code, "plan_applied")
        self.assertEqual(self.read("a.txt"), b"2", "a refused rollback touches nothing")

    def test_errors_carry_the_protocol_code(self):
        with self.assertRaises(snapback.SnapbackError) as missing:
            self.client.show("0000000000000000000000000Z")
        self.assertEqual(missing.exception.code, "not_found")
        with self.assertRaises(snapback.SnapbackError) as bad:
            self.client.checkpoint("no-such-sandbox")
        self.assertEqual(bad.exception.code, "not_found")
        with self.assertRaises(snapback.DaemonUnreachable) as down:
            snapback.connect(os.path.join(self.dir, "nothing.sock"))
        self.assertEqual(down.exception.code, "unreachable")
        # The connection still serves after refusals.
        self.assertIn(self.name, [s["name"] for s in self.client.sandbox_list()])

    def test_a_refused_revert_names_its_paths_and_hints_at_force(self):
        self.write("shared.txt", b"0")
        self.client.checkpoint(self.name)
        self.write("shared.txt", b"1")
        step = self.client.checkpoint(self.name)
        self.write("shared.txt", b"2")
        self.client.checkpoint(self.name)
        with self.assertRaises(snapback.SnapbackError) as refused:
            self.client.revert(step["id"])
        self.assertEqual(refused.exception.code, "conflict")
        self.assertEqual(refused.exception.paths, [b"shared.txt"])
        self.assertIn("--force", refused.exception.hint)
        self.assertEqual(self.read("shared.txt"), b"2")

    def test_a_step_reads_as_a_patch_a_stat_and_a_log_entry(self):
        self.write("notes.txt", b"one\ntwo\n")
        first = self.client.checkpoint(self.name)["id"]
        self.write("notes.txt", b"one\n2\nthree\n")
        second = self.client.checkpoint(self.name, tool="Bash", reason="edit notes")["id"]
        step = self.client.step(second, patch=True)
        self.assertEqual(step["from"], first)
        self.assertIn(b"-two\n+2\n+three\n", step["patch"])
        self.assertEqual(step["total"], {"files": 1, "added": 2, "removed": 1})
        pieces = []
        streamed = self.client.diff(first, second, patch=True, on_patch=pieces.append)
        self.assertEqual(b"".join(pieces), step["patch"])
        self.assertEqual(streamed["total"], step["total"])
        log = self.client.log(self.name, limit=1, stat=True)
        self.assertEqual(log["entries"][0]["checkpoint"]["id"], second)
        self.assertEqual(log["entries"][0]["total"], step["total"])
        self.assertGreaterEqual(log["more"], 1)
        before = self.read("notes.txt")
        dry = self.client.revert(second, dry_run=True)
        self.assertTrue(dry["dry_run"])
        self.assertEqual(self.read("notes.txt"), before)
        self.assertEqual([c["path"] for c in dry["preview"]], [{"text": "notes.txt"}])

    def test_every_other_request_answers(self):
        self.write("a.txt", b"1")
        first = self.client.checkpoint(self.name, plan="plan-other")["id"]
        self.write("a.txt", b"2")
        second = self.client.checkpoint(self.name, plan="plan-other")["id"]
        self.assertEqual(self.client.show(second[:12])["id"], second)
        self.assertEqual(len(self.client.plan_show("plan-other")["checkpoints"]), 2)
        self.assertEqual(self.client.plan_abandon("plan-other")["state"], "abandoned")
        out = os.path.join(self.root + "-export")
        exported = self.client.export(first, out)
        self.assertEqual(exported["files"], 1)
        with open(os.path.join(out, "a.txt"), "rb") as f:
            self.assertEqual(f.read(), b"1")
        pruned = self.client.prune(self.name, keep_last=1)
        self.assertIn(first, pruned["pruned"])
        self.assertTrue(any(s["name"] == self.name for s in self.client.status()["sandboxes"]))
        self.assertEqual(self.client.verify()["missing"], [])
        removed = self.client.sandbox_remove(self.name, purge=True)
        self.assertEqual(removed["name"], self.name)
        self.assertFalse(any(s["name"] == self.name for s in self.client.sandbox_list()))

    def test_an_answer_longer_than_a_line_arrives_whole_or_streamed(self):
        first = self.client.checkpoint(self.name)["id"]
        names = ["many/%s-%05d" % ("x" * 40, i) for i in range(25000)]
        for name in names:
            self.write(name, b"")
        report = self.client.diff(first)
        self.assertEqual(len(report["changes"]), len(names) + 1)  # and the directory
        self.assertGreater(len(repr(report["changes"])), snapback.MAX_LINE)
        self.assertEqual(report["changes"][-1]["path"], {"text": names[-1]})
        seen = []
        streamed = self.client.diff(first, on_change=seen.append)
        self.assertEqual(streamed["changes"], [])
        self.assertEqual(seen, report["changes"])


if __name__ == "__main__":
    unittest.main()
