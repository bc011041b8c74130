"""Every example's README steps, run as written.

Each ``examples/<name>/README.md`` has numbered steps under ``## Steps`` with ```` ```bash ````
blocks; ``examples/<name>/steps.yaml`` lists the same commands, in order, with what the test
needs to know beyond them: when a background program is ready, when to stop a ``--watch``, what
a command must print. :func:`test_steps_match_readme` keeps the two identical, so the README
cannot drift from what is tested.

The commands run in a copy of the example, one ``bash`` per command with the environment and
working directory carried from one command to the next (``export`` and ``cd`` work as in one
shell). A command ending in ``&`` (optionally ``& NAME=$!``) starts in the background as its own
process group; ``NAME`` gets its pid, as ``$!`` would. The one change made to the commands: the
fixed ports of the README (the coordinator's 8470, the emulator's 8085) become free ports, and
``PUBSUB_CANARY_COORDINATOR`` names the coordinator's, because other tests share this machine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from pubsub_canary.demo.harness import free_port
from pubsub_canary.errors import BackendUnavailable
from pubsub_canary.testing._config import is_ci

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FIXED_PORTS = (8470, 8085)
#: Variables of the developer's shell that would point the examples elsewhere.
SCRUB = (
    "PUBSUB_CANARY_KAFKA_BOOTSTRAP",
    "PUBSUB_EMULATOR_HOST",
    "PUBSUB_PROJECT_ID",
    "PUBSUB_CANARY_OPERATOR_TOKEN",
    "PUBSUB_CANARY_COORDINATOR",
)
BACKGROUND = re.compile(r"^(?P<cmd>.*?)\s*&(?:\s*(?P<var>[A-Za-z_]\w*)=\$!)?$")


def example_names() -> list[str]:
    return sorted(p.parent.name for p in EXAMPLES.glob("*/steps.yaml"))


def load_steps(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((EXAMPLES / name / "steps.yaml").read_text()))


def readme_commands(text: str) -> list[str]:
    """The shell commands of the ``bash`` blocks in the README's ``## Steps`` section."""
    section = re.search(r"^## Steps\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, "README has no '## Steps' section"
    commands: list[str] = []
    for block in re.finditer(r"^( *)```bash\n(.*?)^\1```", section.group(1), re.M | re.S):
        indent = len(block.group(1))
        pending = ""
        for raw in block.group(2).splitlines():
            line = raw[indent:] if raw[:indent].strip() == "" else raw
            line = re.sub(r"\s+#.*$", "", line).rstrip()
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            commands.append((pending + line.strip()).strip())
            pending = ""
    return commands


def example_params() -> list[Any]:
    params = []
    for name in example_names():
        spec = load_steps(name)
        marks = [getattr(pytest.mark, m) for m in spec.get("markers", ["kafka"])]
        if spec.get("skip"):
            marks.append(pytest.mark.skip(reason=spec["skip"]))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def test_every_example_is_tested() -> None:
    dirs = sorted(
        p.name for p in EXAMPLES.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))
    )
    assert dirs == example_names(), "each examples/<name>/ needs a README.md and a steps.yaml"
    for name in dirs:
        assert (EXAMPLES / name / "README.md").is_file(), name


@pytest.mark.parametrize("name", example_names())
def test_steps_match_readme(name: str) -> None:
    """steps.yaml runs exactly the README's commands, in the README's order."""
    readme = readme_commands((EXAMPLES / name / "README.md").read_text())
    steps = [s["run"] for s in load_steps(name)["steps"]]
    assert readme == steps
    assert readme[0] == f"cd examples/{name}", "the steps start from the repository root"


# --- running the steps --------------------------------------------------------------------------


@dataclass
class Background:
    command: str
    proc: subprocess.Popen[bytes]


