"""The leftover checks that run after every end-to-end test (conftest.py): a kernel process no live
gateway holds is named, with its host, and killed; a kernel a gateway holds is left alone unless the test
started it and left it running, in which case it is named and deleted.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from .conftest import E2EHosts, check_no_kernels_left_held, check_no_stray_kernels, stray_kernels
from .gateway import Gateway
from .kernel_client import GatewayClient
from .support import kernel_side_procs, wait_for

pytestmark = pytest.mark.e2e


def test_a_kernel_no_gateway_lists_is_named_and_killed(gateway: Gateway, e2e_hosts: E2EHosts) -> None:
    host = e2e_hosts.a
    kernel_id = str(uuid.uuid4())
    # What a launcher whose gateway forgot it looks like on the host: a process carrying the id, started
    # outside any SSH session.
    orphan = host.popen([sys.executable, "-c", "import time; time.sleep(120)", "--kernel-id", kernel_id],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for(lambda: any(s.kernel_id == kernel_id for s in stray_kernels()), 10, what="the stray to be seen")
    with pytest.raises(pytest.fail.Exception) as failed:
        check_no_stray_kernels("this test", grace=1.0)
    message = str(failed.value)
    assert message.startswith("this test left kernel processes"), message
    assert kernel_id in message and host.name in message and str(orphan.pid) in message, message
    assert orphan.wait(10) == -9  # killed, so that the next test starts clean
    assert not stray_kernels()


def test_a_kernel_a_gateway_lists_is_not_a_stray(gateway: Gateway, client: GatewayClient,
                                                e2e_hosts: E2EHosts) -> None:
    kernel = client.start_kernel("egt")
    assert kernel.execute("1 + 1").result == "2"
    # The check sees the kernel's processes at all: its launcher carries the id.
    assert any(kernel.id in p.cmdline for p in kernel_side_procs(e2e_hosts.a))
    assert not [s for s in stray_kernels() if s.kernel_id == kernel.id]
    check_no_stray_kernels("this test", grace=0.0)


def test_a_kernel_left_running_in_its_gateway_is_named_and_deleted(gateway: Gateway) -> None:
    held = {str(k) for k in gateway.status()["kernels"]}
    client = gateway.client()
    kernel = client.start_kernel("egt")  # and never deleted: the client is not closed
    with pytest.raises(pytest.fail.Exception) as failed:
        check_no_kernels_left_held("this test", held)
    message = str(failed.value)
    assert message.startswith("this test left kernels running") and kernel.id in message, message
    assert kernel.id not in gateway.status()["kernels"]
    client.rest.close()
