"""nginx (with njs) in front of loramix replicas, configured from deploy/router/: the shipped
nginx.conf with its upstream's `server` lines and listen address replaced, and, for the round
robin baseline, its `hash` line removed. Used by bench/routing.py and tests/test_deploy.py."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ROUTER_DIR = REPO_ROOT / "deploy" / "router"
# Where deploy/install-tools.sh unpacks Debian's packages when it cannot install them as root.
UNPACKED = REPO_ROOT / ".cache" / "nginx"
MODULE = Path("usr/lib/nginx/modules/ngx_http_js_module.so")
POLICIES = ("consistent_hash", "round_robin")


def find_nginx() -> tuple[str, Path] | None:
    """(nginx binary, njs module) from PATH and /usr, or from .cache/nginx; None if absent."""
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if binary and (Path("/") / MODULE).is_file():
        return binary, Path("/") / MODULE
    unpacked = UNPACKED / "usr" / "sbin" / "nginx"
    if unpacked.is_file() and (UNPACKED / MODULE).is_file():
        return str(unpacked), UNPACKED / MODULE
    return None


def render(replicas: list[str], listen: str, policy: str, module: Path) -> str:
    """deploy/router/nginx.conf for `replicas` ("host:port"), listening on `listen`."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
    text = (ROUTER_DIR / "nginx.conf").read_text()
    servers = "".join(f"        server {replica};\n" for replica in replicas)
    text, found = re.subn(r"(# replicas: begin\n).*?(\s*# replicas: end)", lambda m: m[1] + servers.rstrip("\n") + m[2],
                          text, flags=re.S)
    text, listens = re.subn(r"listen \S+;", f"listen {listen};", text)
    text, modules = re.subn(r"load_module \S+;", f"load_module {module};", text)
    if (found, listens, modules) != (1, 1, 1):
        raise ValueError("deploy/router/nginx.conf lost a line the renderer replaces")
    if policy == "round_robin":
        text, hashes = re.subn(r"\n\s*hash \$composition consistent;[^\n]*", "", text)
        if hashes != 1:
            raise ValueError("deploy/router/nginx.conf has no `hash $composition consistent;` line")
    return text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NginxRouter:
    """nginx running the rendered config from `run_dir` on a free loopback port (`url`)."""

    def __init__(self, replicas: list[str], policy: str, run_dir: Path) -> None:
        found = find_nginx()
        if found is None:
            raise FileNotFoundError("nginx with the njs module is not installed (bash deploy/install-tools.sh)")
        self.binary, module = found
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROUTER_DIR / "composition.js", run_dir / "composition.js")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = run_dir / "nginx.conf"
        self.config.write_text(render(replicas, f"127.0.0.1:{self.port}", policy, module))
        self.log_path = run_dir / "error.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_listening()

    def command(self, *extra: str) -> list[str]:
        return [self.binary, "-p", str(self.run_dir), "-c", str(self.config), "-e", "stderr", *extra]

    def _wait_listening(self, limit_s: float = 20) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited early:\n{self.log()}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"nginx did not listen within {limit_s}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
