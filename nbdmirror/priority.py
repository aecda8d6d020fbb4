"""CPU priority of the proxy's threads.

The job thread copies at a lower priority than the process (job.COPIER_NICE),
so that a copy competing with the guest for CPU leaves the guest more.  The
connections' I/O threads serve guest requests too: they run at the
process's priority.

On Linux each thread has a nice value of its own, and a new thread inherits
its creator's.  Lowering a priority is always allowed; raising one needs
privilege (CAP_SYS_NICE).  So an unprivileged job thread, once nicer, can
neither start a thread at the process's priority nor raise one it started:
it asks a Starter, made before it lowered its own, to start them.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor


def _priority(tid):
    return os.getpriority(os.PRIO_PROCESS, tid)


def nicer(step):
    """Lower the calling thread's priority by `step`; where it cannot, it
    stays as it is."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, _priority(tid) + step))
    except OSError:
        pass


def like_the_process():
    """Raise the calling thread's priority back to the process's, if it
    runs nicer (started by a nicer thread) and may; else it stays as it
    is."""
    try:
        tid = threading.get_native_id()
        nice = _priority(os.getpid())
        if _priority(tid) > nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:
        pass


class Starter:
    """One thread, at the priority of the thread that made the Starter, that
    runs calls for others: what it starts inherits that priority."""

    def __init__(self, name):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._pool.submit(int).result()     # its one thread, made from here

    def call(self, fn):
        """fn() in the Starter's thread; its result, or its exception."""
        return self._pool.submit(fn).result()

    def close(self):
        self._pool.shutdown()
