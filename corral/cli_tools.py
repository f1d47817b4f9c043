"""The tools commands' old import path, kept only while tests/integration/test_tools.py imports
`tools` from here; they live in corral.cli.tools."""

from corral.cli.tools import tools

__all__ = ["tools"]
