"""A release snapbackd for the Python benchmarks (hardlinks.py,
lost_names.py): started in a directory of the caller's, with its socket
and state there, and a client connected to it."""

import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "client", "python"))
import snapback  # noqa: E402

DAEMON = os.path.join(HERE, "..", "..", "target", "release", "snapbackd")


def start(top, config=None):
    """Starts snapbackd in `top` (with the configuration text `config`,
    if any) and waits until it answers; returns the process and a client.
    The caller terminates the process."""
    sock = os.path.join(top, "s.sock")
    args = [DAEMON, "--socket", sock, "--state-dir", os.path.join(top, "state")]
    if config is not None:
        path = os.path.join(top, "snapbackd.toml")
        with open(path, "w") as f:
            f.write(config)
        args += ["--config", path]
    daemon = subprocess.Popen(
        args, env=dict(os.environ, SNAPBACK_LOG="warn", HOME="/nonexistent"), stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            return daemon, snapback.connect(sock)
        except snapback.DaemonUnreachable:
            if time.monotonic() > deadline or daemon.poll() is not None:
                daemon.terminate()
                daemon.wait()
                raise
            time.sleep(0.01)
