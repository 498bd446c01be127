"""What a launch is asked to do (`LaunchOptions`), and the defaults that EG's launcher protocol implies.

`cli.parse_args` fills it in from the command line; `kernel.launch` carries it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DEFAULT_KERNEL_CLASS_NAME = "ipykernel.ipkernel.IPythonKernel"
# The bind address when `--ip` is not given: the variable's value, else every interface (EG's default).
KERNEL_IP_VARIABLE = "EGTUNNEL_KERNEL_IP"
DEFAULT_IP = "0.0.0.0"
SPARK_INIT_MODES = ("none", "lazy", "eager")
CLUSTER_TYPES = ("spark", "dask", "none")
# EG's default launch timeout (EG_KERNEL_LAUNCH_TIMEOUT unset), and what the take-up timeout adds to
# the launch timeout: the gateway's tunnel set-up after the report (bounded by its SSH connect timeout)
# and its first poll, which comes 3 s after the start, with room for a busy gateway.
DEFAULT_LAUNCH_TIMEOUT = 30.0
TAKE_UP_MARGIN = 30.0


@dataclass(frozen=True)
class LaunchOptions:
    kernel_id: str
    response_address: Optional[tuple[str, int]]
    public_key: Optional[str]
    port_range: tuple[int, int]
    spark_init_mode: str
    cluster_type: str
    kernel_class_name: str
    ip: str
    connection_file: Optional[str]
    # Failed binds tolerated per port before giving up (EG's MAX_PORT_RANGE_RETRIES).
    port_retries: int = 5
    # Seconds after the report within which the gateway's first request must arrive; 0 waits forever.
    take_up_timeout: float = DEFAULT_LAUNCH_TIMEOUT + TAKE_UP_MARGIN
    # The kernelspec's EG_ALTERNATE_SIGINT: the signal EG interrupts this kernel with instead of SIGINT.
    alternate_sigint: Optional[int] = None