@dataclass
class Shell:
    """One shell's worth of state: environment, directory, background jobs."""

    root: Path
    env: dict[str, str]
    cwd: Path
    jobs: list[Background] = field(default_factory=list)
    transcript: list[str] = field(default_factory=list)

    def foreground(self, command: str, timeout: float) -> subprocess.CompletedProcess[str]:
        envfile = self.root / ".env-after"
        script = f'{command}\n__rc=$?\nenv -0 > "{envfile}"\nexit $__rc\n'
        p = subprocess.run(
            ["bash", "-c", script],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if envfile.exists():
            pairs = (kv.split("=", 1) for kv in envfile.read_text().split("\0") if "=" in kv)
            self.env = {k: v for k, v in pairs if not k.startswith("BASH_FUNC_")}
            self.cwd = Path(self.env.get("PWD", self.cwd))
            envfile.unlink()
        self.transcript.append(f"$ {command}\n{p.stdout}{p.stderr}")
        return p

    def background(self, command: str) -> Background:
        m = BACKGROUND.match(command)
        assert m, command
        cmd = m.group("cmd")
        out = open(self.root / f".job-{len(self.jobs)}.out", "wb")  # noqa: SIM115 - child owns it
        # exec: the pid is the program's own (what `$!` gives in an interactive shell).
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {cmd}"],
            cwd=self.cwd,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        if m.group("var"):
            self.env[m.group("var")] = str(proc.pid)
        job = Background(command, proc)
        self.jobs.append(job)
        self.transcript.append(f"$ {command}   [pid {proc.pid}]")
        return job

    def until(self, command: str, patterns: list[str], timeout: float) -> str:
        """Run a command that refreshes until Ctrl-C; stop it once one refresh matches all."""
        out_path = self.root / ".until.out"
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(
                ["bash", "-c", f"exec {command}"],
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        regexes = [re.compile(p, re.M) for p in patterns]
        deadline = time.monotonic() + timeout
        matched = False
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                refreshes = out_path.read_text(errors="replace").split("\n\n")
                if any(all(r.search(chunk) for r in regexes) for chunk in refreshes[:-1]):
                    matched = True
                    break
                time.sleep(0.3)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        text = out_path.read_text(errors="replace")
        self.transcript.append(f"$ {command}   [until {patterns}]\n{text[-3000:]}")
        assert matched, f"{command!r}: no refresh matched {patterns} in {timeout} s"
        return text

    def wait_ready(self, job: Background, ready: dict[str, Any]) -> None:
        path = self.cwd / ready["file"]
        deadline = time.monotonic() + float(ready.get("timeout", 30))
        while time.monotonic() < deadline:
            if path.exists() and ready["contains"] in path.read_text(errors="replace"):
                return
            if job.proc.poll() is not None:
                raise AssertionError(f"{job.command!r} exited with {job.proc.returncode}")
            time.sleep(0.1)
        raise AssertionError(f"{job.command!r}: {ready['file']} never showed {ready['contains']!r}")

    def stop_all(self) -> None:
        """What `kill $(jobs -p)` does, in waves: the members (which hand their work back to
        the coordinator) first, then the coordinator, then the test backends."""
        waves: list[list[Background]] = [[], [], []]
        for job in self.jobs:
            if job.proc.poll() is None:
                wave = 2 if " dev " in job.command else 1 if " coordinator " in job.command else 0
                waves[wave].append(job)
        for wave in waves:
            for job in wave:
                os.killpg(job.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            for job in wave:
                try:
                    job.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(job.proc.pid, signal.SIGKILL)
                    job.proc.wait(5)

    def diagnostics(self) -> str:
        parts = ["--- transcript ---", *self.transcript[-12:]]
        for log in sorted(self.cwd.glob("*.log")):
            parts.append(f"--- {log.name} (tail) ---\n{log.read_text(errors='replace')[-1500:]}")
        return "\n".join(parts)


def localise(command: str, ports: dict[int, int]) -> str:
    """The README's fixed ports -> this run's free ports."""
    for fixed, free in ports.items():
        command = re.sub(rf"(?<=[:\s]){fixed}\b", str(free), command)
    return command


def check_requirements(spec: dict[str, Any]) -> None:
    """Skip (fail under CI) when a backend the README needs is not installed here."""
    for need in spec.get("requires", []):
        assert need == "pubsub-emulator", f"unknown requirement {need!r}"
        try:
            import google.cloud.pubsub_v1  # noqa: F401

            from pubsub_canary.testing.pubsub import emulator_command

            emulator_command(0, "probe")
        except (ImportError, BackendUnavailable) as exc:
            reason = f"the Pub/Sub emulator is needed: {exc}"
            if is_ci():
                pytest.fail(reason)
            pytest.skip(reason)


def run_example(name: str, root: Path) -> Shell:
    shutil.copytree(EXAMPLES / name, root / "examples" / name)
    ports = {p: free_port() for p in FIXED_PORTS}
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PUBSUB_CANARY_COORDINATOR"] = f"http://127.0.0.1:{ports[8470]}"
    shell = Shell(root, env, root)
    try:
        for step in load_steps(name)["steps"]:
            if step.get("cleanup"):
                continue
            started = time.monotonic()
            command = localise(step["run"], ports)
            if "until" in step:
                shell.until(command, step["until"]["match"], float(step["until"]["timeout"]))
            elif BACKGROUND.match(command):
                job = shell.background(command)
                if "ready" in step:
                    shell.wait_ready(job, step["ready"])
            else:
                expect = step.get("expect", {})
                p = shell.foreground(command, timeout=float(step.get("timeout", 60)))
                output = p.stdout + p.stderr
                assert p.returncode == expect.get("exit", 0), f"{command!r}: {output}"
                for needle in expect.get("contains", []):
                    assert needle in output, f"{command!r} did not print {needle!r}: {output}"
                for pattern in expect.get("match", []):
                    assert re.search(pattern, output, re.M), f"{command!r}: no {pattern!r}"
            shell.transcript.append(f"  [{time.monotonic() - started:.1f} s]")
    except BaseException as exc:
        shell.stop_all()
        raise AssertionError(f"{name}: {exc}\n{shell.diagnostics()}") from exc
    started = time.monotonic()
    shell.stop_all()
    shell.transcript.append(f"$ kill $(jobs -p)\n  [{time.monotonic() - started:.1f} s]")
    return shell


@pytest.mark.slow
@pytest.mark.timeout(170)
@pytest.mark.parametrize("name", example_params())
def test_example_steps_work(name: str, tmp_path: Path) -> None:
    check_requirements(load_steps(name))
    run_example(name, tmp_path)
