"""Bundles: canonical packing (the same directory always makes the same bytes, so the same
digest), and the checks every uploaded tar passes before it is stored or unpacked."""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from corral import bundle
from corral.bundle import (
    BundleError,
    BundleLimits,
    BundleTooLarge,
    Target,
    digest_of,
    inspect,
    pack,
    stage,
    unpack,
    unpacked_size,
)
from corral.cli import cli, publishing
from corral.manifest import ManifestError
from tests.bundles import SAYS_HI, agent_files, build_wheel, link, tar_of, write_bundle

TOML = b'name = "demo"\nentrypoint = "agent:app"\n'


def files() -> dict[str, str]:
    return {**agent_files("demo", SAYS_HI), "lib/util.py": "X = 1\n", "data/a.json": "{}"}


BASE = (("agent.toml", TOML), ("agent.py", SAYS_HI.encode()))


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
        pack(write_bundle(tmp_path / "empty", {"agent.py": SAYS_HI}))
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
    checked = inspect(tar_of(dot, ("./agent.toml", TOML), ("./agent.py", SAYS_HI.encode())))
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


# -- sizes ------------------------------------------------------------------------------------


def test_the_limits_are_agentcores() -> None:
    assert bundle.LIMITS == BundleLimits(250 * 1024 * 1024, 750 * 1024 * 1024)


def test_the_unpacked_size_is_read_from_the_headers() -> None:
    data = tar_of(*BASE, ("big.bin", b"x" * 5000), link("alias", "big.bin"))
    assert unpacked_size(data) == len(TOML) + len(SAYS_HI) + 5000
    with pytest.raises(BundleError, match="not a tar archive"):
        unpacked_size(b"not a tar")


def test_a_bundle_over_either_limit_is_refused_giving_sizes_and_limits() -> None:
    data = tar_of(*BASE, ("big.bin", b"x" * 5000))
    unpacked = unpacked_size(data)
    inspect(data, BundleLimits(packed_bytes=len(data), unpacked_bytes=unpacked))

    with pytest.raises(BundleTooLarge) as info:
        inspect(data, BundleLimits(packed_bytes=len(data) - 1, unpacked_bytes=10**9))
    assert (info.value.packed, info.value.unpacked) == (len(data), unpacked)
    message = str(info.value)
    assert f"{len(data):,} bytes packed and {unpacked:,} bytes unpacked" in message
    assert f"the limit is {len(data) - 1:,} bytes packed" in message

    with pytest.raises(BundleTooLarge) as info:
        inspect(data, BundleLimits(packed_bytes=10**9, unpacked_bytes=4000))
    assert "the limit is" in str(info.value) and "4,000 bytes unpacked" in str(info.value)


def test_large_sizes_read_in_megabytes() -> None:
    error = BundleTooLarge(300 * 1024 * 1024, 900 * 1024 * 1024, bundle.LIMITS)
    assert "300.0 MB packed and 900.0 MB unpacked" in str(error)
    assert "the limit is 250.0 MB packed and 750.0 MB unpacked" in str(error)


def test_unpack_refuses_a_bundle_too_large_before_writing_anything(tmp_path: Path) -> None:
    data = tar_of(*BASE, ("big.bin", b"x" * 5000))
    dest = tmp_path / "dest"
    with pytest.raises(BundleTooLarge):
        unpack(data, dest, BundleLimits(packed_bytes=10**9, unpacked_bytes=5000))
    assert not dest.exists()
    unpack(data, dest, BundleLimits(packed_bytes=10**9, unpacked_bytes=6000))
    assert (dest / "big.bin").stat().st_size == 5000


def test_publish_refuses_a_bundle_too_large_before_uploading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_bundle(tmp_path / "b", files())
    monkeypatch.setattr(publishing, "LIMITS", BundleLimits(packed_bytes=1000, unpacked_bytes=10**9))
    # No platform is running: the refusal must come before any connection is attempted.
    monkeypatch.setenv("CORRAL_REGISTRY_ADDR", "127.0.0.1:1")
    result = CliRunner().invoke(cli, ["publish", str(root)])
    assert result.exit_code == 1, result.output
    assert "bytes packed" in result.output and "the limit is 1,000 bytes packed" in result.output


# -- unpacking --------------------------------------------------------------------------------


@pytest.fixture(params=["data filter", "without it"])
def tar_filter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unpacking with tarfile's 'data' filter, and on a Python that lacks it (Debian 12's 3.11.2,
    the container image's), where unpack applies the same rules itself."""
    if request.param == "without it":
        monkeypatch.delattr(tarfile, "data_filter")


@pytest.mark.usefixtures("tar_filter")
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


@pytest.mark.usefixtures("tar_filter")
def test_unpack_gives_no_setuid_or_group_writable_file_and_no_owner_from_the_tar(
    tmp_path: Path,
) -> None:
    tool = tarfile.TarInfo("tool.sh")  # empty
    tool.mode, tool.uid, tool.gid = 0o6777, 4242, 4242
    unpack(tar_of(*BASE, tool), tmp_path / "dest")
    written = (tmp_path / "dest" / "tool.sh").stat()
    assert written.st_mode & 0o7777 == 0o755
    assert (written.st_uid, written.st_gid) == (os.getuid(), os.getgid())


