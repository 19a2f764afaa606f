"""Console output that cannot kill a run.

``kid train ... 2>&1 | tee log`` is how most people log a run, and Ctrl-C reaches ``tee`` too: from then on
every write to stdout or stderr fails with ``BrokenPipeError``.  A progress bar, a log line or a final ``print``
would then raise in the middle of saving a checkpoint.  :func:`protect_console` wraps ``sys.stdout`` and
``sys.stderr`` (and the logging handlers that write to them) so that the first failed write silently points the
stream's file descriptor at ``/dev/null``; everything after it (Python, C extensions, the interpreter's flush at
exit) writes into the void and the run carries on saving.  :func:`write_stderr` is the signal-handler-safe
variant (``os.write``, which takes no lock) with the same tolerance.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any


class TolerantStream:
    """A text stream proxy whose ``write`` / ``flush`` never raise ``OSError`` (see the module docstring)."""

    def __init__(self, stream):
        self._stream = stream
        self.broken = False

    @property
    def wrapped(self):
        return self._stream

    def _give_up(self, redirect: bool = True) -> None:
        self.broken = True
        if not redirect:  # the stream object was closed (not the descriptor's reader): leave the descriptor alone
            return
        with contextlib.suppress(Exception):
            fd = self._stream.fileno()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)  # later writes to this descriptor (from anyone) succeed and vanish
            os.close(devnull)

    def write(self, text):
        if self.broken:
            return len(text)
        try:
            return self._stream.write(text)
        except OSError:  # EPIPE (the reader is gone), EIO (the terminal is gone), ENOSPC
            self._give_up()
        except ValueError:  # write to a closed stream object
            self._give_up(redirect=False)
        return len(text)

    def flush(self):
        if self.broken:
            return
        try:
            self._stream.flush()
        except OSError:
            self._give_up()
        except ValueError:
            self._give_up(redirect=False)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def isatty(self):
        if self.broken:
            return False
        try:
            return self._stream.isatty()
        except (OSError, ValueError):
            return False

    def __getattr__(self, name):
        return getattr(self._stream, name)


def protect_console():
    """Wrap ``sys.stdout`` / ``sys.stderr`` in :class:`TolerantStream` (already wrapped streams stay), and point
    the logging handlers that write to the unwrapped streams at the wrappers.  Returns a function that flushes the
    wrappers and puts everything back (after a broken pipe the descriptor already leads to /dev/null, so the
    interpreter's own flush at exit cannot fail either)."""
    replaced: dict[int, tuple[str, Any, TolerantStream]] = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or isinstance(stream, TolerantStream):
            continue
        wrapper = TolerantStream(stream)
        setattr(sys, name, wrapper)
        replaced[id(stream)] = (name, stream, wrapper)
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    handlers = []
    for logger in loggers:
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and id(stream) in replaced:
                handler.stream = replaced[id(stream)][2]
                handlers.append((handler, stream))

    def restore() -> None:
        for name, stream, wrapper in replaced.values():
            wrapper.flush()
            if getattr(sys, name) is wrapper:
                setattr(sys, name, stream)
        for handler, stream in handlers:
            handler.stream = stream

    return restore


def write_stderr(text: str) -> None:
    """Write to file descriptor 2 without Python's locks (safe in a signal handler); never raises."""
    with contextlib.suppress(OSError):
        os.write(2, text.encode("utf-8", "replace"))


def say(*parts, file=None) -> None:
    """``print`` that never raises on a closed stream (flushed at once)."""
    stream = file if file is not None else sys.stdout
    with contextlib.suppress(OSError, ValueError):
        print(*parts, file=stream, flush=True)
