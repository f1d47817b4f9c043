"""agent.toml: parsing and validation, with errors that name the field."""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
ENTRYPOINT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")
PROTOCOLS = ("corral", "http")
PROVIDERS = ("scripted", "openai")
DEFAULT_IDLE_TIMEOUT_S = 900
DEFAULT_MAX_LIFETIME_S = 28_800
REQUIREMENTS_FILE = "requirements.txt"


class ManifestError(ValueError):
    """agent.toml is wrong; `field` is the dotted path of the offending key (or, for
    requirements.txt, `requirements.txt:LINE`)."""

    def __init__(self, field: str, description: str) -> None:
        where = field if field.startswith(REQUIREMENTS_FILE) else f"agent.toml: {field}"
        super().__init__(f"{where}: {description}")
        self.field = field
        self.description = description


@dataclass(frozen=True)
class Tool:
    name: str
    schema: str


@dataclass(frozen=True)
class Manifest:
    name: str
    entrypoint: str
    protocol: str = "corral"
    model_provider: str = "scripted"
    model_id: str = "scripted-1"
    model_params: Mapping[str, Any] = field(default_factory=dict)
    prompt_file: str = ""
    tools: tuple[Tool, ...] = ()
    retrieval_index: str = ""
    retrieval_digest: str = ""
    memory_mb: int = 512
    cpu_seconds: int = 60
    timeout_s: int = 900
    idle_timeout_s: int = DEFAULT_IDLE_TIMEOUT_S
    max_lifetime_s: int = DEFAULT_MAX_LIFETIME_S
    # PEP 508 strings, as written; `corral publish` installs them into the bundle's deps/.
    dependencies: tuple[str, ...] = ()


_TOP = {"name", "entrypoint", "protocol", "description", "model", "prompt", "tools", "retrieval",
        "resources", "lifecycle", "dependencies"}


