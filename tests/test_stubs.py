"""The hand-written type stubs must describe the compiled extension exactly."""

import subprocess
import sys


def test_native_stub_matches_the_extension() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "egtunnel._native"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
