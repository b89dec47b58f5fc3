"""The Docker image, built from the unmodified Dockerfile and run as a deployment runs it.

Theory of operation
-------------------
The image is built once per module. Where a Docker engine answers
(``docker info``), plain ``docker build``/``docker run`` do everything.
These CI machines have no engine: there ``../shared/container/build-image.sh``
builds the same Dockerfile with buildah (against a local stand-in for
``python:3.12-slim``) and the container runs under rootful podman with
runc. Both engines take the same ``run`` flags, so the tests below drive
either through one small :class:`Engine` wrapper.

Containers are started the way a deployment starts them: the
configuration directory mounted read-only at /etc/postfix-bridge, the
socketmap and tcp listeners bound to 0.0.0.0 inside and published on host
loopback ports, and a named volume at /run/postfix-bridge for the unix
socket (the compose example's shared-socket variant). Tests that leave the
container as they found it share one; the health and stop tests, which
break memcache or end the container, get their own.

Networking: the container sits on the engine's default bridge network,
because that is the network on which ``-p`` publishing works (with
``--network host`` there is nothing to publish). From that network the
host's loopback is out of reach, so memcached listens on the bridge's
gateway address (plus 127.0.0.1, where the test seeds it) and the
container reaches it as ``memcached.test``, an ``--add-host`` entry for the
gateway. The gateway interface exists only once a container uses the
network, so memcached starts after the container; the bridge connects to
memcache per lookup, so the order costs nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import (
    MEMCACHED,
    Memcached,
    PostmapResult,
    free_port,
    postmap_query,
    wait_for_connect,
)

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]

#: CI checks out shared/ beside the repository (and so does every
#: engineer's tree); the script is the only way to build without an engine.
BUILD_IMAGE_SCRIPT = REPO_ROOT.parent / "shared" / "container" / "build-image.sh"

#: The configuration examples/docker-compose.yml mounts into the bridge.
COMPOSE_CONFIG_DIR = REPO_ROOT / "examples" / "docker"

#: A tag of its own, so that the test never runs a stale image built by hand.
IMAGE_TAG = "localhost/postfix-bridge:image-test"

#: The paths the Dockerfile promises (its comments and the README's).
CONFIG_DIR = "/etc/postfix-bridge"
SOCKET_DIR = "/run/postfix-bridge"
SOCKETMAP_PORT = 10027
TCP_PORT = 10028
IMAGE_UID = 10025

#: The first build costs ~80 s on 2 cores (debootstrap, the base image, pip
#: through a TLS-intercepting proxy); a slow mirror must not make it flaky.
BUILD_TIMEOUT = 900.0

#: Starting the container and the daemon's "ready" line: 3-15 s here (the
#: vfs storage driver copies the whole image per container); generous
#: because CI machines are shared.
START_TIMEOUT = 60.0

#: ``stop -t`` grace before the engine falls back to SIGKILL (exit 137).
STOP_GRACE = 10

#: A prompt stop: the daemon finishes in-flight requests in milliseconds,
#: so anything near the grace period means SIGTERM did not reach it.
PROMPT_STOP = 5.0

#: podman's default limits fail on these machines (shared/container/README.md);
#: docker accepts the same flags.
ULIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096")

#: The name under which the container finds the host's memcached.
MEMCACHED_HOST = "memcached.test"


@dataclass(frozen=True, slots=True)
class Engine:
    """A container engine CLI (docker or podman) and the environment it needs."""

    command: str
    env: Mapping[str, str]

    @property
    def is_docker(self) -> bool:
        return Path(self.command).name == "docker"

    def run(
        self, *args: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ENGINE ARGS...``; with ``check``, a failure fails the test with its output."""
        completed = subprocess.run(
            [self.command, *args],
            capture_output=True,
            text=True,
            env=dict(self.env),
            timeout=timeout,
            check=False,
        )
        if check and completed.returncode != 0:
            pytest.fail(
                f"{self.command} {' '.join(args)} exited {completed.returncode}:\n"
                f"{completed.stdout}{completed.stderr}"
            )
        return completed

    def inspect(self, kind: str, name: str, template: str) -> Any:
        """One field of ``KIND inspect``, decoded from JSON."""
        return json.loads(self.run(kind, "inspect", "--format", template, name).stdout)

    def bridge_gateway(self) -> str:
        """The host's address on the engine's default bridge network."""
        if self.is_docker:
            template = "{{range .IPAM.Config}}{{.Gateway}}{{end}}"
            network = "bridge"
        else:
            template = "{{range .Subnets}}{{.Gateway}}{{end}}"
            network = "podman"
        gateway = self.run("network", "inspect", "--format", template, network).stdout.strip()
        assert gateway, f"no gateway on the {network} network"
        return gateway

    def logs(self, name: str) -> str:
        # The daemon logs to stderr; the engine keeps both streams.
        completed = self.run("logs", name)
        return completed.stdout + completed.stderr

    def health(self, name: str, expected: str) -> str:
        """Run the image's HEALTHCHECK and return the state it reports.

        podman (no systemd timers here) runs it on demand and answers with
        its exit status; docker runs it on its own schedule (1 s in these
        tests), so its recorded state is polled until it is ``expected``.
        """
        if not self.is_docker:
            completed = self.run("healthcheck", "run", name, check=False)
            states = {0: "healthy", 1: "unhealthy"}
            if completed.returncode not in states:
                pytest.fail(f"podman healthcheck run: {completed.stdout}{completed.stderr}")
            return states[completed.returncode]
        deadline = time.monotonic() + START_TIMEOUT
        state = ""
        while time.monotonic() < deadline:
            state = str(self.inspect("container", name, "{{json .State.Health.Status}}"))
            if state == expected:
                break
            time.sleep(0.5)
        return state


