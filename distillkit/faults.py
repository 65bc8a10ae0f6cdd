"""Fault injection for the crash-safety tests, off unless DISTILLKIT_FAULT names a point.

``DISTILLKIT_FAULT=<point>`` kills the process with SIGKILL there, as the OOM killer would;
``<SIGNAL>:<point>`` sends that signal instead (a scheduler's pre-emption notice, e.g.
``SIGTERM:after-step-3``); ``ENOSPC:<point>`` raises the OSError a full disk raises there.
With DISTILLKIT_FAULT_RANK=<r>, only the process of that rank (torchrun's RANK) fails.
A leaf module, so that every layer that writes files can name its points.
"""

from __future__ import annotations

import errno
import os
import signal


def fault_active(name: str) -> bool:
    return os.environ.get("DISTILLKIT_FAULT") == name


def fault_point(name: str, path: object = None) -> None:
    kind, _, point = os.environ.get("DISTILLKIT_FAULT", "").rpartition(":")
    if point != name:
        return
    only = os.environ.get("DISTILLKIT_FAULT_RANK")
    if only is not None and only != os.environ.get("RANK", "0"):
        return
    if kind == "ENOSPC":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path or name))
    os.kill(os.getpid(), getattr(signal, kind or "SIGKILL"))
