"""What Slurm sends before it stops a job, remembered from the training process's start.

Lightning-free: the entry point installs the handlers before it imports torch, so that a
signal during imports or data loading is not fatal and the attempt ends on record.
"""

from __future__ import annotations

# What Slurm sends: the --signal the training rule requests (USR1, 90 s before the time
# limit), and SIGTERM at the time limit, on preemption (PreemptMode=REQUEUE/CANCEL, after
# GraceTime), on `scancel` and `scontrol requeue`; SIGKILL follows SIGTERM after KillWait.
STOP_SIGNALS = ("SIGUSR1", "SIGTERM")


class Preempted(Exception):
    pass


class StopSignals:
    """The signals that mean "save and stop", caught from the start of the process: one that
    arrives before training starts (during imports or data loading) is remembered, and the
    attempt then ends on record instead of dying without a trace."""

    def __init__(self, names=STOP_SIGNALS):
        self.names = tuple(names)
        self.received: str | None = None

    def install(self) -> None:
        import signal

        for name in self.names:
            signal.signal(getattr(signal, name), self._handle)

    @property
    def name(self) -> str:
        return self.received or "a stop signal"

    def _handle(self, signum, _frame) -> None:
        import signal

        self.received = self.received or signal.Signals(signum).name
