"""Differential test: what egtunnel resolves from an ssh_config, against what OpenSSH's own client prints
(`ssh -G`), field by field, for many configurations and host names.

Each case runs through the path a connection uses (`ConnectSpec::explain`, as `SshTarget` and `check`
resolve a host) twice: with the OpenSSH client resolving the file (the default when `ssh` is installed),
and with the built-in parser (EG_SSH_CLIENT=none). Each must either agree with `ssh -G` on hostname, user,
port, identity files in order, known hosts files, host-key policy, ProxyJump and ciphers, or refuse the
file with an SshConfigError naming `file:line`. The OpenSSH path must refuse only what egtunnel cannot
apply (Match exec, ProxyCommand, ...); the built-in parser may refuse more, never disagree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

import egtunnel
from egtunnel import _native

SSH = shutil.which("ssh")
pytestmark = pytest.mark.skipif(SSH is None, reason="the OpenSSH client is the reference")

HOME = Path(os.path.expanduser("~"))
# OpenSSH's default identity files (as `ssh -G` prints them) and the part libssh2 can load, in order.
DEFAULT_IDS = [f"~/.ssh/{n}" for n in ("id_rsa", "id_ecdsa", "id_ecdsa_sk", "id_ed25519", "id_ed25519_sk", "id_xmss", "id_dsa")]
DEFAULT_IDS_TEXT = "agent, then ~/.ssh/id_rsa, id_ecdsa, id_ed25519, id_dsa"
ORIGIN = re.compile(r"(\S+):(\d+): ")


@dataclass
class Case:
    name: str
    text: str
    hosts: tuple[str, ...]
    # Extra files, relative to the case directory ("{dir}" in any text is that directory).
    extra: tuple[tuple[str, str], ...] = ()
    # Refused by the OpenSSH path too (egtunnel cannot apply it): the keyword the error names.
    refused: str | None = None


R = "{dir}"  # the case directory, for absolute Include paths and files

CASES = [
    Case("reported-match-adds-to-host", "Host bastion\n HostName 10.0.0.5\nMatch host *.lab\n StrictHostKeyChecking no\n"
         " UserKnownHostsFile /dev/null\n User labuser\n", ("bastion", "x.lab", "other")),
    Case("reported-match-then-host-star", "Match host *.lab\n StrictHostKeyChecking no\nHost *\n StrictHostKeyChecking yes\n",
         ("a.lab", "b.example", "lab")),
    Case("match-all", "Host a\n User ua\nMatch all\n User everyone\n Port 2200\n", ("a", "b")),
    Case("match-all-first", "Match all\n Port 2201\nHost a\n Port 2202\n User ua\n", ("a", "b")),
    Case("match-originalhost", "Host alias\n HostName real.example\nMatch originalhost alias\n User viaalias\n"
         "Match host real.example\n Port 2203\n", ("alias", "real.example")),
    Case("match-host-after-hostname", "Host short\n HostName long.lab\nMatch host long.lab\n User longuser\n",
         ("short", "long.lab")),
    Case("match-user", "Host *\n User alice\nMatch user alice\n Port 2204\nMatch user bob\n Port 2205\n", ("h1",)),
    Case("match-user-unset", "Match user root\n Port 2206\n", ("h1", "h2")),
    Case("match-localuser", "Match localuser root\n User fromlocal\nMatch localuser nobody\n User never\n", ("h1",)),
    Case("match-negated", "Match host !*.lab,*\n User notlab\nHost *\n User lab\n", ("a.lab", "b.example")),
    Case("match-multiple-criteria", "Match host *.lab user root\n Port 2207\nMatch host *.lab\n Port 2208\n",
         ("a.lab", "b")),
    Case("match-canonical", "Match canonical host *.lab\n User canon\nHost *\n User plain\n", ("a.lab", "b")),
    Case("match-exec", "Host a\n User ua\nMatch exec \"true\"\n User exec\n", ("a",), refused="exec"),
    Case("match-negated-exec", "Match !exec \"false\" host *\n Port 2209\n", ("a",), refused="exec"),
    Case("host-negated", "Host *.lab !bad.lab\n User lab\nHost *\n User other\n", ("good.lab", "bad.lab", "x")),
    Case("host-multiple-patterns", "Host a b c?\n Port 2210\nHost *\n Port 2211\n", ("a", "b", "cd", "cde")),
    Case("host-wildcards", "Host 10.1.*\n User net\nHost *.example.org\n User org\n", ("10.1.2.3", "x.example.org", "y")),
    Case("first-wins-in-block", "Host a\n Port 2212\n Port 2213\n User first\n User second\n", ("a",)),
    Case("first-wins-across-blocks", "Host a\n User specific\nHost *\n User generic\n Port 2214\n", ("a", "b")),
    Case("first-wins-hostname", "Host a\n HostName one.example\nHost a*\n HostName two.example\n", ("a", "ab")),
    Case("identity-accumulates", "Host a\n IdentityFile ~/.ssh/k1\nHost *\n IdentityFile ~/.ssh/k2\n", ("a", "b")),
    Case("identity-in-block", "Host a\n IdentityFile /keys/one\n IdentityFile /keys/two\n", ("a",)),
    Case("identity-none", "Host a\n IdentityFile none\n", ("a",)),
    Case("tokens-hostname", "Host *.short\n HostName %h.example.org\nHost x\n HostName %%literal\n", ("a.short", "x")),
    Case("tokens-identity", "Host *\n HostName %h.real\n User u%h\n IdentityFile ~/.ssh/id_%h_%r_%p\n Port 2215\n",
         ("a",)),
    Case("tokens-identity-more", "Host *\n IdentityFile %d/.ssh/k_%n_%u_%i\n", ("alias1",)),
    Case("tokens-identity-refused", "Host *\n IdentityFile ~/.ssh/%C\n", ("a",), refused="identityfile"),
    Case("tokens-known-hosts", "Host *\n UserKnownHostsFile ~/.ssh/kh_%h %d/kh2_%n\n", ("a", "b")),
    Case("quoting", "Host \"a\"\n User \"quoted user\"\n IdentityFile \"/keys/one\"\n", ("a",)),
    Case("equals-syntax", "Host=a\n Port=2216\n User = eq\n HostName= eq.example\n", ("a",)),
    Case("keyword-case", "HOST a\n PORT 2217\n user MixedCase\n hostNAME CASE.example\n", ("a",)),
    Case("strict-yes", "Host *\n StrictHostKeyChecking yes\n", ("a",)),
    Case("strict-accept-new", "Host *\n StrictHostKeyChecking accept-new\n", ("a",)),
    Case("strict-off", "Host *\n StrictHostKeyChecking off\n", ("a",)),
    Case("strict-ask", "Host *\n StrictHostKeyChecking ask\n", ("a",)),
    Case("known-hosts-several", "Host *\n UserKnownHostsFile /kh/one /kh/two\n", ("a",)),
    Case("known-hosts-none", "Host a\n UserKnownHostsFile none\n", ("a",)),
    Case("proxyjump", "Host inner\n ProxyJump bastion,u@hop2:2222\nHost bastion\n HostName b.example\n", ("inner", "bastion")),
    Case("proxyjump-none-first", "Host a\n ProxyJump none\nHost a b\n ProxyJump hop\n", ("a", "b", "hop")),
    Case("proxycommand-refused", "Host a\n ProxyCommand nc %h %p\n", ("a",), refused="proxycommand"),
    Case("proxycommand-other-host", "Host a\n ProxyCommand nc %h %p\nHost b\n User ub\n", ("b",)),
    Case("ciphers", "Host *\n Ciphers aes256-ctr,aes128-ctr\n", ("a",)),
    Case("ciphers-plus", "Host *\n Ciphers +aes256-cbc\n", ("a",)),
    Case("ciphers-minus", "Host *\n Ciphers -chacha20-poly1305@openssh.com\n", ("a",)),
    Case("ciphers-first-wins", "Host a\n Ciphers aes128-ctr\nHost *\n Ciphers aes256-ctr\n", ("a", "b")),
    Case("include-absolute-glob", f"Host a\n Include {R}/conf.d/*.conf\nHost *\n User fallback\n", ("a", "b"),
         extra=(("conf.d/10-a.conf", "User inc10\nPort 2218\n"), ("conf.d/20-b.conf", "User inc20\nPort 2219\n"))),
    Case("include-top-level-host", f"Include {R}/hosts.conf\nHost *\n Port 2220\n", ("x", "y"),
         extra=(("hosts.conf", "Host x\n Port 2221\n HostName x.inc\n"),)),
    Case("include-relative", "Include {rel}/*.conf\nHost *\n User afterinclude\n", ("r1", "r2"),
         extra=(("rel.conf", "Host r1\n User relative\n"),)),
    Case("include-match-inside", f"Include {R}/m.conf\n", ("q.lab", "q"),
         extra=(("m.conf", "Match host *.lab\n User mlab\n"),)),
    Case("include-exec-inside", f"Include {R}/e.conf\n", ("q",),
         extra=(("e.conf", "Match exec \"true\"\n User e\n"),), refused="exec"),
    Case("connect-timeout-and-more", "Host *\n ConnectTimeout 7\n ServerAliveCountMax 5\n IdentitiesOnly yes\n", ("a",)),
]


def _write_case(case: Case, root: Path, rel_dir: Path) -> Path:
    d = root / case.name
    d.mkdir(parents=True)
    for rel, text in case.extra:
        target = rel_dir / rel if case.name == "include-relative" else d / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text.replace(R, str(d)))
    cfg = d / "ssh_config"
    cfg.write_text(case.text.replace(R, str(d)).replace("{rel}", rel_dir.name))
    return cfg


def _ssh_g(cfg: Path, host: str) -> dict[str, list[str]]:
    out = subprocess.run([SSH, "-G", "-F", str(cfg), host], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         timeout=10, check=True).stdout  # fmt: skip
    values: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        values.setdefault(key, []).append(value)
    return values


def _policy(word: str) -> str:
    return {"true": "strict", "ask": "strict", "accept-new": "accept-new", "false": "accept-new"}[word]


def _expand(path: str, g: dict[str, list[str]], original: str) -> str:
    """IdentityFile as `ssh` expands it when it loads the keys (`ssh -G` prints it unexpanded): the tokens
    of ssh_config(5) from the values ssh -G resolved, then `~`."""
    tokens = {"%": "%", "h": g["hostname"][0], "n": original, "p": g["port"][0], "r": g["user"][0],
              "u": os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip(),
              "d": str(HOME), "i": str(os.geteuid())}  # fmt: skip
    expanded = re.sub(r"%(.)", lambda m: tokens[m.group(1)], path)
    return os.path.expanduser(expanded)


def _expected(g: dict[str, list[str]], original: str) -> dict[str, str]:
    ids = g.get("identityfile", [])
    if ids == DEFAULT_IDS:
        identity = DEFAULT_IDS_TEXT
    else:
        identity = " ".join(_expand(i, g, original) for i in ids if i != "none") or DEFAULT_IDS_TEXT
    kh = " ".join(f for f in g["userknownhostsfile"][0].split() if f != "none")
    return {
        "hostname": g["hostname"][0],
        "user": g["user"][0],
        "port": g["port"][0],
        "identityfile": identity,
        "userknownhostsfile": kh or str(HOME / ".ssh/known_hosts") + " " + str(HOME / ".ssh/known_hosts2"),
        "stricthostkeychecking": _policy(g["stricthostkeychecking"][0]),
        "proxyjump": g.get("proxyjump", ["none"])[0],
        "ciphers": g["ciphers"][0],
    }


def _ours(cfg: Path, host: str) -> dict[str, str]:
    rows, _ = _native.explain(host, ssh_config=str(cfg))
    got = {k: v for k, v, _ in rows}
    return {
        "hostname": got["hostname"],
        "user": got["user"],
        "port": got["port"],
        "identityfile": got["identityfile"],
        "userknownhostsfile": got["userknownhostsfile"],
        "stricthostkeychecking": got["stricthostkeychecking"].split()[0],
        "proxyjump": got.get("proxyjump", "none"),
        "ciphers": got["ciphers"],
    }


def _agrees(expected: dict[str, str], ours: dict[str, str]) -> list[str]:
    diffs = []
    for field, want in expected.items():
        have = ours[field]
        if field == "ciphers":
            # libssh2 implements a subset: ours is OpenSSH's list in OpenSSH's order, minus what libssh2 lacks.
            wanted = want.split(",")
            mine = have.split(",")
            if not mine or any(c not in wanted for c in mine) or mine != [c for c in wanted if c in mine]:
                diffs.append(f"{field}: ssh -G {want!r}, egtunnel {have!r}")
        elif have != want:
            diffs.append(f"{field}: ssh -G {want!r}, egtunnel {have!r}")
    return diffs


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("differential")
    # Relative Includes are read from ~/.ssh, as OpenSSH reads them.
    rel_dir = HOME / ".ssh" / f"egtunnel-differential-{os.getpid()}"
    rel_dir.mkdir(parents=True, exist_ok=True)
    yield {case.name: _write_case(case, root, rel_dir) for case in CASES}
    shutil.rmtree(rel_dir, ignore_errors=True)


RESULTS: list[tuple[str, str, str, str]] = []


@pytest.mark.parametrize("resolver", ["openssh", "builtin"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_resolution_agrees_with_ssh_G_or_is_refused_at_a_line(case: Case, resolver: str, written: dict[str, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    if resolver == "builtin":
        monkeypatch.setenv("EG_SSH_CLIENT", "none")
    cfg = written[case.name]
    for host in case.hosts:
        try:
            ours = _ours(cfg, host)
        except egtunnel.SshConfigError as exc:
            where = ORIGIN.match(str(exc))
            assert where, f"{case.name} {host}: refusal names no file:line: {exc}"
            assert Path(where.group(1)).is_file() and int(where.group(2)) > 0, str(exc)
            if resolver == "openssh":
                assert case.refused, f"{case.name} {host}: the OpenSSH path refused what it can apply: {exc}"
                assert case.refused in str(exc).lower(), str(exc)
            RESULTS.append((resolver, case.name, host, f"refused {where.group(1).rsplit('/', 1)[-1]}:{where.group(2)}"))
            continue
        assert not case.refused, f"{case.name} {host}: {case.refused} was not refused"
        expected = _expected(_ssh_g(cfg, host), host)
        diffs = _agrees(expected, ours)
        assert not diffs, f"{case.name} {host} ({resolver}): " + "; ".join(diffs)
        RESULTS.append((resolver, case.name, host, "agrees"))


def test_the_reported_examples_resolve_as_openssh(written: dict[str, Path]) -> None:
    """The two configurations of the report, stated outright: Match adds to the Host block above only
    where it matches, and a Match before `Host *` does not switch checking off for other hosts."""
    ours = _ours(written["reported-match-adds-to-host"], "bastion")
    assert ours["stricthostkeychecking"] == "strict"
    assert ours["userknownhostsfile"] == f"{HOME}/.ssh/known_hosts {HOME}/.ssh/known_hosts2"
    assert ours["user"] == subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    lab = _ours(written["reported-match-adds-to-host"], "x.lab")
    # `no` records unknown keys and refuses changed ones; it never turns the check off.
    assert (lab["stricthostkeychecking"], lab["userknownhostsfile"], lab["user"]) == ("accept-new", "/dev/null", "labuser")
    assert _ours(written["reported-match-then-host-star"], "b.example")["stricthostkeychecking"] == "strict"
    assert _ours(written["reported-match-then-host-star"], "a.lab")["stricthostkeychecking"] == "accept-new"


def test_enough_cases_and_a_summary(written: dict[str, Path]) -> None:
    """At least 40 configurations; prints the table (pytest -s) of what agreed and what was refused."""
    assert len(CASES) >= 40
    pairs = sum(len(c.hosts) for c in CASES)
    assert pairs >= 80
    for resolver, name, host, outcome in RESULTS:
        print(f"{resolver:8} {name:28} {host:16} {outcome}")
