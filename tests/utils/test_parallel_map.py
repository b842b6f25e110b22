"""utils/crf.parallel_map's process pool: workers start from a known signal state, so the pool
always shuts down. Each case runs in a subprocess: a pool that hangs fails the test by timeout
instead of hanging the test run."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

# An abandoned generator makes parallel_map terminate its pool (SIGTERM to every worker, then
# join): a worker that had inherited an ignored SIGTERM never exited and the join waited forever.
_ABANDON_WITH_SIGTERM_IGNORED = """
import signal, time
from utils.crf import parallel_map

def work(i):
    time.sleep(0.2)
    return i

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as in a loader worker, or a rank that is failing
    results = parallel_map(work, list(range(40)), 2, 1)
    first = next(results)
    results.close()  # abandon it: the pool is terminated, not drained
    print("closed", first in range(40), signal.getsignal(signal.SIGTERM) == signal.SIG_IGN)
"""


def test_a_pool_started_where_sigterm_is_ignored_still_shuts_down():
    r = subprocess.run([sys.executable, "-c", _ABANDON_WITH_SIGTERM_IGNORED], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["closed", "True", "True"]  # and the caller's own disposition is kept