def _table(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ManifestError(key, "must be a table ([" + key + "])")
    return value


def _check_keys(table: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
    for key in table:
        if key not in allowed:
            where = f"{prefix}.{key}" if prefix else key
            raise ManifestError(where, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _str(table: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str:
    if key not in table:
        if default is None:
            raise ManifestError(path, "is required")
        return default
    value = table[key]
    if not isinstance(value, str) or not value:
        raise ManifestError(path, "must be a non-empty string")
    return value


def _positive_int(table: Mapping[str, Any], key: str, path: str, default: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ManifestError(path, f"must be a positive integer, got {value!r}")
    return value


def _check_json_values(value: Any, path: str) -> None:
    """Model params are stored and sent as JSON: TOML dates and non-finite floats have no JSON form."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_json_values(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json_values(item, f"{path}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ManifestError(path, f"{value} is not a finite number")
    elif not isinstance(value, (str, int, float, bool)):
        raise ManifestError(
            path, f"a {type(value).__name__} is not allowed; use a string, number, boolean, array or table"
        )


def _requirement(text: str, where: str) -> str:
    try:
        Requirement(text)
    except InvalidRequirement as exc:
        # packaging's message spans lines (it points at the column); the first line says what.
        reason = str(exc).splitlines()[0]
        raise ManifestError(where, f"{text!r} is not a PEP 508 requirement: {reason}") from None
    return text


def _dependencies(doc: Mapping[str, Any]) -> tuple[str, ...]:
    raw = doc.get("dependencies", [])
    if not isinstance(raw, list):
        raise ManifestError("dependencies", 'must be an array of strings, like ["requests>=2.31"]')
    for i, item in enumerate(raw):
        if not isinstance(item, str) or not item.strip():
            raise ManifestError(f"dependencies[{i}]", "must be a non-empty string")
    return tuple(_requirement(item.strip(), f"dependencies[{i}]") for i, item in enumerate(raw))


def parse_requirements_txt(text: str) -> tuple[str, ...]:
    """The requirements in a requirements.txt: one PEP 508 string a line, `#` comments. pip
    options (-r, -e, --index-url) are refused: the bundle must say what it holds, and an index
    belongs to the publisher's pip configuration (PIP_INDEX_URL), not the agent."""
    out: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        where = f"{REQUIREMENTS_FILE}:{number}"
        if line.startswith("-"):
            option = line.split()[0]
            raise ManifestError(
                where, f"pip option {option!r} is not supported; list requirements only"
            )
        out.append(_requirement(line, where))
    return tuple(out)


def declared_dependencies(manifest: Manifest, requirements_txt: str | None) -> tuple[str, ...]:
    """What the agent imports: agent.toml's `dependencies` or requirements.txt beside it. Both
    is refused, since one would silently lose."""
    if requirements_txt is None:
        return manifest.dependencies
    if manifest.dependencies:
        raise ManifestError(
            "dependencies", f"declared here and in {REQUIREMENTS_FILE}; keep one of the two"
        )
    return parse_requirements_txt(requirements_txt)


def parse_manifest(text: str, has_file: Callable[[str], bool] = lambda _: True) -> Manifest:
    """Parses agent.toml; `has_file` tells whether a path exists in the bundle."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError("(file)", f"not valid TOML: {exc}") from None
    _check_keys(doc, _TOP, "")
    name = _str(doc, "name", "name")
    if not NAME_RE.match(name):
        raise ManifestError("name", f"{name!r} must be 1-63 lowercase letters, digits or '-'")
    protocol = _str(doc, "protocol", "protocol", "corral")
    if protocol not in PROTOCOLS:
        raise ManifestError("protocol", f"{protocol!r} is not one of {', '.join(PROTOCOLS)}")
    entrypoint = _str(doc, "entrypoint", "entrypoint")
    if not ENTRYPOINT_RE.match(entrypoint):
        raise ManifestError("entrypoint", f"{entrypoint!r} must look like module:attribute")
    module_path = entrypoint.split(":")[0].replace(".", "/")
    if not (has_file(module_path + ".py") or has_file(module_path + "/__init__.py")):
        raise ManifestError("entrypoint", f"module {module_path}.py is not in the bundle")

    model = _table(doc, "model")
    _check_keys(model, {"provider", "id", "params"}, "model")
    provider = _str(model, "provider", "model.provider", "scripted")
    if provider not in PROVIDERS:
        raise ManifestError("model.provider", f"{provider!r} is not one of {', '.join(PROVIDERS)}")
    params = model.get("params", {})
    if not isinstance(params, dict):
        raise ManifestError("model.params", "must be a table")
    _check_json_values(params, "model.params")

    prompt = _table(doc, "prompt")
    _check_keys(prompt, {"file"}, "prompt")
    prompt_file = _str(prompt, "file", "prompt.file", "")
    if prompt_file and not has_file(prompt_file):
        raise ManifestError("prompt.file", f"{prompt_file!r} is not in the bundle")

    raw_tools = doc.get("tools", [])
    if not isinstance(raw_tools, list):
        raise ManifestError("tools", "must be an array of tables ([[tools]])")
    tools: list[Tool] = []
    for i, raw in enumerate(raw_tools):
        if not isinstance(raw, dict):
            raise ManifestError(f"tools[{i}]", "must be a table")
        _check_keys(raw, {"name", "schema"}, f"tools[{i}]")
        tool = Tool(_str(raw, "name", f"tools[{i}].name"), _str(raw, "schema", f"tools[{i}].schema", ""))
        if tool.schema and not has_file(tool.schema):
            raise ManifestError(f"tools[{i}].schema", f"{tool.schema!r} is not in the bundle")
        if any(t.name == tool.name for t in tools):
            raise ManifestError(f"tools[{i}].name", f"{tool.name!r} is declared twice")
        tools.append(tool)

    retrieval = _table(doc, "retrieval")
    _check_keys(retrieval, {"index", "digest"}, "retrieval")
    resources = _table(doc, "resources")
    _check_keys(resources, {"memory_mb", "cpu_seconds", "timeout_s"}, "resources")
    lifecycle = _table(doc, "lifecycle")
    _check_keys(lifecycle, {"idle_timeout_s", "max_lifetime_s"}, "lifecycle")
    idle = _positive_int(lifecycle, "idle_timeout_s", "lifecycle.idle_timeout_s", DEFAULT_IDLE_TIMEOUT_S)
    lifetime = _positive_int(
        lifecycle, "max_lifetime_s", "lifecycle.max_lifetime_s", DEFAULT_MAX_LIFETIME_S
    )
    if idle > lifetime:
        raise ManifestError("lifecycle.idle_timeout_s", "must not exceed lifecycle.max_lifetime_s")
    return Manifest(
        name=name,
        entrypoint=entrypoint,
        protocol=protocol,
        model_provider=provider,
        model_id=_str(model, "id", "model.id", "scripted-1"),
        model_params=params,
        prompt_file=prompt_file,
        tools=tuple(tools),
        retrieval_index=_str(retrieval, "index", "retrieval.index", ""),
        retrieval_digest=_str(retrieval, "digest", "retrieval.digest", ""),
        memory_mb=_positive_int(resources, "memory_mb", "resources.memory_mb", 512),
        cpu_seconds=_positive_int(resources, "cpu_seconds", "resources.cpu_seconds", 60),
        timeout_s=_positive_int(resources, "timeout_s", "resources.timeout_s", 900),
        idle_timeout_s=idle,
        max_lifetime_s=lifetime,
        dependencies=_dependencies(doc),
    )
