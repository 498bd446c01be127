"""Kernelspecs for Enterprise Gateway that start kernels with egtunnel's launcher.

`python -m egtunnel kernelspec install --name NAME` writes NAME/kernel.json whose argv runs
`python -m egtunnel.launcher` with the placeholders EG substitutes at launch ({kernel_id},
{response_address}, {public_key}, {port_range}) and whose process proxy is one of egtunnel's
drop-ins. With tunneling on, the proxy tells that launcher to bind the kernel's ports on its host's
loopback; `--kernel-ip 0.0.0.0` writes a kernelspec whose kernels stay reachable from the network.
Pure Python, so it works wherever the package is installed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

__all__ = ["DEFAULT_CLASS_NAME", "KernelspecError", "install", "kernel_json", "kernels_dir", "register"]

DEFAULT_CLASS_NAME = "egtunnel.DistributedProcessProxy"
DEFAULT_DISPLAY_NAME = "Python 3 (egtunnel)"
LAUNCHER_MODULE = "egtunnel.launcher"

# Jupyter's own rule for kernel names (jupyter_client.kernelspec); they are matched case-insensitively.
_NAME = re.compile(r"^[a-z0-9._-]+$", re.IGNORECASE)
_CLASS_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
# EG joins argv with spaces into a remote shell command without quoting, so the interpreter path must
# be a single word that no shell reinterprets.
_SHELL_SAFE = re.compile(r"^[A-Za-z0-9_./+@%:,=~-]+$")


class KernelspecError(ValueError):
    """An input that cannot make a working kernelspec; the message says which and why."""


def _check_name(name: str) -> str:
    if not _NAME.match(name) or set(name) == {"."}:
        raise KernelspecError(
            f"invalid kernelspec name {name!r}: use letters, digits, '.', '_' and '-' (e.g. python_remote)"
        )
    return name.lower()


def _check_python(python: str) -> str:
    if not python or not _SHELL_SAFE.match(python):
        raise KernelspecError(
            f"invalid --python {python!r}: the gateway splices it unquoted into a shell command on the "
            "remote host, so it must be one word without spaces or shell characters"
        )
    if "/" in python and not python.startswith(("/", "~")):
        raise KernelspecError(
            f"invalid --python {python!r}: give an absolute path or a command name found on the remote "
            "host's PATH; a relative path would depend on the remote working directory"
        )
    return python


def _check_class_name(class_name: str) -> str:
    if not _CLASS_NAME.match(class_name):
        raise KernelspecError(
            f"invalid --class-name {class_name!r}: expected a dotted module.Class path such as {DEFAULT_CLASS_NAME}"
        )
    return class_name


def _check_kernel_ip(kernel_ip: str) -> str:
    try:
        return str(ipaddress.IPv4Address(kernel_ip))
    except ValueError:
        raise KernelspecError(
            f"invalid --kernel-ip {kernel_ip!r}: expected the IPv4 address the launcher binds the kernel's "
            "ports to with tunneling on, such as 127.0.0.1 (the default) or 0.0.0.0"
        ) from None


def kernel_json(
    python: str,
    display_name: str = DEFAULT_DISPLAY_NAME,
    class_name: str = DEFAULT_CLASS_NAME,
    kernel_ip: Optional[str] = None,
) -> dict[str, Any]:
    """The kernel.json content, after validating every input."""
    if not display_name.strip():
        raise KernelspecError("invalid --display-name: it must not be empty")
    proxy: dict[str, Any] = {"class_name": _check_class_name(class_name)}
    if kernel_ip is not None:
        proxy["config"] = {"kernel_ip": _check_kernel_ip(kernel_ip)}
    return {
        "display_name": display_name,
        "language": "python",
        "metadata": {"process_proxy": proxy},
        "argv": [
            _check_python(python),
            "-m",
            LAUNCHER_MODULE,
            "--RemoteProcessProxy.kernel-id",
            "{kernel_id}",
            "--RemoteProcessProxy.response-address",
            "{response_address}",
            "--RemoteProcessProxy.public-key",
            "{public_key}",
            "--RemoteProcessProxy.port-range",
            "{port_range}",
            "--RemoteProcessProxy.spark-context-initialization-mode",
            "none",
        ],
    }


def kernels_dir(prefix: Optional[str]) -> Path:
    """Where kernelspecs go: PREFIX/share/jupyter/kernels, or the user's Jupyter data directory."""
    if prefix is not None:
        return Path(prefix).expanduser() / "share" / "jupyter" / "kernels"
    try:
        from jupyter_core.paths import jupyter_data_dir
    except ImportError as exc:
        raise KernelspecError(
            "jupyter_core is not installed, so the Jupyter data directory is unknown: pass --prefix"
        ) from exc
    return Path(jupyter_data_dir()) / "kernels"


