"""`make demo`: a real Enterprise Gateway whose kernel tunnels are egtunnel's, end to end on one machine.

It starts a throwaway OpenSSH server on a free loopback port (its own keys, no root needed), a real
Enterprise Gateway 3.3 with tunneling on, a culling timeout and a kernelspec whose process proxy is
egtunnel.DistributedProcessProxy, starts a kernel through the REST API, runs a cell over the websocket,
and prints the kernel's six tunnels as the live objects inside the gateway report them, and how many
`ssh` processes the gateway runs (none). Then it stops everything it started.

    DEMO_KEEP=1   keep the gateway and its kernel running until Ctrl-C, and print how to use them
    DEMO_CULL     the gateway's culling timeout in seconds (default 600); keep-alive follows it
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The test harness owns the SSH server and gateway plumbing; the demo reuses it rather than copy it.
sys.path.insert(0, str(REPO / "tests"))

import harness  # noqa: E402
from harness import procs  # noqa: E402
from e2e.gateway import Gateway, GatewayConfig, GatewayStartError, KernelSpecDef  # noqa: E402

KERNELSPEC = "egtunnel-demo"
CHANNEL_ORDER = ("SHELL", "IOPUB", "STDIN", "HB", "CONTROL", "EG_COMM")


def _missing_prerequisite() -> str | None:
    reason = harness.sshd_unavailable_reason()
    if reason:
        return (
            f"The demo needs OpenSSH's server program to run a throwaway sshd on a free loopback port: "
            f"{reason}.\n"
            "Install the package (the system's ssh service does not need to be enabled or running):\n"
            "  Debian/Ubuntu:  sudo apt-get install openssh-server\n"
            "  Fedora/RHEL:    sudo dnf install openssh-server\n"
            "  Alpine:         sudo apk add openssh-server\n"
            "then run `make demo` again."
        )
    try:
        import egtunnel  # noqa: F401
        import egtunnel.proxy  # noqa: F401
    except ImportError as exc:
        return f"egtunnel is not importable ({exc}); `make demo` builds it first, or run `make build`."
    return None


def _interval(seconds: int) -> str:
    if seconds >= 365 * 24 * 3600:
        return f"{seconds} s (~{seconds // (365 * 24 * 3600)} y)"
    return f"{seconds} s"


def _table(status: dict, kernel_id: str) -> str:
    tunnels = status["kernels"][kernel_id]["tunnels"]
    rows = [("channel", "local port -> remote", "keep-alive", "alive")]
    for channel in CHANNEL_ORDER:
        t = tunnels.get(channel)
        if t is None:
            rows.append((channel, "(none)", "", ""))
            continue
        rows.append((
            channel,
            f"127.0.0.1:{t.get('local_port')} -> {t.get('remote_host')}:{t.get('remote_port')}",
            _interval(int(t.get("keep_alive_interval", 0))),
            "yes" if t.get("is_alive") else "NO",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _keep_running(gateway: Gateway, kernel_id: str, workdir: Path) -> None:
    connection_file = gateway.connection_file(kernel_id, workdir / f"kernel-{kernel_id}.json")
    print(f"""
The gateway keeps running at {gateway.url} (Ctrl-C stops it, its kernels and the SSH server).

  JupyterLab (or Notebook 7 / Jupyter Server) with the gateway's kernels:
      jupyter lab --gateway-url={gateway.url}
    and pick the kernel "{KERNELSPEC}"; its log is {gateway.log_path}

  jupyter console on the demo kernel, straight through egtunnel's tunnels:
      jupyter console --existing {connection_file}

  The live tunnels as the gateway holds them:
      curl {gateway.url}/egtunnel/status
""")
    stop: list[int] = []
    # Also when started in the background, where SIGINT arrives ignored and would never interrupt.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    while not stop and gateway.alive():
        time.sleep(0.5)
    if not gateway.alive():
        print(f"The gateway exited; its log is {gateway.log_path}")


def main() -> int:
    problem = _missing_prerequisite()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    keep = os.environ.get("DEMO_KEEP", "") not in ("", "0")
    cull = int(os.environ.get("DEMO_CULL", "600"))
    workdir = Path(tempfile.mkdtemp(prefix="egtunnel-demo-"))
    failed = False
    sshd = harness.SshServer(workdir=workdir / "sshd", log_level="VERBOSE")
    gateway = None
    client = None
    try:
        sshd.start()
        print(f"sshd:     {sshd.user}@127.0.0.1:{sshd.port} (throwaway keys in {sshd.dir})")
        gateway = Gateway(workdir / "gateway", GatewayConfig(
            remote_hosts=["127.0.0.1"],
            ssh_port=sshd.port,
            response_ip="127.0.0.1",
            identity_file=sshd.identity_file,
            known_hosts=sshd.known_hosts,
            remote_user=sshd.user,
            tunneling=True,
            cull_idle_timeout=cull,
            kernelspecs=[KernelSpecDef(KERNELSPEC, display_name="Python 3 (egtunnel demo)")],
            log_level="INFO",
        ))
        gateway.start()
        print(f"gateway:  {gateway.url} (Enterprise Gateway, EG_ENABLE_TUNNELING=True, "
              f"cull_idle_timeout={cull} s, pid {gateway.pid})")
        client = gateway.client()
        kernel = client.start_kernel(KERNELSPEC)
        print(f"kernel:   {kernel.id} started in {kernel.start_seconds:.2f} s")
        cell = kernel.execute("import os, sys; print(f'hello from pid {os.getpid()}, Python {sys.version.split()[0]}')")
        if cell.status != "ok":
            raise RuntimeError(f"the cell failed: {cell}")
        print(f"cell:     {cell.stdout.strip()}  ({cell.seconds * 1000:.0f} ms)")
        status = gateway.status()
        proxy = status["kernels"][kernel.id]["class"]
        print(f"\nTunnels of kernel {kernel.id[:8]} (process proxy {proxy}), read from the gateway:\n")
        print(_table(status, kernel.id))
        ssh = gateway.ssh_children()
        print(f"\nssh processes started by the gateway: {len(ssh)}"
              + ("" if not ssh else "  " + ", ".join(p.cmdline for p in ssh)))
        connections = [c for c in status["connections"] if isinstance(c, dict)]
        held = ", ".join("{mode} to {user}@{host}:{port}".format(**c) for c in connections)
        print(f"SSH connections held by the gateway:  {len(connections)} ({held})")
        if keep:
            _keep_running(gateway, kernel.id, workdir)
        else:
            seconds = kernel.delete()
            print(f"\nkernel shut down in {seconds * 1000:.0f} ms; stopping the gateway and sshd")
    except (GatewayStartError, RuntimeError, OSError) as exc:
        failed = True
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        if gateway is not None:
            print(f"--- gateway log (last lines):\n{gateway.log_text()[-6000:]}", file=sys.stderr)
    except Exception:
        failed = True
        if gateway is not None:
            print(f"--- gateway log (last lines):\n{gateway.log_text()[-6000:]}", file=sys.stderr)
        raise
    finally:
        if client is not None:
            client.close()
        if gateway is not None:
            gateway.stop()
        sshd.close()
        if failed:
            print(f"(files kept in {workdir})", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if not failed:
        left = procs.descendants(os.getpid())
        if left:
            print("left running: " + "; ".join(f"{p.pid} {p.cmdline[:80]}" for p in left), file=sys.stderr)
            return 1
        print("done: nothing left running")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