@pytest.mark.usefixtures("tar_filter")
def test_unpack_refuses_an_unsafe_tar_and_writes_nothing_outside(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(BundleError):
        unpack(tar_of(*BASE, link("a", "."), link("b", "a/..")), dest)
    with pytest.raises(BundleError):
        unpack(tar_of(*BASE, ("../escaped.py", b"x")), dest)
    assert not (tmp_path / "escaped.py").exists()
    assert not dest.exists() or not any(dest.iterdir())


# -- vendored dependencies ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    code = 'GREETING = "hi"\ndef main(): pass\n'
    return build_wheel(tmp_path_factory.mktemp("wheel"), "tinydep", code)


@pytest.fixture(autouse=True)
def no_index(monkeypatch: pytest.MonkeyPatch) -> None:
    # pip installs only from the local wheel: a unit test opens no socket.
    monkeypatch.setenv("PIP_NO_INDEX", "1")


def agent_with(tmp_path: Path, toml_extra: str, **extra: str) -> Path:
    root = write_bundle(tmp_path / "src", files())
    # Top-level keys go before agent.toml's first table.
    (root / "agent.toml").write_text(toml_extra + (root / "agent.toml").read_text())
    return write_bundle(root, extra)


def staged(source: Path, workdir: Path, lines: list[str] | None = None) -> Path:
    workdir.mkdir(parents=True)
    return stage(source, workdir, Target.current(), (lines if lines is not None else []).append)


def test_declared_dependencies_are_installed_into_deps_of_a_copy(
    tmp_path: Path, tiny_wheel: Path
) -> None:
    source = agent_with(tmp_path, f'dependencies = ["tinydep @ {tiny_wheel.as_uri()}"]\n')
    before = sorted(p.relative_to(source) for p in source.rglob("*"))
    lines: list[str] = []
    root = staged(source, tmp_path / "work", lines)
    assert root != source
    assert (root / "deps" / "tinydep" / "__init__.py").read_text().startswith('GREETING = "hi"')
    assert sorted(p.relative_to(source) for p in source.rglob("*")) == before  # source untouched
    assert lines == [
        f"vendoring 1 dependency from agent.toml for {Target.current().describe()}..."]
    with tarfile.open(fileobj=io.BytesIO(pack(root))) as tar:
        names = tar.getnames()
    assert "deps/tinydep/__init__.py" in names and "agent.py" in names


def test_vendored_dependencies_pack_to_the_same_digest_every_time(
    tmp_path: Path, tiny_wheel: Path
) -> None:
    source = agent_with(tmp_path, f'dependencies = ["tinydep @ {tiny_wheel.as_uri()}"]\n')
    first = staged(source, tmp_path / "one")
    second = staged(source, tmp_path / "elsewhere" / "two")
    assert digest_of(pack(first)) == digest_of(pack(second))
    deps = first / "deps"
    # What pip writes that depends on the install (paths, hashes, this machine's interpreter).
    info = next(deps.glob("tinydep-1.0.dist-info"))
    assert {"RECORD", "INSTALLER", "direct_url.json"}.isdisjoint(p.name for p in info.iterdir())
    assert not (deps / "bin").exists() and not list(deps.rglob("__pycache__"))


def test_requirements_txt_is_read_like_dependencies(tmp_path: Path, tiny_wheel: Path) -> None:
    requirements = f"# vendored\ntinydep @ {tiny_wheel.as_uri()}\n"
    source = agent_with(tmp_path, "", **{"requirements.txt": requirements})
    assert (staged(source, tmp_path / "work") / "deps" / "tinydep").is_dir()


def test_without_dependencies_the_source_is_packed_as_it_is(tmp_path: Path) -> None:
    source = agent_with(tmp_path, "")
    assert staged(source, tmp_path / "work") == source.resolve()
    assert not (tmp_path / "work" / "bundle").exists()


def test_a_deps_folder_of_its_own_and_declared_dependencies_are_refused(tmp_path: Path) -> None:
    source = agent_with(tmp_path, 'dependencies = ["tinydep"]\n', **{"deps/x.py": ""})
    with pytest.raises(BundleError) as info:
        staged(source, tmp_path / "work")
    assert info.value.path == "deps"
    assert "remove the folder or the declaration" in info.value.description


def test_dependencies_declared_twice_are_refused(tmp_path: Path) -> None:
    declared = 'dependencies = ["tinydep"]\n'
    source = agent_with(tmp_path, declared, **{"requirements.txt": "tinydep\n"})
    with pytest.raises(ManifestError) as info:
        staged(source, tmp_path / "work")
    assert info.value.field == "dependencies" and "requirements.txt" in info.value.description


def test_pip_failing_is_reported_with_its_error(tmp_path: Path) -> None:
    source = agent_with(tmp_path, 'dependencies = ["no-such-package-corral==1.0"]\n')
    with pytest.raises(BundleError) as info:
        staged(source, tmp_path / "work")
    assert info.value.path == "deps"
    assert "pip could not install" in info.value.description
    assert "no-such-package-corral" in info.value.description  # pip's own words follow


def test_the_target_is_passed_to_pip() -> None:
    target = Target("3.12", ("manylinux2014_x86_64", "linux_x86_64"))
    assert target.pip_args() == [
        "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
        "--abi", "cp312", "--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64",
    ]
    assert target.describe() == "cp312 manylinux2014_x86_64 (+1 compatible platform tags)"
    current = Target.current()
    assert current.python_version == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert current.platforms and "any" not in current.platforms
