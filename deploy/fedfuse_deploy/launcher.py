"""A real deployment on one machine: a Flower SuperLink and SuperNodes as separate processes.

Everything lives under one working folder: Flower's home (``flwr/``, with the connection
``fedfuse-local``), certificates and node keys, one log per process, the SuperLink's database
and ``deployment.json`` with the PID and port of every process started, so that ``down`` (from
any later process) stops exactly those processes and nothing else. Each process starts in its
own session; stopping signals its whole process group (a SuperLink spawns ServerApp processes,
a SuperNode its ClientApp processes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fedfuse.errors import DeploymentError, FedfuseError
from fedfuse_deploy.credentials import make_certificates, make_node_keys

CONNECTION = "fedfuse-local"
_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _bin(name: str) -> str:
    """The console script next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise DeploymentError(f"{name} not found: install fedfuse (it brings flwr) into this environment")
    return found


@dataclass
class Proc:
    pid: int
    port: int
    log: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LocalDeployment:
    workdir: Path
    host: str = "127.0.0.1"
    secure: bool = True
    auth: bool = True
    superlink: Proc | None = None
    supernodes: dict[str, Proc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        if self.auth and not self.secure:
            raise FedfuseError("SuperNode authentication needs TLS: drop --insecure or add --no-auth")

    # -- paths and environment --------------------------------------------------------------------
    @property
    def flwr_home(self) -> Path:
        return self.workdir / "flwr"

    @property
    def certs(self) -> Path:
        return self.workdir / "certs"

    @property
    def ca_cert(self) -> Path:
        return self.certs / "ca.crt"

    def env(self) -> dict[str, str]:
        """Flower's processes spawn further Flower commands by name: this venv's come first."""
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return {**os.environ, **_ENV, "FLWR_HOME": str(self.flwr_home), "PATH": path}

    def _spawn(self, name: str, cmd: list[str]) -> tuple[int, str]:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env(),
                                    cwd=self.workdir, start_new_session=True)
        return proc.pid, str(log)

    def save(self) -> None:
        state = {"host": self.host, "secure": self.secure, "auth": self.auth,
                 "superlink": asdict(self.superlink) if self.superlink else None,
                 "supernodes": {k: asdict(v) for k, v in self.supernodes.items()}}
        (self.workdir / "deployment.json").write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, workdir: str | os.PathLike) -> "LocalDeployment":
        path = Path(workdir).resolve() / "deployment.json"
        if not path.exists():
            raise FedfuseError(f"no deployment in {workdir} (no deployment.json): run `fedfuse deploy up` first")
        state = json.loads(path.read_text())
        dep = cls(Path(workdir), state["host"], state["secure"], state["auth"])
        dep.superlink = Proc(**state["superlink"]) if state["superlink"] else None
        dep.supernodes = {k: Proc(**v) for k, v in state["supernodes"].items()}
        return dep

    # -- SuperLink --------------------------------------------------------------------------------
    def start_superlink(self, port: int | None = None, timeout: float = 60.0) -> Proc:
        """Start (or restart, on the same port and database) the SuperLink; wait for health."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        port = port or (self.superlink.port if self.superlink else free_port(self.host))
        cmd = [_bin("flower-superlink"), "--host", self.host, "--port", str(port),
               "--database", str(self.workdir / "superlink.db"),
               "--disable-runtime-dependency-installation"]
        if self.secure:
            if not self.ca_cert.exists():
                make_certificates(self.certs, [self.host, "localhost"])
            cmd += ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(self.certs / "server.pem"),
                    "--ssl-keyfile", str(self.certs / "server.key")]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        pid, log = self._spawn("superlink", cmd)
        self.superlink = Proc(pid, port, log)
        self._write_connection()
        self.save()
        self._wait(lambda: self._superlink_healthy(), timeout, "SuperLink", pid, log)
        return self.superlink

    def _superlink_healthy(self) -> bool:
        scheme = "https" if self.secure else "http"
        try:
            verify: Any = ssl.create_default_context(cafile=str(self.ca_cert)) if self.secure else False
            return httpx.get(f"{scheme}://{self.host}:{self.superlink.port}/health",
                             verify=verify, timeout=1.0).is_success
        except httpx.HTTPError:
            return False

    def _write_connection(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{self.host}:{self.superlink.port}"']
        lines.append(f'root-certificates = "{self.ca_cert}"' if self.secure else "insecure = true")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    # -- SuperNodes -------------------------------------------------------------------------------
    def add_supernode(self, name: str, data: str | os.PathLike, register: bool = True,
                      key: Path | None = None, root_cert: Path | None = None,
                      timeout: float = 60.0, wait: bool = True, client_id: str | None = None) -> Proc:
        """Start a SuperNode for device ``name`` whose private data is the file ``data``.

        With authentication its key pair is made and registered first (``register=False`` or a
        foreign ``key`` make a node the SuperLink must refuse: used to test exactly that). The
        device calls itself ``client_id`` (default: ``name``); another device's id makes an
        impostor the server must refuse.
        """
        if self.superlink is None:
            raise FedfuseError("start the SuperLink first")
        port = free_port(self.host)
        cmd = [_bin("flower-supernode"), "--superlink", f"{self.host}:{self.superlink.port}",
               "--port", str(port), "--node-config", f"client-id='{client_id or name}' data='{Path(data).resolve()}'",
               "--max-wait-time", str(int(timeout))]
        cmd += ["--root-certificates", str(root_cert or self.ca_cert)] if self.secure else ["--insecure"]
        extra: dict[str, Any] = {}
        if self.auth:
            if key is None:
                key, pub = make_node_keys(self.workdir / "keys", name)
                if register:
                    extra["node_id"] = self.register(pub)
            cmd += ["--auth-supernode-private-key", str(key)]
        pid, log = self._spawn(f"supernode-{name}", cmd)
        proc = Proc(pid, port, log, extra)
        self.supernodes[name] = proc
        self.save()
        if wait:
            self._wait(lambda: "SuperNode ID:" in Path(log).read_text(errors="replace"), timeout,
                       f"SuperNode {name}", pid, log)
        return proc

    def register(self, public_key: Path) -> str:
        out = self.flwr(["supernode", "register", str(public_key), CONNECTION], timeout=60)
        found = re.search(r"SuperNode (\d+) registered", out)
        if not found:
            raise DeploymentError(f"registering {public_key.name} failed:\n{out}")
        return found.group(1)

    def alive(self, name: str) -> bool:
        return alive_pid(self.supernodes[name].pid)

    # -- runs -------------------------------------------------------------------------------------
    def flwr(self, args: list[str], timeout: float = 600, check: bool = True) -> str:
        res = subprocess.run([_bin("flwr"), *args], env=self.env(), capture_output=True, text=True,
                             timeout=timeout, cwd=self.workdir)
        out = res.stdout + res.stderr
        if check and res.returncode != 0:
            raise DeploymentError(f"flwr {' '.join(args)} failed ({res.returncode}):\n{out[-3000:]}")
        return out

    def run(self, app: str | os.PathLike, run_config: str, timeout: float = 900) -> str:
        """``flwr run <app> fedfuse-local --run-config ... --stream``; returns its output."""
        return self.flwr(["run", str(Path(app).resolve()), CONNECTION, "--run-config", run_config,
                          "--stream"], timeout=timeout)

    # -- shutdown ---------------------------------------------------------------------------------
    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink's process group: a crash, not a shutdown (for tests)."""
        if self.superlink:
            _signal_group(self.superlink.pid, signal.SIGKILL)
            _wait_gone(self.superlink.pid, 10)

    def down(self, grace: float = 10.0) -> list[int]:
        """Stop every process this deployment started (SIGTERM, then SIGKILL); returns the
        ports still listening afterwards (none, normally)."""
        procs = list(self.supernodes.values()) + ([self.superlink] if self.superlink else [])
        for p in procs:
            _signal_group(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            if not _wait_gone(p.pid, max(0.0, deadline - time.monotonic())):
                _signal_group(p.pid, signal.SIGKILL)
                _wait_gone(p.pid, 5)
        still = [p.port for p in procs if port_open(self.host, p.port)]
        self.superlink, self.supernodes = None, {}
        self.save()
        return still

    def _wait(self, ready, timeout: float, what: str, pid: int, log: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if not alive_pid(pid):
                raise DeploymentError(f"{what} exited during start-up; see {log}:\n{_tail(log)}")
            time.sleep(0.3)
        raise DeploymentError(f"{what} not healthy after {timeout:.0f}s; see {log}:\n{_tail(log)}")


def _tail(log: str, n: int = 15) -> str:
    return "\n".join(Path(log).read_text(errors="replace").splitlines()[-n:])


def alive_pid(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap our own child if it exited
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # each process leads its own session: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive_pid(pid):
            return True
        time.sleep(0.1)
    return not alive_pid(pid)
