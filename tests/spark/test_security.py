"""Security defaults: hostile inventories are refused before anything runs (or, where the
value is legitimate, reach the node quoted), the private state dir and secret files resist
planted directories and symlinks, and the same checks hold for a non-root user.

The non-root cases run the product's code as a real unprivileged account (created here with
``useradd`` if missing) through ``runuser``, with the system Python (stdlib only is needed:
``vllm_spark.statedir``, ``inventory`` and ``remote`` import nothing else).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vllm_spark import remote, statedir
from vllm_spark.inventory import InventoryError, parse_inventory

REPO = Path(__file__).resolve().parents[2]
USER = "vsparktest"
SYSTEM_PY = "/usr/bin/python3"


def _inv(**host):
    return {"cluster": {"name": "h", "interface": "lo", "python": sys.executable},
            "hosts": [{"name": "a", "ssh": "local", **host}]}


def _cli(tmp_path, data, *args, timeout=60):
    path = tmp_path / "inv.json"
    path.write_text(json.dumps(data))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "vllm_spark.cli", *args, "-i", str(path)],
                          capture_output=True, text=True, timeout=timeout, env=env)


# ------------------------------------------------------------------ hostile inventories


def test_ssh_value_cannot_become_an_ssh_option(tmp_path):
    marker = tmp_path / "pwned"
    hostile = f"-oProxyCommand=touch {marker}"
    # what the value would do if it reached ssh as its destination argument:
    subprocess.run(["ssh", "-o", "BatchMode=yes", hostile, "x", "true"], capture_output=True,
                   timeout=30)
    assert marker.exists(), "ssh should run a ProxyCommand given as its first argument"
    marker.unlink()
    r = _cli(tmp_path, {**_inv(), "hosts": [{"name": "a", "ssh": hostile}]}, "preflight")
    assert r.returncode == 1
    assert "hosts[a].ssh must be user@host" in r.stderr and "read as an ssh option" in r.stderr
    assert not marker.exists(), "the hostile ssh value ran"


@pytest.mark.parametrize("opts", [["-o", "ProxyCommand=touch {m}"], ["-oProxyCommand touch {m}"],
                                  ["-oLocalCommand=touch {m}", "-oPermitLocalCommand=yes"]])
def test_ssh_options_that_run_local_commands_are_refused(tmp_path, opts):
    marker = tmp_path / "pwned"
    data = {**_inv(), "hosts": [{"name": "a", "ssh": "me@10.255.255.1",
                                 "ssh_options": [o.format(m=marker) for o in opts]}]}
    r = _cli(tmp_path, data, "preflight")
    assert r.returncode == 1 and "would run a command on this machine" in r.stderr, r.stderr
    assert not marker.exists()


@pytest.mark.parametrize("host, message", [
    ({"env": {"A;touch {m};B": "1"}}, "env key 'A;touch"),
    ({"env": {"X=$(touch {m})": "1"}}, "is not a shell identifier"),
    ({"name": "a;touch {m}"}, "hosts[0].name must be a plain word"),
    ({"interface": "lo;touch {m}"}, "interface must be an interface name"),
    ({"address": "10.0.0.1;touch {m}"}, "address must be an IP address"),
    ({"python": "-c__import__('os').system('touch {m}')"}, "python must be an absolute path"),
    ({"model": "--rsync-path=touch {m}"}, "model must be an absolute path"),
    ({"model": "/m\ntouch {m}"}, "model contains a control character"),
    ({"state_dir": "relative/dir"}, "state_dir must be an absolute path"),
])
def test_hostile_values_stop_before_anything_runs(tmp_path, host, message):
    marker = tmp_path / "pwned"
    host = json.loads(json.dumps(host).replace("{m}", str(marker)))
    with pytest.raises(InventoryError, match=re.escape(message)):
        parse_inventory(_inv(**host))
    r = _cli(tmp_path, _inv(**host), "preflight")
    assert r.returncode == 1 and message.split("{")[0] in r.stderr, r.stderr
    assert not marker.exists()


def test_legitimate_values_with_shell_characters_reach_the_node_quoted(tmp_path):
    """Values the inventory accepts (env values, paths) are quoted on every command line:
    with ``ssh: local`` the commands really run through bash."""
    marker = tmp_path / "pwned"
    evil = f"$(touch {marker})`touch {marker}`;touch {marker}"
    data = _inv(env={"PROBE_VALUE": evil}, model=f"{tmp_path}/m {evil}",
                state_dir=str(tmp_path / "state"))
    r = _cli(tmp_path, data, "preflight")
    assert "model directory" in r.stdout and evil in r.stdout, r.stdout  # the literal path
    inv = parse_inventory(data)
    node = inv.head
    remote.prepare_state_dir(node)
    remote.start_detached(node, "probe", ["printenv", "PROBE_VALUE"], node.env)
    deadline = time.time() + 10
    while remote.detached_state(node, "probe") != "DEAD" and time.time() < deadline:
        time.sleep(0.2)
    assert (Path(node.state_dir) / "probe.log").read_text().strip() == evil
    assert not marker.exists(), "a value was expanded by a shell"


# ------------------------------------------------------------------ state dir and secrets
#
# Each check is a snippet run as a given user (root, or the unprivileged USER through
# runuser) with the system Python; it prints one JSON object.

CHECKS = textwrap.dedent(r"""
    import json, os, stat, sys
    sys.path.insert(0, sys.argv[1])
    from vllm_spark import remote, statedir
    from vllm_spark.inventory import parse_inventory
    scratch, planted = sys.argv[2], sys.argv[3]
    out = {}
    def err(fn):
        try:
            fn()
            return None
        except (statedir.StateDirError, remote.NodeError) as e:
            return str(e)
    # the product path: a local node with the default state dir, resolved on the "node"
    inv = parse_inventory({"cluster": {"name": "sec", "interface": "lo",
                                       "python": sys.executable},
                           "hosts": [{"name": "n1", "ssh": "local"}]})
    node = inv.head
    remote.prepare_state_dir(node)
    st = os.lstat(node.state_dir)
    out["default"] = [node.state_dir, stat.S_IMODE(st.st_mode), st.st_uid == os.geteuid()]
    remote.write_secret(node, node.token_path, "tok\n")
    st = os.lstat(node.token_path)
    out["token"] = [stat.S_IMODE(st.st_mode), open(node.token_path).read()]
    # a symlink planted at the token path: removed, its target untouched
    victim = os.path.join(scratch, "victim")
    open(victim, "w").write("precious")
    os.unlink(node.token_path)
    os.symlink(victim, node.token_path)
    remote.write_secret(node, node.token_path, "tok2\n")
    out["symlink_token"] = [os.path.islink(node.token_path), open(victim).read(),
                            stat.S_IMODE(os.lstat(node.token_path).st_mode)]
    # a secret readable by others is refused when read back
    os.chmod(node.token_path, 0o644)
    out["read_open_mode"] = err(lambda: statedir.read_secret(node.token_path))
    # a state dir planted by someone else, a symlink, an open mode, an open parent
    out["planted_other"] = err(lambda: statedir.ensure_private_dir(planted))
    link = os.path.join(scratch, "link")
    os.symlink(os.path.join(scratch, "elsewhere"), link)
    os.mkdir(os.path.join(scratch, "elsewhere"), 0o700)
    out["symlink_dir"] = err(lambda: statedir.ensure_private_dir(link))
    opened = os.path.join(scratch, "open")
    os.mkdir(opened)
    os.chmod(opened, 0o755)
    out["open_mode"] = err(lambda: statedir.ensure_private_dir(opened))
    parent = os.path.join(scratch, "shared")
    os.mkdir(parent)
    os.chmod(parent, 0o777)
    out["open_parent"] = err(lambda: statedir.ensure_private_dir(os.path.join(parent, "s")))
    # through the product path: the node's explicit state_dir pointing at the planted one
    bad = parse_inventory({"cluster": {"name": "sec", "interface": "lo",
                                       "python": sys.executable},
                           "hosts": [{"name": "n2", "ssh": "local", "state_dir": planted}]})
    out["node_planted"] = err(lambda: remote.prepare_state_dir(bad.head))
    print(json.dumps(out))
