"""The seccomp filter every bwrap sandbox runs under: allow by default, refuse the system calls
agent code never needs (debugging other processes, mounting, kernel modules, keyrings, eBPF,
namespaces, io_uring) and every socket family but AF_UNIX. Compiled once with libseccomp
(pyseccomp) and handed to bwrap as classic BPF on a file descriptor (`bwrap --seccomp FD`)."""

from __future__ import annotations

import errno
import functools
import os
import socket
import tempfile

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


def _resolve(pyseccomp: object, name: str) -> int:
    number: int = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)  # type: ignore[attr-defined]
    # libseccomp returns -1 (__NR_SCMP_ERROR) for a name it does not know at all; other
    # negative numbers are calls this architecture lacks, which it handles itself.
    if number == -1:
        raise ValueError(f"libseccomp does not know the system call {name!r}")
    return number


@functools.cache
def filter_bpf() -> bytes:
    """The filter as classic BPF, ready for `bwrap --seccomp`. Cached: it never changes."""
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
        f.add_rule(eperm, _resolve(sc, name))
    # ENOSYS, not EPERM: glibc then falls back to clone(2), so threads and subprocesses work;
    # with EPERM Python cannot start a thread at all.
    f.add_rule(sc.ERRNO(errno.ENOSYS), _resolve(sc, "clone3"))
    clone = _resolve(sc, "clone")
    for flag in _CLONE_NEW.values():
        f.add_rule(eperm, clone, sc.Arg(0, sc.MASKED_EQ, flag, flag))
    # Only Unix sockets: no inet/inet6 (the network namespace already has only lo), no raw or
    # packet sockets, no netlink, and no AF_VSOCK, which network namespaces do not isolate.
    for call in ("socket", "socketpair"):
        f.add_rule(eperm, _resolve(sc, call), sc.Arg(0, sc.NE, socket.AF_UNIX))

    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


def filter_fd() -> int:
    """A fresh memfd holding the filter, positioned at its start; the caller passes it to
    bwrap (which reads it to the end) and closes its own copy after the spawn."""
    data = filter_bpf()
    fd = os.memfd_create("corral-seccomp", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
