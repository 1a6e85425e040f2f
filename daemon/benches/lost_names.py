#!/usr/bin/env python3
"""What a name lost between two checkpoints costs a watched checkpoint.

A file written through a name that is gone by the next checkpoint (a
temporary file removed, a hardlink made and removed) may live on under a
name that got no event. With fanotify the daemon opens the file by the
handle its events carried and reads only its recorded names, if any; with
inotify, which names only paths, the checkpoint compares the whole tree.
This starts a release snapbackd in a temporary directory once with each
watcher, registers a sandbox of N files in 100 directories, and times 15
checkpoints after each of: a one-file change; a temporary file written
and removed; a file written through a link made and removed; interleaved
in three rounds.

    cargo build --release -p snapback-daemon
    sudo python3 daemon/benches/lost_names.py [N]   # N defaults to 100000

fanotify needs root; without it only inotify is measured. It prints the
median, 10th and 90th percentile of each, and how many of the checkpoints
compared everything. docs/benchmarks.md has the figures of a run.
"""

import os
import shutil
import statistics
import sys
import tempfile
import time

import bench_daemon


def one_file(root, step):
    with open(os.path.join(root, "d00", "f000000"), "w") as f:
        f.write("change %d" % step)


def temporary(root, step):
    tmp = os.path.join(root, "d01", "scratch")
    with open(tmp, "w") as f:
        f.write("for a moment %d" % step)
    os.remove(tmp)


def through_a_link(root, step):
    link = os.path.join(root, "d02", "link")
    os.link(os.path.join(root, "d02", "f000002"), link)
    with open(link, "w") as f:
        f.write("through a link %d" % step)
    os.remove(link)


def measure(watcher, n):
    top = tempfile.mkdtemp(prefix="snapback-lost-names-")
    daemon, client = bench_daemon.start(top, 'watcher = "%s"\n' % watcher)
    try:
        root = os.path.join(top, "sb")
        for i in range(n):
            sub = os.path.join(root, "d%02d" % (i % 100))
            os.makedirs(sub, exist_ok=True)
            with open(os.path.join(sub, "f%06d" % i), "w") as f:
                f.write("x%d" % i)
        client.sandbox_add(root, name="sb")
        client.checkpoint("sb")  # the first compares everything
        client.checkpoint("sb")
        kinds = {"one file changed": one_file, "a temporary file": temporary, "through a link": through_a_link}
        times = {kind: [] for kind in kinds}
        full = {kind: 0 for kind in kinds}
        step = 0
        for _ in range(3):
            for kind, change in kinds.items():
                for _ in range(15):
                    step += 1
                    change(root, step)
                    start = time.perf_counter()
                    answer = client.checkpoint("sb")
                    times[kind].append((time.perf_counter() - start) * 1000)
                    full[kind] += bool(answer["full_scan"])
        for kind, ts in times.items():
            ts.sort()
            print("%-8s %-17s %d files: median %.2f ms, p10 %.2f, p90 %.2f, %d of %d compared everything" % (
                watcher, kind, n, statistics.median(ts), ts[len(ts) // 10], ts[len(ts) * 9 // 10],
                full[kind], len(ts)))
        client.close()
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(top)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
    for watcher in ["fanotify", "inotify"] if os.geteuid() == 0 else ["inotify"]:
        measure(watcher, n)


if __name__ == "__main__":
    main()
