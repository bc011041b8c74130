"""Child-process plumbing shared by the launchers: line reading with a deadline, log tails."""

from __future__ import annotations

import os
import select
import subprocess
import tempfile
import time
from typing import IO


class LineReader:
    """Reads lines from a pipe with a deadline (a plain ``readline`` would block forever)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._fd = stream.fileno()
        self._buffer = b""

    def readline(self, timeout: float) -> str | None:
        """The next line without its newline; None on end of file or when ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", "replace")


class LogFile:
    """An anonymous log file for a child process: it appends, we read it from the start.

    Two separate opens of one file, the writer in append mode, so reading never moves the
    child's write position (a shared ``TemporaryFile`` would let our ``seek`` misplace its
    writes). The file is unlinked at once and vanishes with the last handle.
    """

    def __init__(self, prefix: str) -> None:
        fd, path = tempfile.mkstemp(prefix=prefix, suffix=".log")
        try:
            self.writer: IO[bytes] = open(path, "ab")  # noqa: SIM115 - closed in close()
            self._reader: IO[bytes] = open(path, "rb")  # noqa: SIM115
        finally:
            os.close(fd)
            os.unlink(path)

    def read(self) -> str:
        """Everything written so far."""
        try:
            self._reader.seek(0)
            return self._reader.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""

    def tail(self, lines: int = 5, width: int = 400) -> str:
        """The last ``lines`` non-empty lines, joined with `` | `` to fit on one line."""
        kept = [line.strip() for line in self.read().splitlines() if line.strip()][-lines:]
        joined = " | ".join(kept)
        return joined if len(joined) <= width else "..." + joined[-width:]

    def close(self) -> None:
        self.writer.close()
        self._reader.close()


def stop_process(process: subprocess.Popen[bytes], *, group: bool, grace: float = 5.0) -> None:
    """Stop ``process`` (and its process group when ``group``): SIGTERM, then SIGKILL."""
    if process.poll() is not None:
        return
    import signal

    def send(sig: int) -> None:
        try:
            if group:
                os.killpg(process.pid, sig)
            else:
                process.send_signal(sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait(grace)
