"""The seccomp filter every bwrap sandbox runs under: allow by default, refuse the system calls
agent code never needs (debugging other processes, mounting, kernel modules, keyrings, eBPF,
namespaces, io_uring) and every socket family but AF_UNIX. Compiled once per variant with
libseccomp (pyseccomp) and handed to bwrap as classic BPF on a file descriptor
(`bwrap --seccomp FD`).

The variant for `protocol = "http"` agents also allows AF_INET/AF_INET6 sockets: the agent serves
AgentCore's contract on 127.0.0.1:8080 and the bridge beside it connects there. The sandbox's own
network namespace holds only `lo`, so those sockets reach nothing outside it."""

from __future__ import annotations

import errno
import functools
import os
import socket
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: a missing libseccomp must fail with a hint, not at import
    import pyseccomp

# Each is refused with EPERM. Grouped by what they would let an agent do.
DENIED: tuple[str, ...] = (
    # reading or steering another process
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    # changing the file system view (old and new mount APIs)
    "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount", "fspick",
    "move_mount", "open_tree", "mount_setattr",
    # the kernel itself
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "bpf", "perf_event_open", "syslog", "acct", "swapon", "swapoff", "reboot", "quotactl",
    "iopl", "ioperm", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "uselib", "vhangup",
    # keyrings
    "keyctl", "add_key", "request_key",
    # namespaces (bwrap already set them up; nothing inside may make or join more)
    "setns", "unshare",
    # io_uring runs socket and file operations that seccomp never sees
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # userfaultfd is the usual tool for widening kernel race windows
    "userfaultfd",
)

# clone(2) flags that would create a namespace (the same thing `unshare` does).
_CLONE_NEW = {
    "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000, "CLONE_NEWTIME": 0x00000080,
}


class SeccompUnavailable(RuntimeError):
    """pyseccomp or the system's libseccomp is missing."""


def _resolve(name: str) -> int:
    import pyseccomp as sc

    number = sc.resolve_syscall(sc.Arch.NATIVE, name)
    # libseccomp returns -1 (__NR_SCMP_ERROR) for a name it does not know at all; other
    # negative numbers are calls this architecture lacks, which it handles itself.
    if number == -1:
        raise ValueError(f"libseccomp does not know the system call {name!r}")
    return number


def socket_families(allow_inet: bool) -> frozenset[int]:
    """The address families socket(2) may create in a sandbox."""
    if allow_inet:
        return frozenset({socket.AF_UNIX, socket.AF_INET, socket.AF_INET6})
    return frozenset({socket.AF_UNIX})


def _refuse_other_families(f: pyseccomp.SyscallFilter, call: int, allowed: frozenset[int]) -> None:
    """EPERM for every first argument of `call` outside `allowed`. libseccomp cannot compare
    one argument twice in a rule, and rules are OR-ed: one rule per refused value below the
    highest allowed family, and one for everything above it."""
    import pyseccomp as sc

    eperm = sc.ERRNO(errno.EPERM)
    if len(allowed) == 1:
        (only,) = allowed
        f.add_rule(eperm, call, sc.Arg(0, sc.NE, only))
        return
    top = max(allowed)
    for family in range(top):
        if family not in allowed:
            f.add_rule(eperm, call, sc.Arg(0, sc.EQ, family))
    f.add_rule(eperm, call, sc.Arg(0, sc.GT, top))


@functools.cache
def filter_bpf(allow_inet: bool = False) -> bytes:
    """The filter as classic BPF, ready for `bwrap --seccomp`. Cached: a variant never changes.
    `allow_inet` is for http-protocol sandboxes only (see the module's docstring)."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as exc:  # OSError: libseccomp.so.2 missing
        raise SeccompUnavailable(
            f"the bwrap driver needs pyseccomp and libseccomp ({exc}); "
            "install pyseccomp==0.1.2 into the virtualenv and run scripts/setup-sandbox.sh"
        ) from exc

    f = sc.SyscallFilter(defaction=sc.ALLOW)
    # A system call made through another ABI (int 0x80 on x86-64) is not what this filter
    # inspects: end the process rather than let it through.
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    eperm = sc.ERRNO(errno.EPERM)
    for name in DENIED:
        f.add_rule(eperm, _resolve(name))
    # ENOSYS, not EPERM: glibc then falls back to clone(2), so threads and subprocesses work;
    # with EPERM Python cannot start a thread at all.
    f.add_rule(sc.ERRNO(errno.ENOSYS), _resolve("clone3"))
    clone = _resolve("clone")
    for flag in _CLONE_NEW.values():
        f.add_rule(eperm, clone, sc.Arg(0, sc.MASKED_EQ, flag, flag))
    # Unix sockets (and inet/inet6 for http agents, whose network namespace has only lo): no
    # raw or packet sockets, no netlink, and no AF_VSOCK, which network namespaces do not
    # isolate. socketpair(2) is Unix-only either way.
    _refuse_other_families(f, _resolve("socket"), socket_families(allow_inet))
    _refuse_other_families(f, _resolve("socketpair"), socket_families(False))

    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


def filter_fd(allow_inet: bool = False) -> int:
    """A fresh memfd holding the filter, positioned at its start; the caller passes it to
    bwrap (which reads it to the end) and closes its own copy after the spawn."""
    data = filter_bpf(allow_inet)
    fd = os.memfd_create("corral-seccomp", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
