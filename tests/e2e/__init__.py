"""End-to-end tests: a real Enterprise Gateway server, real sshd and real kernels on remote hosts in network namespaces."""
