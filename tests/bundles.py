"""Agent bundles as tests write them: the files of a small agent, written out, packed, or copied
from an example; hand-made tars holding what a published bundle must not; a wheel built on this machine;
and the PublishVersion stream that uploads a packed bundle."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Mapping
from pathlib import Path

from corral.bundle import digest_of, pack
from corral.registry.v1 import registry_pb2

# An agent.py whose entrypoint answers "hi" to anything.
SAYS_HI = (
    "from corral.sdk import App\napp = App()\n\n@app.entrypoint\ndef run(payload, ctx):\n"
    "    return 'hi'\n"
)

# One agent for the failure cases, its behaviour chosen by the payload. It counts turns in its
# state like the examples, and changes the state before failing, so a failed turn that leaked
# its state would show.
BEHAVIOUR = """
import json, os, time
from corral.sdk import App

app = App()


@app.entrypoint
def run(payload, ctx):
    turns = ctx.state.get("turns", 0) + 1
    ctx.state["turns"] = turns
    yield f"Turn {turns}."
    mode = payload.get("mode", "")
    if mode == "sleep":
        yield "." * payload.get("bytes", 0)
        time.sleep(payload.get("seconds", 1.5))
        yield " Slept."
    elif mode == "boom":
        raise ValueError("boom")
    elif mode == "env":
        yield json.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "pid": os.getpid()})
    elif mode == "crash":
        os._exit(3)
"""


def write_bundle(root: Path, files: Mapping[str, str | bytes]) -> Path:
    """Writes `files` (relative path → content) under `root` and returns `root`."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def agent_files(name: str, code: str, *, toml_extra: str = "") -> dict[str, str]:
    """A minimal corral agent: agent.toml naming `name`, agent.py holding `code`, a prompt."""
    toml = (
        f'name = "{name}"\nentrypoint = "agent:app"\n\n[prompt]\nfile = "prompt.md"\n'
        + toml_extra
    )
    return {"agent.toml": toml, "agent.py": code, "prompt.md": "You help.\n"}


# Prints, logs, writes to stderr, floods its output with `flood` lines of 1 KB, and divides by
# payload "n" in a second file of its bundle (ZeroDivisionError for 0).
DEBUGGED = """
import logging
import sys

from corral.sdk import App
from helpers import ratio

app = App()
log = logging.getLogger("debugged")


@app.entrypoint
def run(payload, ctx):
    print("starting", payload.get("n"))
    log.info("dividing by %s", payload.get("n"))
    print("a note on stderr", file=sys.stderr)
    for i in range(payload.get("flood", 0)):
        print(f"{i:06d} " + "x" * 1000)
    yield ratio(1, payload.get("n", 0))
"""
DEBUGGED_HELPERS = "def ratio(a, b):\n    return str(a / b)\n"
# The line of agent.py that calls into helpers.py.
DEBUGGED_LINE = 19


def debugged_agent(name: str) -> dict[str, str]:
    """The DEBUGGED agent's files, named `name`."""
    return {**agent_files(name, DEBUGGED), "helpers.py": DEBUGGED_HELPERS}


def packed_agent(
    tmp: Path, name: str, code: str = SAYS_HI, *, prompt: str = "You help.\n", **extra: str | bytes
) -> bytes:
    """A small agent packed, as publishing takes it: agent_files' agent with `prompt` as its
    prompt and `extra` files, written to a folder of its own under `tmp`."""
    files: dict[str, str | bytes] = {**agent_files(name, code), "prompt.md": prompt, **extra}
    return pack(write_bundle(tmp / uuid.uuid4().hex, files))


def copy_example(example: Path, dest: Path, name: str) -> Path:
    """A copy of an example bundle renamed to `name`, so tests sharing a database stay apart."""
    shutil.copytree(example, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    toml = dest / "agent.toml"
    text = re.sub(r'(?m)^name = ".*"$', f'name = "{name}"', toml.read_text(), count=1)
    toml.write_text(text)
    return dest


def tar_of(*entries: tarfile.TarInfo | tuple[str, bytes]) -> bytes:
    """A hand-made tar: (name, content) for a regular file, or a prepared TarInfo."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                tar.addfile(info, io.BytesIO(entry[1]))
    return buf.getvalue()


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    """A tar entry `name` linking to `target`: a symbolic link, or a hard link by `kind`."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def build_wheel(workdir: Path, name: str, code: str) -> Path:
    """A wheel of a one-module project, built locally with `pip wheel` (no index, no network)."""
    project = write_bundle(workdir / f"{name}-src", {
        "pyproject.toml": (
            '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
            f'[project]\nname = "{name}"\nversion = "1.0"\n'
            # A console script: pip writes it to bin/ with this machine's interpreter path.
            f'[project.scripts]\n{name} = "{name}:main"\n'
        ),
        f"{name}/__init__.py": code,
    })
    wheels = workdir / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation",
         "--wheel-dir", str(wheels), str(project)],
        check=True, capture_output=True,
    )
    return next(wheels.glob(f"{name}-1.0-*.whl"))


def publish_requests(
    data: bytes, *, parent: str = "", digest: str | None = None, chunk: int = 64 * 1024
) -> list[registry_pb2.PublishVersionRequest]:
    """The PublishVersion stream for a packed bundle: a header, then chunks."""
    header = registry_pb2.PublishVersionHeader(
        parent=parent,
        size_bytes=len(data),
        digest=digest_of(data) if digest is None else digest,
    )
    messages = [registry_pb2.PublishVersionRequest(header=header)]
    for i in range(0, len(data), chunk):
        messages.append(registry_pb2.PublishVersionRequest(chunk=data[i : i + chunk]))
    return messages
