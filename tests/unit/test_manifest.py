"""agent.toml validation: what a valid manifest pins, and an error naming the field for each
mistake a user can make (listed in manifest_mistakes.toml)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from corral.manifest import (
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_LIFETIME_S,
    Manifest,
    ManifestError,
    Tool,
    declared_dependencies,
    parse_manifest,
    parse_requirements_txt,
)

FILES = {"agent.py", "prompt.md", "tools/lookup.json", "pkg/__init__.py"}

FULL = """
name = "progress-report"
entrypoint = "agent:app"
protocol = "corral"
description = "drafts notes"

[model]
provider = "openai"
id = "gpt-x"
params = { temperature = 0.2, max_tokens = 300 }

[prompt]
file = "prompt.md"

[[tools]]
name = "lookup"
schema = "tools/lookup.json"

[[tools]]
name = "search"

[retrieval]
index = "payer-guidelines"
digest = "sha256:abc"

[resources]
memory_mb = 256
cpu_seconds = 30
timeout_s = 60

[lifecycle]
idle_timeout_s = 60
max_lifetime_s = 3600
"""

MINIMAL = 'name = "a"\nentrypoint = "agent:app"\n'
MISTAKES = tomllib.loads(Path(__file__).with_name("manifest_mistakes.toml").read_text())["mistake"]
LIMITS = (
    "resources.memory_mb",
    "resources.cpu_seconds",
    "resources.timeout_s",
    "lifecycle.idle_timeout_s",
    "lifecycle.max_lifetime_s",
)


def parse(text: str) -> Manifest:
    return parse_manifest(text, has_file=lambda p: p in FILES)


def error(text: str) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        parse(text)
    return info.value


def test_a_full_manifest_pins_everything() -> None:
    m = parse_manifest(FULL, has_file=lambda p: p in FILES)
    assert (m.name, m.entrypoint, m.protocol) == ("progress-report", "agent:app", "corral")
    assert (m.model_provider, m.model_id) == ("openai", "gpt-x")
    assert dict(m.model_params) == {"temperature": 0.2, "max_tokens": 300}
    assert m.prompt_file == "prompt.md"
    assert m.tools == (Tool("lookup", "tools/lookup.json"), Tool("search", ""))
    assert (m.retrieval_index, m.retrieval_digest) == ("payer-guidelines", "sha256:abc")
    assert (m.memory_mb, m.cpu_seconds, m.timeout_s) == (256, 30, 60)
    assert (m.idle_timeout_s, m.max_lifetime_s) == (60, 3600)


def test_a_minimal_manifest_gets_the_documented_defaults() -> None:
    m = parse_manifest(MINIMAL, has_file=lambda p: p in FILES)
    assert m.protocol == "corral"
    assert (m.model_provider, m.model_id) == ("scripted", "scripted-1")
    assert m.prompt_file == "" and m.tools == ()
    assert (m.idle_timeout_s, m.max_lifetime_s) == (DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_LIFETIME_S)
    assert (m.memory_mb, m.cpu_seconds, m.timeout_s) == (512, 60, 900)


def test_a_package_entrypoint_is_found_by_its_init() -> None:
    m = parse('name = "a"\nentrypoint = "pkg:app"\n')
    assert m.entrypoint == "pkg:app"


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        (mistake.get("manifest") or MINIMAL + mistake["added"], mistake["field"], mistake["words"])
        for mistake in MISTAKES
    ]
    # Every limit refuses everything but a positive integer.
    + [
        (MINIMAL + "[{}]\n{} = {}\n".format(*limit.split("."), value), limit, "positive integer")
        for limit in LIMITS
        for value in ("0", "-1", '"60"', "true", "1.5")
    ],
)
def test_each_mistake_names_its_field(text: str, field: str, words: str) -> None:
    err = error(text)
    assert err.field == field
    assert words in err.description
    # The message a user reads names the file and the field.
    assert str(err).startswith(f"agent.toml: {field}: ")


# -- dependencies -----------------------------------------------------------------------------


def test_dependencies_are_kept_as_written() -> None:
    m = parse_manifest(
        'name = "a"\nentrypoint = "agent:app"\n'
        'dependencies = ["requests>=2.31", "tiny @ file:///tmp/tiny-1.0-py3-none-any.whl",'
        " \"tomli; python_version < '3.11'\"]\n",
        has_file=lambda p: p in FILES,
    )
    assert m.dependencies == (
        "requests>=2.31",
        "tiny @ file:///tmp/tiny-1.0-py3-none-any.whl",
        "tomli; python_version < '3.11'",
    )
    assert parse_manifest(MINIMAL, has_file=lambda p: p in FILES).dependencies == ()


def test_requirements_txt_lines_are_requirements() -> None:
    text = "# pinned\nrequests==2.31.0  # http\n\nattrs>=23 ; python_version >= '3.8'\n"
    assert parse_requirements_txt(text) == (
        "requests==2.31.0",
        "attrs>=23 ; python_version >= '3.8'",
    )


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("requests\n-r other.txt\n", "requirements.txt:2", "pip option '-r' is not supported"),
        ("--index-url https://x\n", "requirements.txt:1", "'--index-url'"),
        ("ok\n./local/path\n", "requirements.txt:2", "not a PEP 508 requirement"),
    ],
)
def test_a_bad_requirements_txt_names_its_line(text: str, field: str, words: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_requirements_txt(text)
    assert info.value.field == field and words in info.value.description
    assert str(info.value).startswith(f"{field}: ")  # not "agent.toml: ..."


def test_dependencies_come_from_agent_toml_or_requirements_txt_not_both() -> None:
    declared = parse(MINIMAL + 'dependencies = ["requests"]\n')
    plain = parse(MINIMAL)
    assert declared_dependencies(declared, None) == ("requests",)
    assert declared_dependencies(plain, "attrs\n") == ("attrs",)
    assert declared_dependencies(plain, None) == ()
    with pytest.raises(ManifestError) as info:
        declared_dependencies(declared, "attrs\n")
    assert info.value.field == "dependencies" and "keep one" in info.value.description
