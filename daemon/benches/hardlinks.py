#!/usr/bin/env python3
"""What files with other names cost a watched checkpoint.

Every file whose inode has more than one name is compared at every
checkpoint (a write through another name, perhaps outside the sandbox,
sends no event for this one). This starts a release snapbackd in a
temporary directory, registers two sandboxes of N files in 100
directories, one of plain files and one whose files are hardlinks of files
outside it (as a package manager's store makes them), and times 45
checkpoints of each after a one-file change, interleaved in three rounds.

    cargo build --release -p snapback-daemon
    python3 daemon/benches/hardlinks.py [N]      # N defaults to 10000

It prints the median, 10th and 90th percentile of each. docs/benchmarks.md
has the figures of a run.
"""

import os
import shutil
import statistics
import sys
import tempfile
import time

import bench_daemon


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    top = tempfile.mkdtemp(prefix="snapback-hardlinks-")
    daemon, client = bench_daemon.start(top)
    try:
        for name, linked in (("plain", False), ("linked", True)):
            root = os.path.join(top, name)
            outside = os.path.join(top, name + "-outside")
            os.makedirs(outside)
            for i in range(n):
                sub = os.path.join(root, "d%02d" % (i % 100))
                os.makedirs(sub, exist_ok=True)
                path = os.path.join(sub, "f%06d" % i)
                if linked:
                    with open(os.path.join(outside, "f%06d" % i), "w") as f:
                        f.write("x%d" % i)
                    os.link(os.path.join(outside, "f%06d" % i), path)
                else:
                    with open(path, "w") as f:
                        f.write("x%d" % i)
            client.sandbox_add(root, name=name)
            client.checkpoint(name)  # the first compares everything
            client.checkpoint(name)
        times = {"plain": [], "linked": []}
        for round_ in range(3):
            for name in times:
                for i in range(15):
                    with open(os.path.join(top, name, "d00", "f000000"), "w") as f:
                        f.write("change %d %d" % (round_, i))
                    start = time.perf_counter()
                    answer = client.checkpoint(name)
                    times[name].append((time.perf_counter() - start) * 1000)
                    assert answer["full_scan"] is False, answer
        for name, ts in times.items():
            ts.sort()
            print("%-7s %d files: median %.2f ms, p10 %.2f, p90 %.2f (n=%d)" % (
                name, n, statistics.median(ts), ts[len(ts) // 10], ts[len(ts) * 9 // 10], len(ts)))
        client.close()
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(top)


if __name__ == "__main__":
    main()