def _docker_engine() -> Engine | None:
    """docker, when a Docker engine answers it."""
    docker = shutil.which("docker")
    if docker is None:
        return None
    probe = subprocess.run([docker, "info"], capture_output=True, timeout=60, check=False)
    return Engine(docker, dict(os.environ)) if probe.returncode == 0 else None


def _build_with_script() -> Engine:
    """Build with build-image.sh and return podman with the storage it built into."""
    if not BUILD_IMAGE_SCRIPT.is_file():
        pytest.fail(
            f"no Docker engine, and {BUILD_IMAGE_SCRIPT} is missing: the image test needs "
            "the shared/ checkout beside the repository (../shared/container/build-image.sh)"
        )
    completed = subprocess.run(
        ["bash", str(BUILD_IMAGE_SCRIPT), str(REPO_ROOT), IMAGE_TAG],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if completed.returncode != 0:
        pytest.fail(f"build-image.sh failed ({completed.returncode}):\n{completed.stderr}")
    # The script prints "export CONTAINERS_STORAGE_CONF=... CONTAINERS_CONF=...":
    # podman must use the same private storage to find the image.
    export = re.search(r"^export (.+)$", completed.stdout, re.MULTILINE)
    assert export is not None, completed.stdout
    env = dict(os.environ)
    for assignment in export.group(1).split():
        variable, _, value = assignment.partition("=")
        env[variable] = value
    podman = shutil.which("podman", path=env.get("PATH")) or "/usr/bin/podman"
    return Engine(podman, env)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    """An engine holding a fresh build of the repository's Dockerfile as IMAGE_TAG."""
    docker = _docker_engine()
    if docker is not None:
        # docker keeps the image and its layer cache for the next build.
        docker.run("build", "--tag", IMAGE_TAG, str(REPO_ROOT), timeout=BUILD_TIMEOUT)
        yield docker
        return
    podman = _build_with_script()
    yield podman
    # buildah (no --layers) caches nothing, and the vfs driver stores every
    # image in full: an image left behind would cost ~300 MB of disk per run.
    podman.run("rmi", "--force", IMAGE_TAG, check=False)


@contextlib.contextmanager
def _memcached_on(port: int, *addresses: str) -> Iterator[Memcached]:
    """memcached on ``port`` of every address given; include 127.0.0.1, where it is seeded."""
    args = [MEMCACHED, "-l", ",".join(addresses), "-p", str(port), "-U", "0", "-m", "64"]
    if os.geteuid() == 0:
        args += ["-u", "root"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for address in addresses:
            wait_for_connect(address, port)
        yield Memcached(port, process)
    finally:
        process.kill()
        process.wait()


_CONFIG = """\
# Listeners on 0.0.0.0: inside the container, that is what -p publishes.
[[listen]]
endpoint = "inet:0.0.0.0:{socketmap_port}"
protocol = "socketmap"

[[listen]]
endpoint = "inet:0.0.0.0:{tcp_port}"
protocol = "tcp"
table = "aliases"

[[listen]]
endpoint = "unix:{socket_dir}/bridge.sock"
protocol = "socketmap"

[tables.aliases]
memcache = "inet:{memcached_host}:{memcached_port}"
key_format = "aliases:%s"
"""


@dataclass(frozen=True, slots=True)
class Deployment:
    """A running container of the image, and what it was started with."""

    engine: Engine
    name: str
    memcached: Memcached
    socketmap_port: int
    tcp_port: int
    socket_dir: Path

    def explain(self, result: PostmapResult) -> str:
        """A failed lookup's context: postmap's complaint and the daemon's log."""
        return f"postmap: {result.stderr.strip()}\ncontainer log:\n{self.engine.logs(self.name)}"

    @property
    def socketmap_table(self) -> str:
        return f"socketmap:inet:127.0.0.1:{self.socketmap_port}:aliases"

    @property
    def tcp_table(self) -> str:
        return f"tcp:127.0.0.1:{self.tcp_port}"

    @property
    def unix_table(self) -> str:
        return f"socketmap:unix:{self.socket_dir}/bridge.sock:aliases"


def _wait_until_ready(engine: Engine, name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if "ready: listening on" in engine.logs(name):
            return
        running = engine.inspect("container", name, "{{json .State.Running}}")
        if not running:
            break
        time.sleep(0.1)
    pytest.fail(f"the container never said ready; its log:\n{engine.logs(name)}")


@contextlib.contextmanager
def _deploy(engine: Engine, config_dir: Path) -> Iterator[Deployment]:
    """Run a container of the image serving the aliases table from the host's memcached.

    The container, its socket volume and memcached are gone when this exits.
    """
    name = f"postfix-bridge-test-{uuid.uuid4().hex[:12]}"
    volume = f"{name}-socket"
    gateway = engine.bridge_gateway()
    memcached_port = free_port()
    config_dir.mkdir()
    (config_dir / "bridge.toml").write_text(
        _CONFIG.format(
            socketmap_port=SOCKETMAP_PORT,
            tcp_port=TCP_PORT,
            socket_dir=SOCKET_DIR,
            memcached_host=MEMCACHED_HOST,
            memcached_port=memcached_port,
        )
    )
    # pytest makes its temporary directories private to root; the daemon
    # reads the mounted configuration as IMAGE_UID.
    config_dir.chmod(0o755)
    (config_dir / "bridge.toml").chmod(0o644)
    socketmap_port, tcp_port = free_port(), free_port()
    health_schedule = ("--health-interval=1s", "--health-retries=1") if engine.is_docker else ()
    try:
        engine.run("volume", "create", volume)
        engine.run(
            "run",
            "--detach",
            "--name",
            name,
            "--add-host",
            f"{MEMCACHED_HOST}:{gateway}",
            "--volume",
            f"{config_dir}:{CONFIG_DIR}:ro",
            "--volume",
            f"{volume}:{SOCKET_DIR}",
            "--publish",
            f"127.0.0.1:{socketmap_port}:{SOCKETMAP_PORT}",
            "--publish",
            f"127.0.0.1:{tcp_port}:{TCP_PORT}",
            *ULIMITS,
            *health_schedule,
            IMAGE_TAG,
            timeout=START_TIMEOUT,
        )
        socket_dir = Path(
            engine.run("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip()
        )
        with _memcached_on(memcached_port, "127.0.0.1", gateway) as memcached:
            _wait_until_ready(engine, name)
            yield Deployment(engine, name, memcached, socketmap_port, tcp_port, socket_dir)
    finally:
        engine.run("rm", "--force", name, check=False)
        engine.run("volume", "rm", "--force", volume, check=False)


@pytest.fixture(scope="module")
def deployment(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One container shared by the tests that leave it as they found it.

    Shared because each container costs seconds: the CI storage driver
    (vfs) copies the whole image for every container.
    """
    with _deploy(engine, tmp_path_factory.mktemp("shared") / "config") as running:
        yield running


@pytest.fixture
def own_deployment(engine: Engine, tmp_path: Path) -> Iterator[Deployment]:
    """A container for one test that stops it or breaks its memcache."""
    with _deploy(engine, tmp_path / "config") as running:
        yield running


# ---------------------------------------------------------------- the image


def test_image_metadata_matches_the_dockerfile_promises(engine: Engine) -> None:
    """Non-root numeric user, exposed ports, exec-form health check, default command."""
    config = engine.inspect("image", IMAGE_TAG, "{{json .Config}}")
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert set(config["ExposedPorts"]) == {f"{SOCKETMAP_PORT}/tcp", f"{TCP_PORT}/tcp"}
    assert config["StopSignal"] == "SIGTERM"
    command = config["Entrypoint"] + config["Cmd"]
    assert command == ["postfix-bridge", "serve", "--config", f"{CONFIG_DIR}/bridge.toml"]
    # docker keeps the health check in .Config, podman beside it; "CMD" is
    # the exec form ("CMD-SHELL" would need a shell and mangle arguments).
    if engine.is_docker:
        health_check = config["Healthcheck"]
    else:
        health_check = engine.inspect("image", IMAGE_TAG, "{{json .HealthCheck}}")
    assert health_check["Test"] == [
        "CMD",
        "postfix-bridge",
        "health",
        "--config",
        f"{CONFIG_DIR}/bridge.toml",
    ]
    assert 0 < health_check["Timeout"] < health_check["Interval"]


def test_only_runtime_code_is_installed(deployment: Deployment) -> None:
    """No test tools, no build backend, no source tree left in the image; PID 1 is not root."""
    probe = (
        "import importlib.util, os, sys\n"
        "leftovers = [m for m in ('pytest', 'hypothesis', 'mypy', 'setuptools')"
        " if importlib.util.find_spec(m)]\n"
        "leftovers += [p for p in ('/usr/src/postfix-bridge',) if os.path.exists(p)]\n"
        "print(' '.join(leftovers))\n"
    )
    completed = deployment.engine.run("exec", deployment.name, "python", "-c", probe)
    assert completed.stdout.strip() == ""
    status = deployment.engine.run("exec", deployment.name, "cat", "/proc/1/status").stdout
    uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.MULTILINE)
    assert uids is not None, status
    assert (int(uids[1]), int(uids[2])) == (IMAGE_UID, IMAGE_UID)


def test_man_pages_are_installed(deployment: Deployment) -> None:
    """postfix-bridge(8) and postfix-bridge.toml(5), as committed in docs/man/."""
    for section, name in (("8", "postfix-bridge.8"), ("5", "postfix-bridge.toml.5")):
        path = f"/usr/share/man/man{section}/{name}"
        installed = deployment.engine.run("exec", deployment.name, "cat", path).stdout
        assert installed == (REPO_ROOT / "docs" / "man" / name).read_text(encoding="utf-8")


def test_compose_example_configuration_passes_check(engine: Engine) -> None:
    """examples/docker/bridge.toml is valid in the image, on a read-only root as composed.

    Also shows that the entrypoint takes other commands and that they find
    the configuration at its default path.
    """
    completed = engine.run(
        "run",
        "--rm",
        "--read-only",
        "--volume",
        f"{COMPOSE_CONFIG_DIR}:{CONFIG_DIR}:ro",
        *ULIMITS,
        IMAGE_TAG,
        "check",
        timeout=START_TIMEOUT,
    )
    assert f"{CONFIG_DIR}/bridge.toml: configuration OK" in completed.stdout
    for listener in ("inet:0.0.0.0:10027", "inet:0.0.0.0:10028", f"unix:{SOCKET_DIR}/"):
        assert listener in completed.stdout


# ---------------------------------------------------------------- lookups


def test_postmap_lookups_through_the_published_ports(deployment: Deployment) -> None:
    """Postfix's own client finds memcache entries through both published listeners."""
    deployment.memcached.set(b"aliases:user@example.com", b"user@mail.example.net")
    for table in (deployment.socketmap_table, deployment.tcp_table):
        found = postmap_query("user@example.com", table)
        assert found.outcome == "found:user@mail.example.net", deployment.explain(found)
        missing = postmap_query("nobody@example.com", table)
        assert missing.outcome == "notfound", deployment.explain(missing)


def test_postmap_lookup_through_the_socket_volume(deployment: Deployment) -> None:
    """The unix socket appears in the named volume, owned by the image's user."""
    socket_path = deployment.socket_dir / "bridge.sock"
    assert socket_path.is_socket()
    assert socket_path.stat().st_uid == IMAGE_UID
    deployment.memcached.set(b"aliases:info@example.com", b"sales@example.com")
    found = postmap_query("info@example.com", deployment.unix_table)
    assert found.outcome == "found:sales@example.com", deployment.explain(found)


# ---------------------------------------------------------------- health and stop


def test_health_check_asks_the_bridge(own_deployment: Deployment) -> None:
    """Healthy while the bridge answers; unhealthy once its memcache fails (TEMP)."""
    engine, name = own_deployment.engine, own_deployment.name
    assert engine.health(name, "healthy") == "healthy"
    own_deployment.memcached.process.kill()
    own_deployment.memcached.process.wait()
    assert engine.health(name, "unhealthy") == "unhealthy"


def test_stop_ends_the_container_promptly_with_status_zero(own_deployment: Deployment) -> None:
    """SIGTERM reaches the daemon as PID 1: a clean shutdown, not the engine's SIGKILL."""
    engine, name = own_deployment.engine, own_deployment.name
    started = time.monotonic()
    engine.run("stop", "--time", str(STOP_GRACE), name, timeout=60)
    elapsed = time.monotonic() - started
    assert elapsed < PROMPT_STOP, f"stop took {elapsed:.1f} s"
    state = engine.inspect("container", name, "{{json .State}}")
    assert (state["Running"], state["ExitCode"]) == (False, 0)
    assert "shutting down" in engine.logs(name)
