"""This machine as a cluster's nodes, for tests/test_launcher.py: loopback SSH nodes that Ray's own
cluster launcher drives, and the rayproject images' user (uid 1000, gid 100) for the replay of a
container's setup. `.ci/cluster-host.sh` prepares the machine, as root (sshd on 127.0.0.1:22, rsync,
sudo, the node user). Where it has not run, these tests skip with the reason, unless
NODEKD_LAUNCHER_TESTS=required (set by .ci/run), which makes a missing host a failure.

A node's "image" here: a Python 3.11 from Debian (/usr/bin/python3: the project's own interpreter may
sit under /root, which other users cannot enter) in a virtual environment of the node user's, which
sees the project environment's packages (torch, Ray, ...) through a .pth line into a hard-linked copy
of its site-packages, and has a `ray` command, as Ray's images do. This package is not in that copy:
the config's setup commands must install it, as on a real node."""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile

import pytest

NODE_USER = "nodekd"
IMAGE_UID, IMAGE_GID = 1000, 100          # the rayproject images' `ray` user
NODE_PYTHON = "/usr/bin/python3"
REQUIRED = os.environ.get("NODEKD_LAUNCHER_TESTS") == "required"
OWN = ("nodekd_ray", "__editable__", "nodekd_ray-", "nodekd-ray")   # this package's files in site-packages


def host_problem() -> str | None:
    """Why this machine cannot host the launcher tests, or None."""
    if os.geteuid() != 0:
        return "needs root (to act as the node user and the image's user)"
    for tool in ("rsync", "sudo", "ssh", "ssh-keygen", "setpriv", "runuser"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: run .ci/cluster-host.sh"
    if not os.path.exists(NODE_PYTHON):
        return f"{NODE_PYTHON} is missing: run .ci/cluster-host.sh"
    try:
        pwd.getpwnam(NODE_USER)
        pwd.getpwuid(IMAGE_UID)
    except KeyError as e:
        return f"user missing ({e}): run .ci/cluster-host.sh"
    try:
        socket.create_connection(("127.0.0.1", 22), timeout=2).close()
    except OSError as e:
        return f"no SSH server on 127.0.0.1:22 ({e}): run .ci/cluster-host.sh"
    return None


def need_host() -> None:
    why = host_problem()
    if why:
        (pytest.fail if REQUIRED else pytest.skip)(f"cluster host: {why}")


def image_site(dest: str) -> str:
    """A world-readable, hard-linked copy of this environment's site-packages without this package."""
    src = sysconfig.get_paths()["purelib"]
    os.makedirs(dest, exist_ok=True)
    os.chmod(dest, 0o755)
    for name in os.listdir(src):
        if name.startswith(OWN) or name.endswith(".pth") or name == "__pycache__":
            continue
        s, d = os.path.join(src, name), os.path.join(dest, name)
        if os.path.isdir(s):
            r = subprocess.run(["cp", "-al", s, d], capture_output=True)
            if r.returncode:   # another file system: a real copy
                shutil.copytree(s, d, symlinks=True)
        else:
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)
    return dest


def as_user(user: str | int, script: str, *, env: dict | None = None, timeout=600, check=True, gid: int | None = None,
            home: str | None = None) -> subprocess.CompletedProcess:
    """``bash -c script`` as ``user`` (a name, or a uid with ``gid``), with a clean environment."""
    if isinstance(user, str):
        pw = pwd.getpwnam(user)
        uid, gid, home = pw.pw_uid, pw.pw_gid, home or pw.pw_dir
    else:
        uid, home = user, home
    base = {"HOME": home, "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "USER": pwd.getpwuid(uid).pw_name}
    base.update(env or {})
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups" if isinstance(user, str) else "--clear-groups",
           "env", "-i", *[f"{k}={v}" for k, v in base.items()], "bash", "-c", script]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")
    if check and r.returncode:
        raise AssertionError(f"as {user}: {script!r} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def node_image(user: str | int, home: str, site: str, *, gid: int | None = None, bashrc: str = "") -> None:
    """The node's Python environment at HOME/venv, first on the PATH of every shell (~/.bashrc), with a
    `ray` command; ``bashrc`` lines are appended (what a real node's environment would hold)."""
    py_lib = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
    ray_cmd = ("#!/bin/sh\nexec \"$HOME/venv/bin/python\" -c "
               "'import sys; from ray.scripts.scripts import main; sys.argv[0] = \"ray\"; sys.exit(main())' \"$@\"\n")
    script = f"""set -e
rm -rf ~/venv
{NODE_PYTHON} -m venv ~/venv
~/venv/bin/pip uninstall -q -y setuptools 2>/dev/null || true   # the image's own (newer) one is in the site
echo {site} > ~/venv/{py_lib}/nodekd-image.pth
cat > ~/venv/bin/ray <<'EOF'
{ray_cmd}EOF
chmod +x ~/venv/bin/ray
cat > ~/.bashrc <<'EOF'
export PATH="$HOME/venv/bin:$PATH"
{bashrc}
EOF
"""
    as_user(user, script, gid=gid, home=home, timeout=300)


def fresh_tmp(prefix: str) -> str:
    """A folder under /tmp that other users can enter (pytest's own tmp_path is root-only)."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o755)
    return d