def install(
    name: str,
    prefix: Optional[str] = None,
    python: Optional[str] = None,
    display_name: str = DEFAULT_DISPLAY_NAME,
    class_name: str = DEFAULT_CLASS_NAME,
    kernel_ip: Optional[str] = None,
) -> Path:
    """Write NAME/kernel.json and return its path; an existing kernel.json there is replaced."""
    directory = kernels_dir(prefix) / _check_name(name)
    spec = kernel_json(python if python is not None else sys.executable, display_name, class_name, kernel_ip)
    if directory.exists() and not directory.is_dir():
        raise KernelspecError(f"cannot install into {directory}: it exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "kernel.json"
    partial = directory / ".kernel.json.tmp"
    partial.write_text(json.dumps(spec, indent=2) + "\n")
    # Replaced in one step, so a gateway reading kernelspecs never sees half a file.
    os.replace(partial, path)
    return path


# ---------------------------------------------------------------------------------------------
# Command line: the `kernelspec` subcommand of `python -m egtunnel`


def register(subcommands: Any) -> None:
    """Add `kernelspec install` to the subcommands of `python -m egtunnel`."""
    kernelspec = subcommands.add_parser("kernelspec", help="manage Enterprise Gateway kernelspecs")
    actions = kernelspec.add_subparsers(dest="action", required=True, metavar="ACTION")
    parser = actions.add_parser(
        "install",
        help="write a kernelspec that starts kernels with egtunnel's launcher",
        description="Write NAME/kernel.json for Enterprise Gateway: its argv runs "
        f"`PYTHON -m {LAUNCHER_MODULE}` with EG's launch placeholders, and its process proxy is CLASS.",
    )
    parser.add_argument("--name", required=True, help="kernelspec name (directory name)")
    parser.add_argument(
        "--prefix",
        help="install under PREFIX/share/jupyter/kernels (default: the user's Jupyter data directory)",
    )
    parser.add_argument(
        "--python",
        help="Python interpreter on the kernel hosts: an absolute path or a command on their PATH "
        "(default: the interpreter running this command)",
    )
    parser.add_argument("--display-name", default=DEFAULT_DISPLAY_NAME, help="name shown to users (default: %(default)s)")
    parser.add_argument(
        "--class-name",
        default=DEFAULT_CLASS_NAME,
        help="process proxy class for metadata.process_proxy.class_name (default: %(default)s)",
    )
    parser.add_argument(
        "--kernel-ip",
        help="where the launcher binds the kernel's ports with tunneling on (default: the host's loopback, "
        "127.0.0.1, which only the SSH server's forwards reach; 0.0.0.0 keeps them reachable from the network)",
    )
    parser.set_defaults(handler=_run_install, parser=parser)


def _run_install(args: argparse.Namespace) -> int:
    try:
        path = install(args.name, args.prefix, args.python, args.display_name, args.class_name, args.kernel_ip)
    except KernelspecError as exc:
        args.parser.error(str(exc))
    except OSError as exc:
        print(f"python -m egtunnel kernelspec install: cannot write the kernelspec: {exc}", file=sys.stderr)
        return 1
    print(f"Installed kernelspec {path.parent.name} in {path.parent}")
    return 0
