"""The thread policy: one thread per core other processes leave free (charrnn/threads.py)."""

import pytest
import torch

from charrnn import threads
from charrnn.threads import ThreadPolicy, threads_for


@pytest.fixture
def two_threads(monkeypatch):
    """Two intra-op threads to start from, whatever this machine has; restored afterwards."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class Machine:
    """A fake clock and /proc: ``others`` cores' worth of CPU used by other processes, ``own`` by this one."""

    def __init__(self, others=0.0, own=2.0, runnable=0):
        self.now, self.busy, self.mine = 0.0, 0.0, 0.0
        self.others, self.own, self.runnable = others, own, runnable

    def advance(self, seconds):
        self.now += seconds
        self.busy += (self.others + self.own) * seconds
        self.mine += self.own * seconds

    def policy(self, **kw):
        return ThreadPolicy(clock=lambda: self.now, sample=lambda: (self.busy, self.mine),
                            runnable=lambda: self.runnable, cores=2, **kw)


def test_one_thread_per_core_the_others_leave_free():
    assert threads_for(2, 0.0, 2) == 2
    assert threads_for(2, 0.2, 2) == 2        # a browser's bursts: both cores still ours
    assert threads_for(2, 0.4, 2) == 2        # a server's own clients on the same machine
    assert threads_for(2, 0.67, 2) == 1       # a busy loop sharing the cores with two spinning threads
    assert threads_for(2, 1.0, 2) == 1
    assert threads_for(2, 3.0, 2) == 1        # never none
    assert threads_for(16, 1.0, 8) == 8       # never more than asked for
    assert threads_for(16, 9.6, 16) == 6


def test_a_busy_core_takes_a_thread_away_and_a_freed_one_gives_it_back(two_threads):
    m = Machine()
    with m.policy(interval=0.5) as policy:
        assert policy.enabled and policy.update() == 2
        m.others, m.own = 0.7, 1.3                # another process starts
        m.advance(0.4)
        assert policy.update() == 2               # not yet: decided at most every interval
        m.advance(0.2)
        assert policy.update() == 1 and torch.get_num_threads() == 1
        m.others, m.own = 1.0, 1.0
        m.advance(0.6)
        assert policy.update() == 1               # it keeps its core
        m.others = 0.0                            # and ends
        m.advance(0.6)
        assert policy.update() == 2 and torch.get_num_threads() == 2
        m.others = 1.0
        m.advance(0.6)
        assert policy.update() == 1
    assert torch.get_num_threads() == 2           # leaving restores the threads it started from


def test_it_starts_from_the_threads_runnable_now(two_threads):
    m = Machine(runnable=1)
    with m.policy() as policy:
        assert policy.threads == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_the_users_choice_and_a_machine_without_proc_are_left_alone(two_threads, monkeypatch):
    m = Machine(others=1.0, runnable=1)
    assert not m.policy(on=False).enabled
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    policy = m.policy()
    m.advance(1.0)
    assert not policy.enabled and policy.update() == 2 and torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    policy = ThreadPolicy(sample=lambda: None, runnable=lambda: None)
    assert not policy.enabled and policy.update() == 2


def test_proc_is_read_where_it_exists():
    sample = threads.cpu_seconds()
    if sample is None:
        pytest.skip("no /proc/stat here")
    busy, own = sample
    assert busy > 0 and own > 0
    assert threads.runnable_others() >= 0


def test_a_server_leaves_its_threads_to_the_engine_worker(two_threads):
    """`charrnn serve`: the main thread runs on one thread from before it loads the model, and the engine's worker
    thread, which steps the model, on the threads the process had (one OpenMP pool in the process)."""
    import asyncio

    from charrnn.models import CharLM, ModelConfig
    from charrnn.sampling import Sampler
    from charrnn.serve.engine import Engine, Job
    from charrnn.threads import leave_to_worker
    from charrnn.vocab import Vocab

    threads = leave_to_worker()
    try:
        assert threads == 2 and torch.get_num_threads() == 1
        vocab = Vocab(list("\n abc"))
        sampler = Sampler(CharLM(ModelConfig(vocab_size=len(vocab), embed=4, hidden=8)), vocab)

        async def run():
            engine = Engine(sampler, threads=threads)
            await engine.start()
            try:
                job = engine.submit(Job("ab", 20, seed=1))
                await asyncio.wait_for(job.done.wait(), 30)
                return job, engine._threads.most       # the worker's own, the most its policy may use
            finally:
                await engine.stop()

        job, worker = asyncio.run(run())
        assert len(job.texts[0]) == 20 and worker == 2
        assert torch.get_num_threads() == 1            # the main thread's own stays one
    finally:
        torch.set_num_threads(2)
