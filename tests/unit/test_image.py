"""The two builds of the container image agree: deploy/docker/Dockerfile (for Docker) and
deploy/docker/build-image.sh (`make image`, without a daemon) install the same Debian packages
and Python dependencies and give the image the same configuration. Building it is `make image`'s
job (minutes, and root): not a test."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILE = (DOCKER / "Dockerfile").read_text()
SCRIPT = (DOCKER / "build-image.sh").read_text()


def packages() -> list[str]:
    lines = (DOCKER / "packages.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def umoci_config() -> dict[str, list[str]]:
    """--config.X values of build-image.sh's `umoci config`, by X, in order."""
    command = SCRIPT.split("umoci config ", 1)[1].split("\numoci gc", 1)[0].replace("\\\n", " ")
    found: dict[str, list[str]] = {}
    words = shlex.split(command)
    for i, word in enumerate(words):
        if word.startswith("--config."):
            key, eq, value = word.removeprefix("--config.").partition("=")
            found.setdefault(key, []).append(value if eq else words[i + 1])
    return found


def dockerfile_json(instruction: str) -> list[str]:
    match = re.search(rf"(?m)^{instruction} \[(.*)\]$", DOCKERFILE)
    assert match, instruction
    return [w.strip().strip('"') for w in match.group(1).split(",")]


def test_both_install_the_sandbox_drivers_programs_from_one_package_list() -> None:
    assert {"bubblewrap", "libseccomp2", "util-linux", "runsc", "tini", "python3"} <= set(
        packages())
    assert "COPY deploy/docker/packages.txt" in DOCKERFILE
    assert "xargs apt-get install" in DOCKERFILE
    assert '"$here/packages.txt"' in SCRIPT and '--include="$packages"' in SCRIPT
    # The same Debian release: bookworm, whose bubblewrap (0.8) the bwrap driver needs.
    assert "FROM debian:bookworm-slim" in DOCKERFILE
    assert "suite=bookworm" in SCRIPT


def test_both_install_the_locked_dependencies_the_code_and_the_agents_runtime() -> None:
    for text in (DOCKERFILE, SCRIPT):
        assert "['project']['dependencies']" in text
        assert "python3 -m venv" in text and "/opt/corral/venv" in text
        assert "--only-binary=:all:" in text
        assert "corral-app.pth" in text
        assert "scripts/setup_runtime.py" in text
        assert "from corral.cli import main" in text
        assert "groupadd --system --gid 10001 corral" in text


def test_both_give_the_image_the_same_configuration() -> None:
    config = umoci_config()
    assert config["entrypoint"] == dockerfile_json("ENTRYPOINT")
    assert config["cmd"] == dockerfile_json("CMD")
    (user,) = re.findall(r"(?m)^USER (\S+)$", DOCKERFILE)
    assert config["user"] == [user]
    (workdir,) = re.findall(r"(?m)^WORKDIR (\S+)$", DOCKERFILE.split("FROM debian", 1)[1])
    assert config["workingdir"] == [workdir]
    (exposed,) = re.findall(r"(?m)^EXPOSE (.+)$", DOCKERFILE)
    assert config["exposedports"] == [f"{port}/tcp" for port in exposed.split()]
    env_block = DOCKERFILE.split("\nENV ", 1)[1].split("\nCOPY", 1)[0].replace("\\\n", " ")
    docker_env = dict(word.split("=", 1) for word in shlex.split(env_block))
    script_env = dict(e.split("=", 1) for e in config["env"])
    script_env["PATH"] = script_env["PATH"].replace("$venv", "/opt/corral/venv")
    pip_only = {"PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK"}  # build-time settings
    assert {k: v for k, v in docker_env.items() if k not in pip_only} == script_env


def test_the_build_checks_the_image_by_starting_a_sandbox_with_each_driver() -> None:
    assert 'in_image python /tmp/image_check.py' in SCRIPT
    check = (DOCKER / "image_check.py").read_text()
    assert 'for name in ("bwrap", "gvisor")' in check and "await sandbox.start(" in check


def test_the_build_script_parses_and_make_image_runs_it_outside_make_test() -> None:
    result = subprocess.run(["sh", "-n", str(DOCKER / "build-image.sh")], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"(?m)^image: .*\n\t@sh deploy/docker/build-image.sh build/image ", makefile)
    (test_target,) = re.findall(r"(?m)^test: (.*)$", makefile)
    assert "image" not in test_target.split()


def test_the_docker_context_keeps_what_the_dockerfile_copies() -> None:
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    copied = re.findall(r"(?m)^COPY (?!--from)(\S+)", DOCKERFILE)
    for path in copied:
        assert not any(path == i or path.startswith(f"{i}/") for i in ignored), path
