"""Process limits nswatch needs: enough file descriptors for every namespace it watches."""

from __future__ import annotations

import contextlib
import resource


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (soft, hard) as they are now.

    Each watched namespace costs a netlink socket (and, for a namespace no
    file holds, a pidfd on its holder). The usual soft limit of 1,024 runs
    out near a thousand namespaces, while the hard limit (systemd's
    ``LimitNOFILE=``, or the kernel's ``fs.nr_open``) is far higher. Python
    uses ``poll``/``epoll`` here, never ``select``, so a high limit is safe.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft < hard:
        target = hard
        if hard == resource.RLIM_INFINITY:
            # "unlimited" is not a valid soft value for NOFILE: use nr_open.
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        if soft != target:
            # Under a seccomp filter without @resources (the systemd unit)
            # this fails with EPERM; LimitNOFILE= has set both there.
            with contextlib.suppress(OSError, ValueError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)
