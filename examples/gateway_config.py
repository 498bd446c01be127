"""Example Enterprise Gateway configuration with egtunnel's native tunnels, tunneling and culling on.

Start the gateway with it:

    EG_ENABLE_TUNNELING=True jupyter enterprisegateway --config=examples/gateway_config.py

and install a kernelspec that uses egtunnel (examples/kernel.json is one) under a `kernels` directory
Jupyter searches, e.g. with `python -m egtunnel kernelspec install --name python_egtunnel`.

Environment variables. Enterprise Gateway reads many of its EG_* variables (EG_ENABLE_TUNNELING,
EG_SSH_PORT, EG_RESPONSE_*, EG_KERNEL_LAUNCH_TIMEOUT, ...) when its modules are imported, which
happens before this file runs, so export them in the gateway's environment; assigning them to
os.environ here would come too late for those.

  EG_ENABLE_TUNNELING=True      tunnel every kernel port over SSH (default False). A kernelspec's
                                process_proxy.config "tunneling": true/false overrides it.
  EG_REMOTE_HOSTS=h1,h2         hosts DistributedProcessProxy launches kernels on (or
                                `remote_hosts` below, or "remote_hosts" in a kernelspec's config).
  EG_REMOTE_USER=jupyter        SSH user on those hosts (default: the gateway's user).
  EG_REMOTE_PWD=...             SSH password; leave unset to authenticate with a key.
  EG_SSH_PORT=22                sshd port on the kernel hosts.
  EG_SSH_IDENTITY_FILE=~/.ssh/id_ed25519
                                private key for the tunnels, tried after ssh-agent (when
                                SSH_AUTH_SOCK is set) and before ~/.ssh/id_ed25519, id_ecdsa, id_rsa.
  EG_SSH_KNOWN_HOSTS=~/.ssh/known_hosts
                                known-hosts file the kernel hosts' keys are checked against
                                (default ~/.ssh/known_hosts).
  EG_SSH_HOST_KEY_POLICY=strict strict (unknown or changed key fails the start with 403),
                                accept-new (record unknown keys, refuse changed ones) or off.
  EG_SSH_CONNECT_TIMEOUT=10     seconds to connect and authenticate (default 10).
  EG_SSH_TUNNEL_MODE=shared     shared: one SSH connection per host for all kernels; per-port: one
                                per forwarded port, as EG's own ssh tunnels. Kernelspec key
                                "tunnel_mode".
  EG_SSH_KEEPALIVE_MARGIN=60    seconds added to cull_idle_timeout to get the keep-alive interval of
                                the SHELL, IOPUB, STDIN and HB tunnels (CONTROL and the launcher's
                                communication port always get EG's maximum). Kernelspec key
                                "keepalive_margin".
  EG_SSH_KEEPALIVE_COUNT_MAX=3  unanswered keep-alive probes before a connection counts as dead.
                                Kernelspec key "keepalive_count_max".
  EG_SSH_RESPONSE=auto          how that connection info comes back with tunneling on: ssh (over a
                                remote forward on the kernel host's 127.0.0.1, through the host's
                                SSH connection), direct (to EG_RESPONSE_IP:PORT), or auto (ssh where
                                the server allows it). Kernelspec key "response".
  EG_SSH_KERNEL_IP=127.0.0.1    where egtunnel's launcher binds a kernel's ports on its host with
                                tunneling on (0.0.0.0: reachable from the network). Kernelspec key
                                "kernel_ip".
  EG_RESPONSE_IP, EG_RESPONSE_PORT=8877
                                address the kernel launchers report their connection info to.
                                With response over SSH, EG_RESPONSE_IP=127.0.0.1 keeps the gateway
                                from accepting anything from the network.
  EG_KERNEL_LAUNCH_TIMEOUT=30   seconds to wait for that report.
  EG_PORT_RANGE=40000..41999    ports for the kernels and the tunnels' local ends (or `port_range`).
  EG_MIN_PORT_RANGE_SIZE=1000   smallest accepted port range; passed on to the launcher.
  EG_KERNEL_LOG_DIR=/tmp        directory on the kernel hosts for each launcher's output.
"""

c = get_config()  # noqa: F821 - provided by traitlets when it loads a config file

c.EnterpriseGatewayApp.ip = "0.0.0.0"
c.EnterpriseGatewayApp.port = 8888
c.EnterpriseGatewayApp.remote_hosts = ["kernel-host-1.example.com", "kernel-host-2.example.com"]
# Kernel ports on the hosts and the local ends of their tunnels on the gateway come from this range.
c.EnterpriseGatewayApp.port_range = "40000..41999"
c.EnterpriseGatewayApp.default_kernel_name = "python_egtunnel"

# Culling: idle kernels are shut down after an hour. The keep-alive interval of the SHELL, IOPUB,
# STDIN and HB tunnels derives from this timeout (3600 + EG_SSH_KEEPALIVE_MARGIN seconds), EG's
# rule that a tunnel's keep-alive should outlast the idle period the culler allows.
c.MappingKernelManager.cull_idle_timeout = 3600
c.MappingKernelManager.cull_interval = 60
c.MappingKernelManager.cull_connected = False
