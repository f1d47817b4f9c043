"""Bundles: canonical packing (the same directory always makes the same bytes, so the same
digest), and the checks every uploaded tar passes before it is stored or unpacked."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from pathlib import Path

import pytest

from corral import bundle
from corral.bundle import BundleError, digest_of, inspect, pack, unpack
from corral.manifest import ManifestError
from tests.harness import agent_files, write_bundle

CODE = "from corral.sdk import App\napp = App()\n\n@app.entrypoint\ndef run(payload, ctx):\n    return 'hi'\n"
TOML = b'name = "demo"\nentrypoint = "agent:app"\n'


def files() -> dict[str, str]:
    return {**agent_files("demo", CODE), "lib/util.py": "X = 1\n", "data/a.json": "{}"}


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
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


BASE = (("agent.toml", TOML), ("agent.py", CODE.encode()))


def refused(data: bytes) -> BundleError:
    with pytest.raises(BundleError) as info:
        inspect(data)
    return info.value


# -- packing ----------------------------------------------------------------------------------


def test_packing_is_canonical_whatever_the_file_times_and_creation_order(tmp_path: Path) -> None:
    first = write_bundle(tmp_path / "one", files())
    # The same content written in the opposite order, later, with other times and modes.
    second = tmp_path / "two"
    for rel, content in reversed(list(files().items())):
        time.sleep(0.01)
        write_bundle(second, {rel: content})
    os.utime(second / "agent.py", (1_000_000, 1_000_000))
    (second / "data" / "a.json").chmod(0o600)
    data = pack(first)
    assert pack(second) == data
    assert pack(first) == data
    assert digest_of(data) == "sha256:" + hashlib.sha256(data).hexdigest()

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert {m.mtime for m in members} == {0}
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}
    assert {m.mode for m in members if m.isfile()} == {0o644}


def test_any_change_of_content_makes_another_digest(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", files())
    before = digest_of(pack(root))
    (root / "prompt.md").write_text("You help, briefly.\n")
    assert digest_of(pack(root)) != before
    (root / "prompt.md").write_text("You help.\n")
    assert digest_of(pack(root)) == before
    (root / "agent.py").chmod(0o755)  # the executable bit is part of the bundle
    assert digest_of(pack(root)) != before


def test_caches_and_bytecode_are_left_out(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", files())
    clean = pack(root)
    write_bundle(
        root,
        {"__pycache__/agent.cpython-311.pyc": b"\0", "lib/x.pyc": b"\0", ".git/HEAD": "ref\n"},
    )
    assert pack(root) == clean


def test_links_inside_are_kept_and_links_outside_refused(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", files())
    (root / "lib" / "alias.py").symlink_to("util.py")
    (root / "data-link").symlink_to("data")
    with tarfile.open(fileobj=io.BytesIO(pack(root))) as tar:
        assert tar.getmember("lib/alias.py").linkname == "util.py"
        assert tar.getmember("data-link").issym()
        # A link to a directory is stored as a link, never followed.
        assert "data-link/a.json" not in tar.getnames()
    (root / "lib" / "escape").symlink_to("../../outside")
    with pytest.raises(BundleError) as info:
        pack(root)
    assert info.value.path == "lib/escape" and "outside the bundle" in info.value.description


def test_packing_needs_an_agent_toml_and_refuses_special_files(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no agent.toml"):
        pack(write_bundle(tmp_path / "empty", {"agent.py": CODE}))
    root = write_bundle(tmp_path / "b", files())
    os.mkfifo(root / "pipe")
    with pytest.raises(BundleError) as info:
        pack(root)
    assert info.value.path == "pipe"


# -- checking an upload -----------------------------------------------------------------------


def test_a_packed_bundle_passes_with_its_manifest(tmp_path: Path) -> None:
    data = pack(write_bundle(tmp_path / "b", files()))
    checked = inspect(data)
    assert checked.digest == digest_of(data) and checked.size == len(data)
    assert checked.manifest.name == "demo" and checked.manifest.prompt_file == "prompt.md"
    assert checked.manifest_text.startswith('name = "demo"')


def test_a_tar_made_by_the_tar_command_is_accepted() -> None:
    # `tar -C dir -cf - .` writes "./" before every name.
    dot = tarfile.TarInfo(".")
    dot.type = tarfile.DIRTYPE
    checked = inspect(tar_of(dot, ("./agent.toml", TOML), ("./agent.py", CODE.encode())))
    assert checked.manifest.entrypoint == "agent:app"


@pytest.mark.parametrize(
    ("entries", "path", "words"),
    [
        ((("../evil.py", b"x"),), "../evil.py", "'..' is not allowed"),
        ((("lib/../../evil.py", b"x"),), "lib/../../evil.py", "'..' is not allowed"),
        ((("/etc/evil", b"x"),), "/etc/evil", "absolute paths"),
        ((link("lib", "/etc"),), "lib", "points outside the bundle"),
        ((link("lib", "../../etc"),), "lib", "points outside the bundle"),
        ((link("deep/lib", "../.."),), "deep/lib", "points outside the bundle"),
        # Each link alone stays inside; the second escapes through the first.
        ((link("a", "."), link("b", "a/..")), "b", "through other links"),
        ((link("a", "b"), link("b", "a")), "a", "loop"),
        ((link("a", "."), ("a/evil.py", b"x")), "a/evil.py", "beneath the link"),
        ((link("hard", "agent.py", tarfile.LNKTYPE),), "hard", "hard links"),
        ((link("dev", "", tarfile.CHRTYPE),), "dev", "special files"),
        ((link("fifo", "", tarfile.FIFOTYPE),), "fifo", "special files"),
        ((("agent.py", b"again"),), "agent.py", "appears twice"),
    ],
)
def test_unsafe_entries_are_refused_naming_them(
    entries: tuple[tarfile.TarInfo | tuple[str, bytes], ...], path: str, words: str
) -> None:
    err = refused(tar_of(*BASE, *entries))
    assert err.path == path
    assert words in err.description


@pytest.mark.parametrize("blob", [b"", b"not a tar at all", b"\x1f\x8b\x08" + b"\0" * 600])
def test_what_is_not_a_tar_is_refused(blob: bytes) -> None:
    assert "not a tar archive" in str(refused(blob))


def test_a_tar_without_agent_toml_at_its_root_is_refused() -> None:
    err = refused(tar_of(("sub/agent.toml", TOML), ("agent.py", b"")))
    assert err.path == "agent.toml" and "no agent.toml" in err.description
    # A link named agent.toml is not a manifest.
    err = refused(tar_of(("real.toml", TOML), ("agent.py", b""), link("agent.toml", "real.toml")))
    assert err.path == "agent.toml"


def test_a_bad_manifest_is_reported_as_such() -> None:
    with pytest.raises(ManifestError) as info:
        inspect(tar_of(("agent.toml", b'name = "demo"\nentrypoint = "missing:app"\n')))
    assert info.value.field == "entrypoint"


def test_size_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    data = tar_of(*BASE, ("big.bin", b"x" * 5000))
    monkeypatch.setattr(bundle, "MAX_PACKED_BYTES", len(data) - 1)
    assert "the limit is" in str(refused(data))
    monkeypatch.setattr(bundle, "MAX_PACKED_BYTES", len(data))
    monkeypatch.setattr(bundle, "MAX_UNPACKED_BYTES", 4000)
    assert "unpacks to more than 4000 bytes" in str(refused(data))


# -- unpacking --------------------------------------------------------------------------------


def test_unpack_restores_the_directory(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "src", files())
    (root / "lib" / "alias.py").symlink_to("util.py")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    dest = tmp_path / "dest"
    unpack(pack(root), dest)
    for rel, content in files().items():
        assert (dest / rel).read_text() == content
    assert os.readlink(dest / "lib" / "alias.py") == "util.py"
    assert os.access(dest / "run.sh", os.X_OK)
    # Unpacked and packed again, it is the same bundle.
    assert pack(dest) == pack(root)


def test_unpack_refuses_an_unsafe_tar_and_writes_nothing_outside(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(BundleError):
        unpack(tar_of(*BASE, link("a", "."), link("b", "a/..")), dest)
    with pytest.raises(BundleError):
        unpack(tar_of(*BASE, ("../escaped.py", b"x")), dest)
    assert not (tmp_path / "escaped.py").exists()
    assert not dest.exists() or not any(dest.iterdir())
