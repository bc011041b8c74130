"""Run a command and stop it when our stdin closes (run as ``python -m``; internal).

Used for the Pub/Sub emulator, a JVM that would otherwise outlive a parent killed with SIGKILL.
The parent holds the write end of our stdin; when it closes (the parent called ``close()`` or
died), we stop the command's whole process group: ``gcloud beta emulators pubsub start`` starts
the JVM as a grandchild. We exit with the command's status if it ends first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading


def _stop_group(process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "--" or len(argv) < 2:
        print("usage: python -m pubsub_canary.testing._supervise -- COMMAND...", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process = subprocess.Popen(argv[1:], stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        print(f"cannot run {argv[1]}: {exc}", file=sys.stderr)
        return 127

    def stop_in_background() -> None:
        # Not in the signal handler: the main thread holds Popen's wait lock while it waits.
        threading.Thread(target=_stop_group, args=(process,), daemon=True).start()

    def watch_stdin() -> None:
        while os.read(sys.stdin.fileno(), 4096):
            pass
        _stop_group(process)

    def on_term(signum: int, frame: object) -> None:
        stop_in_background()

    signal.signal(signal.SIGTERM, on_term)
    threading.Thread(target=watch_stdin, daemon=True).start()
    code = process.wait()
    # The command may have left children in its group (gcloud's JVM); do not leave them behind.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