""")


def _ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pass
    if not shutil.which("useradd"):
        pytest.skip("useradd is not installed: cannot create the unprivileged test user")
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", USER], check=True,
                   capture_output=True)
    return pwd.getpwnam(USER)


def _run_as(user: str | None, scratch: Path, planted: Path) -> dict:
    code = scratch / "checks.py"
    code.write_text(CHECKS)
    code.chmod(0o644)  # readable by the user whatever the umask of the test run
    argv = [SYSTEM_PY, str(code), str(REPO), str(scratch / "work"), str(planted)]
    if user is not None:
        argv = [shutil.which("runuser"), "-u", user, "--", *argv]
    env = {"PATH": "/usr/bin:/bin", "HOME": pwd.getpwnam(user or "root").pw_dir}
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(params=["root", "unprivileged"])
def as_user(request, tmp_path_factory):
    if not os.path.exists(SYSTEM_PY):
        pytest.skip(f"{SYSTEM_PY} not found (the checks need a Python any user can run)")
    if request.param == "root":
        if os.geteuid() != 0:
            pytest.skip("not root: the unprivileged case covers this user")
        user, other = None, "nobody"
    else:
        if os.geteuid() != 0:
            user, other = None, "root"  # already unprivileged: run the checks as ourselves
        else:
            if not shutil.which("runuser"):
                pytest.skip("runuser is not installed: cannot run as another user")
            user, other = _ensure_user().pw_name, "root"
    # a scratch dir the user owns (under a sticky, world-writable /tmp-like parent)
    base = Path(f"/tmp/vllm-spark-sec-{os.getpid()}-{request.param}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(mode=0o700)
    work = base / "work"
    work.mkdir(mode=0o700)
    planted = base / "planted"
    planted.mkdir(mode=0o777)
    os.chmod(planted, 0o777)
    uid = pwd.getpwnam(user).pw_uid if user else os.geteuid()
    if os.geteuid() == 0:
        os.chown(planted, pwd.getpwnam(other).pw_uid, -1)  # someone else's directory
        os.chown(base, uid, -1)
        os.chown(work, uid, -1)
    yield user, base, planted, uid
    shutil.rmtree(base, ignore_errors=True)
    home = Path(pwd.getpwuid(uid).pw_dir)
    shutil.rmtree(home / ".cache" / "vllm-spark" / "sec-n1", ignore_errors=True)


def test_state_dir_and_token_are_private(as_user):
    user, base, planted, uid = as_user
    out = _run_as(user, base, planted)
    home = pwd.getpwuid(uid).pw_dir
    path, mode, owned = out["default"]
    assert path == f"{home}/.cache/vllm-spark/sec-n1" and mode == 0o700 and owned
    assert out["token"] == [0o600, "tok\n"]
    # the planted symlink was replaced by a private file; the file it pointed to is intact
    assert out["symlink_token"] == [False, "precious", 0o600]
    assert "is not a private file of yours" in out["read_open_mode"]


def test_planted_and_open_state_dirs_are_refused(as_user):
    user, base, planted, uid = as_user
    out = _run_as(user, base, planted)
    assert "is owned by uid" in out["planted_other"] and "not by you" in out["planted_other"]
    assert "is a symlink: refusing to use it" in out["symlink_dir"]
    assert "has mode 0755" in out["open_mode"] and "chmod 700" in out["open_mode"]
    assert "others could replace the state dir" in out["open_parent"]
    assert out["node_planted"].startswith("n2: state dir") and "fix:" in out["node_planted"]


def test_statedir_runs_with_the_standard_library_only():
    """statedir.py is sent to nodes that may lack vllm-spark: no third-party imports."""
    import ast

    tree = ast.parse(Path(statedir.__file__).read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
            for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree)
             if isinstance(n, ast.ImportFrom) and n.module}
    assert mods <= set(sys.stdlib_module_names) | {"__future__"}, mods


def test_node_field_is_internal_and_not_in_roundtrip():
    from vllm_spark.inventory import inventory_to_dict

    inv = parse_inventory(_inv())
    host = inventory_to_dict(inv)["hosts"][0]
    assert "state_name" not in host and "state_ready" not in host


# ------------------------------------------------------------------ teardown


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in "ZX"


def test_teardown_stops_the_recorded_session_and_nothing_else(tmp_path):
    inv = parse_inventory(_inv(state_dir=str(tmp_path / "state")))
    node = inv.head
    remote.prepare_state_dir(node)
    env = {"RAY_AUTH_TOKEN_PATH": node.token_path, "MARK": "ours"}
    # a leader with a child and a grandchild in its session (like ray start -> raylet -> worker)
    # and a child in a session of its own (like a Ray job's driver)
    remote.start_detached(node, "serve", ["bash", "-c", "sleep 300 & (sleep 300 & wait) & "
                                          "setsid sleep 301 & wait"], env)
    leader = int((Path(node.state_dir) / "serve.pid").read_text().split()[0])
    deadline = time.time() + 10
    members = []
    while time.time() < deadline and len(members) < 4:
        members = [int(p) for p in os.listdir("/proc") if p.isdigit() and _alive(int(p))
                   and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[3]
                   == str(leader)]
        time.sleep(0.1)
    assert len(members) >= 4, members
    escaped = [int(p) for p in os.listdir("/proc") if p.isdigit() and _alive(int(p))
               and Path(f"/proc/{p}/cmdline").read_bytes() == b"sleep\x00301\x00"]
    assert len(escaped) == 1, escaped
    # a bystander with the very same environment and command line, outside the session
    bystander = subprocess.Popen(["sleep", "300"], env={**os.environ, **env},
                                 start_new_session=True)
    # and a pid file naming a live process with another start time (a reused pid)
    (Path(node.state_dir) / "ray.pid").write_text(f"{bystander.pid} 1\n")
    try:
        assert remote.stop_recorded(node, ["serve", "ray"], grace=5) == 0
        assert not [p for p in members if _alive(p)], "a process of the session survived"
        assert not _alive(escaped[0]), "a child that started its own session survived"
        assert bystander.poll() is None, "teardown killed a process it did not start"
        assert not (Path(node.state_dir) / "serve.pid").exists()
    finally:
        bystander.kill()
        bystander.wait()
