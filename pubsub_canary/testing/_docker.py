"""Is a Docker engine answering? Asked once per process, cheaply.

Docker's absence is never an error here: the callers fall through to the local backends. The
check costs nothing when no engine socket exists (our CI machines); otherwise it is one ping
with a short timeout through the docker SDK that testcontainers depends on.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings

from pubsub_canary.testing._config import DOCKER_ENV, env_flag

log = logging.getLogger(__name__)

_SOCKETS = (
    "/var/run/docker.sock",
    os.path.expanduser("~/.docker/run/docker.sock"),
    os.path.expanduser("~/.colima/default/docker.sock"),
    os.path.join(os.environ.get("XDG_RUNTIME_DIR", "/nonexistent"), "docker.sock"),
)


@functools.cache
def docker_status(timeout: float = 2.0) -> tuple[bool, str]:
    """``(available, reason)``; the reason says why Docker is not used, or which engine is."""
    if not env_flag(DOCKER_ENV, default=True):
        return False, f"Docker disabled by {DOCKER_ENV}"
    base_url = os.environ.get("DOCKER_HOST")
    if not base_url:
        socket = next((path for path in _SOCKETS if os.path.exists(path)), None)
        if socket is None:
            return False, "no Docker engine (no DOCKER_HOST, no docker.sock)"
        base_url = f"unix://{socket}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import docker

            client = docker.DockerClient(base_url=base_url, timeout=int(max(1, timeout)))
            try:
                client.ping()
            finally:
                client.close()
    except Exception as exc:  # any failure means "no usable engine", never an error
        log.debug("Docker at %s did not answer: %s", base_url, exc)
        return False, f"Docker at {base_url} did not answer: {type(exc).__name__}"
    return True, f"Docker at {base_url}"


def docker_available() -> bool:
    return docker_status()[0]
