"""Files a run leaves beside its checkpoints (the manifest, importance scores, probe texts, replay
records), written so that a reader never sees half of one; and a guard that lets a folder written
in a temporary place (``hft half-reset``'s output) be cleaned up when a signal stops the write."""

from __future__ import annotations

import os
from typing import Any


def write_atomic(path: str, text: str) -> str:
    """Write ``text`` to ``path`` through a temporary file in the same folder and one ``os.replace``
    (atomic on POSIX and Windows), creating the folder if needed. Returns ``path``.

        >>> import os, tempfile
        >>> path = write_atomic(os.path.join(tempfile.mkdtemp(), "a", "b.json"), "{}")
        >>> open(path).read()
        '{}'
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


class Interrupted(KeyboardInterrupt):
    """A signal (SIGTERM, SIGHUP) stopped a write that :class:`SignalGuard` guarded (a Half-Reset's
    output); nothing was left behind. A KeyboardInterrupt, so code that stops on Ctrl-C stops on it too."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class SignalGuard:
    """While a folder is written in a temporary place and then renamed into its own (a Half-Reset's
    output): SIGTERM and SIGHUP raise :class:`Interrupted` (SIGINT raises KeyboardInterrupt as
    always), so the writer can remove the temporary folder; a second signal during that clean-up is
    ignored. :meth:`held` holds them back while a few steps must complete together (the rename).
    Only in the main thread, where Python delivers signals."""

    CAUGHT = ("SIGTERM", "SIGHUP")
    HELD = ("SIGTERM", "SIGHUP", "SIGINT")

    def __init__(self):
        import signal
        import threading

        self._signal = signal
        self.active = threading.current_thread() is threading.main_thread()
        self.previous: dict[int, Any] = {}
        self.received: int | None = None

    def _handler(self, signum, frame):
        if self.received is None:
            self.received = signum
            raise Interrupted(signum)

    def __enter__(self) -> "SignalGuard":
        if self.active:
            for name in self.CAUGHT:
                number = getattr(self._signal, name, None)
                if number is not None:
                    self.previous[number] = self._signal.signal(number, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        # a signal that arrives now (the clean-up is done) is still only an Interrupted
        for number, handler in self.previous.items():
            self._signal.signal(number, handler)

    def held(self):
        """Hold the caught signals (and SIGINT) back while a few steps must complete together."""
        import contextlib

        signal = self._signal
        numbers = {getattr(signal, n) for n in self.HELD if hasattr(signal, n)}

        @contextlib.contextmanager
        def holding():
            if not (self.active and hasattr(signal, "pthread_sigmask")):
                yield
                return
            old = signal.pthread_sigmask(signal.SIG_BLOCK, numbers)
            try:
                yield
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return holding()
