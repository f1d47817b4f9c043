"""Python files that do not compile, found before publishing: a typo saved in an editor should
leave the dev endpoint on the last version that could start, not move it to one that cannot."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def syntax_error(root: Path, paths: Iterable[str]) -> str | None:
    """The first of `paths` (relative to `root`) ending in .py that does not compile, as
    `path:line: message`, or None when they all do."""
    for path in sorted(p for p in paths if p.endswith(".py")):
        try:
            compile((root / path).read_bytes(), path, "exec", dont_inherit=True)
        except SyntaxError as exc:
            return f"{path}:{exc.lineno or 0}: {exc.msg}"
        except ValueError as exc:  # null bytes in the source
            return f"{path}: {exc}"
    return None
