"""The part of pyseccomp 0.1.2 (ctypes bindings to libseccomp) that Corral's seccomp filter uses."""

from typing import IO, Any, overload

ALLOW: int
KILL_PROCESS: int
NE: int
EQ: int
GT: int
MASKED_EQ: int

def ERRNO(x: int) -> int: ...

class Arch:
    NATIVE: int

class Attr:
    ACT_BADARCH: int

class Arg:
    def __init__(self, arg: int, op: int, data_a: int, data_b: int = 0) -> None: ...

class SyscallFilter:
    def __init__(self, defaction: int) -> None: ...
    def set_attr(self, attr: int, value: int) -> None: ...
    def add_rule(self, action: int, syscall: int | str, *args: Arg) -> None: ...
    def export_bpf(self, file: IO[Any]) -> None: ...

@overload
def resolve_syscall(arch: int, syscall: int) -> bytes: ...
@overload
def resolve_syscall(arch: int, syscall: str) -> int: ...
