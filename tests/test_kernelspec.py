"""Tests for `python -m egtunnel kernelspec install` and the kernelspec it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager

from egtunnel import kernelspec, launcher
from egtunnel.__main__ import main

PLACEHOLDERS = {
    "{kernel_id}": "5e7c6b1a-0000-4000-8000-000000000001",
    "{response_address}": "10.0.0.5:8877",
    "{port_range}": "40000..41000",
}


def sample_public_key() -> str:
    from Cryptodome.PublicKey import RSA

    pem = RSA.generate(1024).publickey().export_key("PEM").decode()
    return "".join(line for line in pem.splitlines() if "-----" not in line)


def install(tmp_path: Path, *args: str) -> dict:
    assert main(["kernelspec", "install", "--prefix", str(tmp_path), *args]) == 0
    name = args[args.index("--name") + 1].lower()
    return json.loads((tmp_path / "share" / "jupyter" / "kernels" / name / "kernel.json").read_text())


def test_defaults(tmp_path, capsys):
    spec = install(tmp_path, "--name", "remote_py")
    assert spec["argv"][:3] == [sys.executable, "-m", "egtunnel.launcher"]
    assert spec["metadata"]["process_proxy"]["class_name"] == "egtunnel.DistributedProcessProxy"
    # No bind address written: the proxy's default (the host's loopback with tunneling on) applies.
    assert "config" not in spec["metadata"]["process_proxy"]
    assert spec["display_name"] == "Python 3 (egtunnel)"
    assert spec["language"] == "python"
    for placeholder in ("{kernel_id}", "{response_address}", "{public_key}", "{port_range}"):
        assert placeholder in spec["argv"]
    out = capsys.readouterr().out
    assert "Installed kernelspec remote_py in" in out


def test_options_are_honoured(tmp_path):
    spec = install(
        tmp_path,
        "--name", "Spark_Py",
        "--python", "/opt/conda/bin/python",
        "--display-name", "Python on the cluster",
        "--class-name", "egtunnel.YarnClusterProcessProxy",
        "--kernel-ip", "0.0.0.0",
    )  # fmt: skip
    assert spec["argv"][0] == "/opt/conda/bin/python"
    assert spec["metadata"]["process_proxy"]["config"] == {"kernel_ip": "0.0.0.0"}
    assert spec["display_name"] == "Python on the cluster"
    assert spec["metadata"]["process_proxy"]["class_name"] == "egtunnel.YarnClusterProcessProxy"


def test_jupyter_reads_the_kernelspec(tmp_path):
    install(tmp_path, "--name", "remote_py", "--python", "python3")
    manager = KernelSpecManager(kernel_dirs=[str(tmp_path / "share" / "jupyter" / "kernels")])
    assert "remote_py" in manager.find_kernel_specs()
    spec = manager.get_kernel_spec("remote_py")
    assert spec.argv[0] == "python3"
    assert spec.metadata["process_proxy"]["class_name"] == "egtunnel.DistributedProcessProxy"


def test_argv_is_accepted_by_the_launcher(tmp_path):
    # What EG runs after substituting its placeholders must parse as a valid launch.
    spec = install(tmp_path, "--name", "remote_py")
    values = dict(PLACEHOLDERS, **{"{public_key}": sample_public_key()})
    argv = [values.get(arg, arg) for arg in spec["argv"][3:]]
    options = launcher.parse_args(argv)
    assert options.kernel_id == PLACEHOLDERS["{kernel_id}"]
    assert options.response_address == ("10.0.0.5", 8877)
    assert options.port_range == (40000, 41000)


def test_reinstall_replaces_the_kernelspec(tmp_path):
    install(tmp_path, "--name", "remote_py", "--display-name", "first")
    spec = install(tmp_path, "--name", "remote_py", "--display-name", "second")
    assert spec["display_name"] == "second"
    assert sorted(os.listdir(tmp_path / "share" / "jupyter" / "kernels" / "remote_py")) == ["kernel.json"]


def test_default_location_is_the_user_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    path = kernelspec.install("remote_py")
    assert path == tmp_path / "data" / "kernels" / "remote_py" / "kernel.json"
    assert json.loads(path.read_text())["argv"][2] == "egtunnel.launcher"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "bad name"], "invalid kernelspec name 'bad name'"),
        (["--name", ".."], "invalid kernelspec name '..'"),
        (["--name", "a/b"], "invalid kernelspec name 'a/b'"),
        (["--name", "ok", "--python", "/opt/my python/bin/python"], "invalid --python"),
        (["--name", "ok", "--python", "python; rm -rf ~"], "must be one word"),
        (["--name", "ok", "--python", "venv/bin/python"], "relative path"),
        (["--name", "ok", "--python", ""], "invalid --python ''"),
        (["--name", "ok", "--class-name", "DistributedProcessProxy"], "expected a dotted module.Class path"),
        (["--name", "ok", "--class-name", "egtunnel.Distributed-Proxy"], "invalid --class-name"),
        (["--name", "ok", "--display-name", "  "], "--display-name: it must not be empty"),
        (["--name", "ok", "--kernel-ip", "localhost"], "invalid --kernel-ip 'localhost'"),
    ],
)
def test_bad_input_is_rejected(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["kernelspec", "install", "--prefix", str(tmp_path), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "share").exists()


def test_name_is_required(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["kernelspec", "install"])
    assert exc.value.code == 2
    assert "--name" in capsys.readouterr().err


def test_prefix_that_is_a_file(tmp_path, capsys):
    (tmp_path / "share").write_text("")
    assert main(["kernelspec", "install", "--name", "ok", "--prefix", str(tmp_path)]) == 1
    assert "cannot write the kernelspec" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "egtunnel", "kernelspec", "install", "--name", "cli", "--prefix", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "share" / "jupyter" / "kernels" / "cli" / "kernel.json").is_file()
    result = subprocess.run([sys.executable, "-m", "egtunnel"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "COMMAND" in result.stderr


def test_example_kernelspec_matches_the_installer():
    example = json.loads((Path(__file__).parent.parent / "examples" / "kernel.json").read_text())
    generated = kernelspec.kernel_json(python="python3")
    assert example["argv"][1:] == generated["argv"][1:]
    assert example["metadata"]["process_proxy"]["class_name"] == kernelspec.DEFAULT_CLASS_NAME
    config = example["metadata"]["process_proxy"]["config"]
    assert set(config) >= {"tunneling", "keepalive_margin", "keepalive_count_max", "tunnel_mode"}


def test_example_gateway_config_sets_real_settings():
    from enterprise_gateway.enterprisegatewayapp import EnterpriseGatewayApp
    from enterprise_gateway.services.kernels.remotemanager import RemoteMappingKernelManager
    from traitlets.config.loader import PyFileConfigLoader

    examples = Path(__file__).parent.parent / "examples"
    config = PyFileConfigLoader("gateway_config.py", path=str(examples)).load_config()
    classes = {"EnterpriseGatewayApp": EnterpriseGatewayApp, "MappingKernelManager": RemoteMappingKernelManager}
    assert set(config) == set(classes)
    for section, cls in classes.items():
        for name in config[section]:
            assert name in cls.class_trait_names(config=True), f"{section}.{name} is not a setting"
    assert config.MappingKernelManager.cull_idle_timeout > 0
