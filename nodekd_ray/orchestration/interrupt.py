"""Ctrl-C during a sweep: one handler for the whole sweep (CtrlC), a watch that tells whether a SIGINT arrived
inside Tune's fit() (SigintWatch), and an exit that skips Ray's exit-time shutdown (exit_now)."""
from __future__ import annotations

import os
import signal
import sys
import threading




class SweepInterrupted(KeyboardInterrupt):
    pass


class CtrlC:
    """A SIGINT handler for a whole sweep that remembers a Ctrl-C as well as raising KeyboardInterrupt
    where it lands, so that the sweep stops at its next step even when the KeyboardInterrupt is
    swallowed where it was raised.

    It can be: a Ctrl-C sent while the local Ray instance started (2.9 s after the sweep took its
    lock, 2 CPUs) was lost in about 1 of 20 tries, and the sweep ran to the end with exit 0
    (tests/test_integrity_sweep.py::test_ctrl_c_while_starting_is_one_line_and_releases_the_lock
    failed so on 2026-12-01). Python's own handler was installed throughout; the KeyboardInterrupt
    it raised did not reach the sweep.

    The handler is installed also where the sweep started with SIGINT ignored (a job that a script
    put in the background with `&` inherits that), as Tune's fit() does: `kill -INT` stops a sweep
    the same way wherever it runs.

    Where Python swallows the KeyboardInterrupt (it landed in a finalizer or a weakref callback), it
    prints "Exception ignored in ..." and a traceback; the sweep's hook for those drops them, as the
    Ctrl-C is remembered here and ends the sweep in one line (a fresh-clone CI run printed one while
    the local Ray instance started: "File "<string>", line 0 ... in _on_sigint"). Every other
    unraisable exception goes to the hook that was there before.
    """

    def __init__(self):
        self.seen = False
        self._main = threading.current_thread() is threading.main_thread()   # signal handlers: main thread only
        self._before = None
        self._hook_before = None

    def _on_sigint(self, sig, frame):
        self.seen = True
        raise KeyboardInterrupt

    def _unraisable(self, unraisable):
        if self.seen and isinstance(unraisable.exc_value, KeyboardInterrupt):
            return
        (self._hook_before or sys.__unraisablehook__)(unraisable)

    def __enter__(self):
        if self._main:
            self._before = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._on_sigint)
            self._hook_before, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def __exit__(self, *exc):
        if self._main:
            signal.signal(signal.SIGINT, self._before if self._before is not None else signal.default_int_handler)
            sys.unraisablehook = self._hook_before
        return False

    def check(self) -> None:
        """Raises SweepInterrupted if a Ctrl-C arrived, whether or not its KeyboardInterrupt got through."""
        if self.seen:
            raise SweepInterrupted()


def exit_now(rc: int) -> None:
    """Ends a sweep script that was interrupted, once its one-line message is printed and its lock
    released, without Ray's exit-time shutdown: after a Ctrl-C that shutdown can crash with SIGSEGV
    in the core worker's disconnect (ray-project/ray#51527; seen once in CI, rc -11 after the right
    message). The processes of a local instance die with this one (Ray starts them fate-sharing);
    Tune has already saved the experiment state when the interrupt reaches the script."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


class SigintWatch:
    """Tells whether a Ctrl-C (SIGINT) arrived during ``tuner.fit()``, and leaves the SIGINT handler
    as it found it.

    Tune's fit() installs its own SIGINT handler (ray/tune/tune.py, _setup_signal_catching): on the
    first SIGINT it stops the experiment, saves its state, puts the handler it found back, and
    returns normally; the trials it was running can come back as errors of any kind, so the
    results alone cannot tell an interrupted stage from a failed trial. When no SIGINT arrives,
    Tune leaves its handler installed after fit(), and a Ctrl-C in a later stage (the attacks)
    would only set the finished experiment's flag. This watch installs a handler of its own before
    fit(): if Tune put it back, a SIGINT arrived. Where Tune installs none (not the main thread,
    TUNE_DISABLE_SIGINT_HANDLER=1), the watch's handler is called itself and raises
    KeyboardInterrupt, Python's default.
    """

    def __init__(self):
        self.seen = False
        self._main = threading.current_thread() is threading.main_thread()
        self._tune_catches = self._main and not int(os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0"))
        self._before = None
        self._handler = self._on_sigint  # one object, compared by identity in __exit__

    def _on_sigint(self, sig, frame):
        self.seen = True
        raise KeyboardInterrupt

    def __enter__(self):
        if self._main:
            self._before = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._main:
            if self._tune_catches and signal.getsignal(signal.SIGINT) is self._handler:
                self.seen = True
            before = self._before if self._before is not None else signal.default_int_handler
            signal.signal(signal.SIGINT, before)  # None: a handler not set from Python
        return False
