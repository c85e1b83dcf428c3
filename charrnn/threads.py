"""How many threads a work loop's CPU operations use: as many as the cores other processes leave free.

PyTorch splits a CPU operation over a pool of OpenMP threads, one per core, which wait for each other
at the end of every parallel region (spinning, then sleeping).  While another process wants one of the
cores, one of the pool's threads is off its core for whole time slices, and every region of every step
waits for it: a training or sampling step that is many short regions slows down by far more than the
share of the machine it lost (docs/contention.md).  One thread fewer per core another process is using
avoids the waits.

:class:`ThreadPolicy` decides from what the operating system says: the CPU time all processes used
(``/proc/stat``) minus this process's own (:func:`os.times`) over the last ``interval`` seconds, and at
the start the number of runnable threads (``/proc/loadavg``).  Where those files do not exist (not
Linux), or where the user chose the number of threads (``OMP_NUM_THREADS``), it changes nothing.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import torch

# A core counts as taken once other processes used more than this share of it over an interval (below it: a
# browser's or an editor's bursts, or a server's own clients, beside which two threads still beat one:
# docs/contention.md).
TAKEN = 0.5
INTERVAL_S = 0.5


def threads_for(cores: int, others: float, most: int) -> int:
    """The threads to use on ``cores`` cores while other processes use ``others`` cores' worth of CPU: one per
    core they leave free (a core they use less than :data:`TAKEN` of counts as free), between 1 and ``most``."""
    taken = max(0, math.ceil(others - TAKEN))
    return max(1, min(most, cores - taken))


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds all processes have used, of which this process's), or None where ``/proc/stat`` cannot be
    read.  Busy time is the ``cpu`` line's user, nice, system, irq, softirq and steal time."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != b"cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]      # user nice system idle iowait irq softirq steal (guest is in user)
    busy = sum(ticks) - ticks[3] - ticks[4]
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def runnable_others() -> int | None:
    """Threads of other processes runnable right now (``/proc/loadavg``'s running count, less this process's
    running threads: the reading one, and pool threads still spinning), or None where it cannot be read."""
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
    except (OSError, IndexError, ValueError):
        return None
    return max(0, running - max(1, _own_running()))


def _own_running() -> int:
    """This process's threads in state R (running or runnable), from ``/proc/self/task``."""
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/stat", "rb") as f:
                count += f.read().rsplit(b")", 1)[1].split()[0] == b"R"
        except (OSError, IndexError):
            pass
    return count


def leave_to_worker() -> int:
    """From now on this thread runs its PyTorch operations on one thread; the number it had, for the one worker
    thread that will do the process's numeric work (``torch.set_num_threads`` there).

    A server's main thread calls it before it loads the model.  GNU OpenMP (PyTorch's CPU builds) keeps a pool of
    threads for every thread that starts parallel work, and once a process has more of them than cores, it stops
    spin-waiting at the end of each parallel region: a sampling step of many short regions then waits for sleeping
    threads at each one (docs/serving.md).  With the main thread's operations on one thread, the worker's pool is
    the only one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


class ThreadPolicy:
    """Sets this thread's number of intra-op threads (``torch.set_num_threads``) to what :func:`threads_for`
    says, re-deciding at most every ``interval`` seconds: call :meth:`update` between the steps of a work loop,
    in the thread that runs them (OpenMP's thread count is per calling thread).  At most the number set when
    the policy was made; :meth:`restore` (or leaving ``with policy:``) puts that back.  ``on=False``: a policy
    that changes nothing (GPU work)."""

    def __init__(self, interval: float = INTERVAL_S, *, on: bool = True, clock: Callable[[], float] = time.monotonic,
                 sample: Callable[[], tuple[float, float] | None] = cpu_seconds,
                 runnable: Callable[[], int | None] = runnable_others, cores: int | None = None):
        self.interval, self.clock, self.sample = interval, clock, sample
        self.most = torch.get_num_threads()
        self.cores = cores or os.cpu_count() or 1
        self.last = sample()
        self.enabled = on and self.most > 1 and "OMP_NUM_THREADS" not in os.environ and self.last is not None
        self.since = clock()
        self.threads = self.most
        if self.enabled:
            others = runnable()
            if others is not None:
                self._use(threads_for(self.cores, others, self.most))

    def update(self) -> int:
        """Re-decide once ``interval`` seconds have passed since the last decision; the threads in use."""
        if not self.enabled:
            return self.threads
        now = self.clock()
        if now - self.since < self.interval:
            return self.threads
        sample = self.sample()
        if sample is None:
            return self.threads
        (busy0, own0), (busy1, own1) = self.last, sample
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (now - self.since)
        self.last, self.since = sample, now
        self._use(threads_for(self.cores, others, self.most))
        return self.threads

    def _use(self, threads: int) -> None:
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads

    def restore(self) -> None:
        """Back to the number of threads the policy started from."""
        self._use(self.most)

    def __enter__(self) -> ThreadPolicy:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
