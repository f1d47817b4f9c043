"""Installs the agents' runtime (services/executor/runtime.py): the interpreter, standard library
and corral.sdk the bwrap and gvisor sandboxes run, under /opt/corral-runtime (CORRAL_RUNTIME_ROOT).
Idempotent: a second run only checks that it is there. Run by `make run` and `make test` after
the protos are generated; needs root (or a writable CORRAL_RUNTIME_ROOT). Always exits 0: without
it the sandbox drivers refuse to start and say how to install it, and their tests skip."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from services.executor import runtime


def main() -> None:
    root = runtime.ROOT
    if not os.access(root if root.exists() else root.parent, os.W_OK):
        if runtime.installed(root) is None:
            print(f"runtime: cannot write {root}; run `.venv/bin/python scripts/setup_runtime.py` "
                  "as root (or set CORRAL_RUNTIME_ROOT); the sandbox drivers refuse to start "
                  "until then", file=sys.stderr)
        return
    try:
        runtime.install(root, say=lambda line: print(line, file=sys.stderr))
    except (OSError, RuntimeError) as exc:
        print(f"runtime: could not install the agents' runtime into {root}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
