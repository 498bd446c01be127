"""The launcher's error: a launch that cannot proceed, logged as one line in the kernel log before exiting 1."""

from __future__ import annotations


class LaunchError(RuntimeError):
    """The launch cannot proceed; the message says why in terms of the launcher's inputs."""
