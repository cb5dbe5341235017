"""Every core: `[gateway] workers = N` runs N worker processes under one supervisor.

The supervisor (`bastion serve` itself) binds every public and control address once, as a group of N sockets
with SO_REUSEPORT, and gives socket i of each group to worker i. A classic BPF program on each group picks the
worker by the client's address (IPv4 address, or bits 32-63 of an IPv6 one) modulo N, so one client (a browser
and its cookie, an operator's page and its event stream) always reaches the same worker while many clients
spread over all of them. The supervisor keeps its copies of the sockets open, so a worker that dies leaves its
socket's queue waiting for the restarted worker instead of resetting it.

Each worker is a whole gateway (`App`) and a cluster node named `<node>.w<i>`: the workers share one session view,
disconnects, notices, locks, revoked tokens, penalties and one-time links through the supervisor's hub
(`gateway/hub.py`, the Redis commands the cluster uses, over a private Unix socket), or through the Redis that
`[cluster]` names. Any worker answers the control port with the whole view, and `/metrics` with every worker's
series summed (`gateway/metrics_merge.py`).

Lifecycle: each worker reports READY/RELOADING/STOPPING/WATCHDOG on a notify socket of its own (systemd's
protocol, `sdnotify.Notifier`). The supervisor is ready when every worker is; SIGHUP is passed to every worker
(RELOADING, then READY when all have reloaded); SIGTERM/SIGINT is passed to every worker, which drains as one
gateway does, and workers still running after `shutdown_grace` plus a margin are killed. A worker that exits
or stops petting its watchdog is logged (`worker_exited`, with its exit status), its hub key is dropped so the
others report its sessions `node_lost` at once, and it is started again after a back-off (1 s, doubling to 30 s,
back to 1 s after a minute of good health). A worker that fails before the first READY fails the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from structlog.typing import FilteringBoundLogger

from gateway.config import ClusterSection, Config
from gateway.errors import StartupError
from gateway.hub import Hub
from gateway.net.listener import bind_group
from gateway.sdnotify import ServiceNotifier

WORKER_ENV = "BASTION_WORKER"
HUB_HEARTBEAT = 1.0  # seconds between a worker's heartbeats to the hub: how stale another worker's rows may be
HUB_TTL = 3.0
HUB_TIMEOUT = 1.0
WATCHDOG_USEC = 10_000_000  # a worker pets every 5 s; one silent for 20 s is killed and started again
START_TIMEOUT = 60.0
STOP_MARGIN = 15.0
BACKOFF_MIN, BACKOFF_MAX, HEALTHY_AFTER = 1.0, 30.0, 60.0


def worker_node(node: str, index: int) -> str:
    return f"{node}.w{index}"


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker gets from its supervisor, as JSON in BASTION_WORKER (fds are inherited)."""

    index: int
    count: int
    base: str  # the gateway's node name; this worker is `<base>.w<index>`
    hub: str | None  # the hub's unix:// URL; None when [cluster] names a Redis
    public_fds: tuple[int, ...]
    control_fds: tuple[int, ...]

    @property
    def node(self) -> str:
        return worker_node(self.base, self.index)

    @property
    def siblings(self) -> tuple[str, ...]:
        return tuple(worker_node(self.base, i) for i in range(1, self.count + 1) if i != self.index)

    def to_env(self) -> str:
        return json.dumps({**self.__dict__, "public_fds": list(self.public_fds), "control_fds": list(self.control_fds)})

    @classmethod
    def from_env(cls, raw: str) -> WorkerSpec:
        """Raises StartupError when it is not what a supervisor writes."""
        try:
            doc = json.loads(raw)
            spec = cls(
                index=int(doc["index"]), count=int(doc["count"]), base=str(doc["base"]),
                hub=None if doc["hub"] is None else str(doc["hub"]),
                public_fds=tuple(int(f) for f in doc["public_fds"]), control_fds=tuple(int(f) for f in doc["control_fds"]),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            raise StartupError(f"{WORKER_ENV} is not a worker's specification: {exc}") from None
        if not 1 <= spec.index <= spec.count:
            raise StartupError(f"{WORKER_ENV}: worker {spec.index} of {spec.count}")
        return spec

    def sockets(self) -> tuple[list[socket.socket], list[socket.socket]]:
        """The inherited listening sockets, non-blocking. Raises StartupError if an fd is not a listening socket."""

        def wrap(fd: int) -> socket.socket:
            try:
                s = socket.socket(fileno=fd)
            except OSError as exc:
                raise StartupError(f"{WORKER_ENV}: fd {fd}: {exc.strerror}") from None
            s.setblocking(False)
            return s

        return [wrap(fd) for fd in self.public_fds], [wrap(fd) for fd in self.control_fds]


def worker_config(cfg: Config, spec: WorkerSpec) -> Config:
    """The worker's view of the config: its own node name, and the hub as its cluster unless [cluster] names a Redis."""
    cluster = cfg.cluster
    if spec.hub is not None:
        cluster = ClusterSection(redis_url=spec.hub, heartbeat=HUB_HEARTBEAT, node_ttl=HUB_TTL, timeout=HUB_TIMEOUT)
    return replace(cfg, gateway=replace(cfg.gateway, node=spec.node), cluster=cluster)


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    notify: socket.socket | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    reloading: bool = False
    reloaded: asyncio.Event = field(default_factory=asyncio.Event)
    last_ping: float = 0.0
    started: float = 0.0
    restarts: int = 0


class Supervisor:
    """Runs `cfg.gateway.workers` workers (see the module docstring). `run(stop)` returns the exit status."""

    def __init__(
        self, cfg: Config, config_path: Path, log: FilteringBoundLogger, notifier: ServiceNotifier, worker_argv: Sequence[str]
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.log = log
        self.notifier = notifier
        self.count = cfg.gateway.workers
        self._argv = list(worker_argv)  # the command that starts one worker: `python -m gateway serve --config ...`
        self._workers = [_Worker(i) for i in range(1, self.count + 1)]
        self._public: list[list[socket.socket]] = []
        self._control: list[list[socket.socket]] = []
        self._dir: Path | None = None
        self.hub: Hub | None = None
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._reloads: set[asyncio.Task[None]] = set()
        self._serving = False  # every worker said READY=1 once
        self.restarts = 0

    def __repr__(self) -> str:
        return f"Supervisor(workers={self.count}, node={self.cfg.gateway.node!r})"

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process is not None and w.process.returncode is None]

    async def run(self, stop: asyncio.Event) -> int:
        """Bind, start every worker, serve until `stop`, stop every worker. Raises StartupError before anything runs."""
        loop = asyncio.get_running_loop()
        self._bind()
        self._dir = Path(tempfile.mkdtemp(prefix="bastion-workers-"))  # 0700, short enough for AF_UNIX paths
        try:
            if self.cfg.cluster is None:
                self.hub = Hub(self._dir / "hub.sock")
                await self.hub.start()
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
            for w in self._workers:
                await self._spawn(w)
            if not await self._all_ready(START_TIMEOUT, stop):
                if stop.is_set():  # SIGTERM while the workers start: they are stopped as from serving
                    return 0
                self.log.error("gateway_start_failed", reason=StartupError.reason, error="a worker did not start")
                return 1
            self._serving = True
            self._tasks = [asyncio.create_task(self._supervise(w), name=f"worker-{w.index}") for w in self._workers]
            self._tasks.append(asyncio.create_task(self._watch_pings(), name="worker-watchdogs"))
            self.notifier.ready(f"serving with {self.count} workers")
            self.log.info("workers_started", workers=self.count, pids=self.pids, node=self.cfg.gateway.node)
            if self.notifier.watchdog_interval is not None:
                self._tasks.append(asyncio.create_task(self._pet(self.notifier.watchdog_interval), name="systemd-watchdog"))
            await stop.wait()
            return 0
        finally:
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signal.SIGHUP)
            await self._stop_all()

    # Start-up.

    def _bind(self) -> None:
        try:
            for addr in self.cfg.public.listen:
                self._public.append(bind_group(addr, self.count))
            for addr in self.cfg.control.listen:
                self._control.append(bind_group(addr, self.count))
        except StartupError:
            self._close_sockets()
            raise

    def _close_sockets(self) -> None:
        for group in [*self._public, *self._control]:
            for s in group:
                s.close()

    async def _spawn(self, w: _Worker) -> None:
        assert self._dir is not None
        loop = asyncio.get_running_loop()
        path = self._dir / f"notify-{w.index}.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if w.notify is not None:
            loop.remove_reader(w.notify.fileno())
            w.notify.close()
        w.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        w.notify.bind(str(path))
        w.notify.setblocking(False)
        loop.add_reader(w.notify.fileno(), self._notified, w)
        w.ready.clear()
        public = [g[w.index - 1] for g in self._public]
        control = [g[w.index - 1] for g in self._control]
        spec = WorkerSpec(
            index=w.index, count=self.count, base=self.cfg.gateway.node, hub=self.hub.url if self.hub else None,
            public_fds=tuple(s.fileno() for s in public), control_fds=tuple(s.fileno() for s in control),
        )  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS")}
        env |= {WORKER_ENV: spec.to_env(), "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        w.process = await asyncio.create_subprocess_exec(
            *self._argv, stdin=asyncio.subprocess.DEVNULL, pass_fds=[s.fileno() for s in public + control], env=env
        )
        w.started = w.last_ping = loop.time()
        self.log.info("worker_started", worker=w.index, pid=w.process.pid)

    def _notified(self, w: _Worker) -> None:
        assert w.notify is not None
        while True:
            try:
                data = w.notify.recv(4096)
            except OSError:  # drained (BlockingIOError), or the socket is gone
                return
            lines = set(data.decode("utf-8", "replace").split("\n"))
            w.last_ping = asyncio.get_running_loop().time()
            if "RELOADING=1" in lines:
                w.reloading = True
            if "READY=1" in lines:
                w.ready.set()
                if w.reloading:
                    w.reloading = False
                    w.reloaded.set()

    async def _all_ready(self, timeout: float, stop: asyncio.Event) -> bool:
        """Every worker said READY=1 (True), or one exited first, `stop` was set or the time ran out (False)."""
        waits = [asyncio.ensure_future(w.ready.wait()) for w in self._workers]
        exits = [asyncio.ensure_future(w.process.wait()) for w in self._workers if w.process is not None]
        exits.append(asyncio.ensure_future(stop.wait()))
        try:
            async with asyncio.timeout(timeout):
                pending = set(waits)
                while pending:
                    done, _ = await asyncio.wait(pending | set(exits), return_when=asyncio.FIRST_COMPLETED)
                    if any(e in done for e in exits):
                        return False
                    pending -= done
                return True
        except TimeoutError:
            return False
        finally:
            for f in waits + exits:
                f.cancel()

    # Running.

    def request_reload(self) -> None:
        """SIGHUP: every serving worker reloads its config (each reads the file itself; one still starting reads the new
        file anyway); READY once all of them have. Before every worker first served it is ignored, as one gateway
        ignores it: a worker that has not set its SIGHUP handler yet would die of the signal."""
        if not self._serving:
            self.log.warning("config_reload_ignored", reason="not serving")
            return
        self.log.info("workers_reload_requested", workers=self.count)
        self.notifier.reloading()
        asked = [w for w in self._workers if w.ready.is_set() and w.process is not None and w.process.returncode is None]
        for w in asked:
            w.reloaded.clear()
            self._signal(w, signal.SIGHUP)
        task = asyncio.create_task(self._reloaded(asked), name="workers-reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reloaded(self, asked: list[_Worker]) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30.0):
                await asyncio.gather(*(w.reloaded.wait() for w in asked))
        self.notifier.ready(f"serving with {self.count} workers")

    def _signal(self, w: _Worker, sig: int) -> None:
        if w.process is not None and w.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                w.process.send_signal(sig)

    async def _supervise(self, w: _Worker) -> None:
        """Start `w` again whenever it exits while the gateway runs."""
        loop = asyncio.get_running_loop()
        backoff = BACKOFF_MIN
        while True:
            assert w.process is not None
            code = await w.process.wait()
            if self._stopping:
                return
            lived = loop.time() - w.started
            status = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
            self.log.error("worker_exited", worker=w.index, pid=w.process.pid, status=status, lived=round(lived, 1))
            if self.hub is not None:  # the others report its sessions lost now, not when its key expires
                node = worker_node(self.cfg.gateway.node, w.index)
                last = self.hub.get("bastion:rows:" + node)  # its last heartbeat: every session the view showed
                self.hub.delete("bastion:rows:" + node)
                self.hub.delete("bastion:alive:" + node)
                self.hub.publish("bastion:nodes", json.dumps({"origin": node, "lost": True, "last": last}))
            delay = BACKOFF_MIN if lived >= HEALTHY_AFTER else backoff  # 1 s, 2 s, 4 s ... 30 s; 1 s again once healthy
            backoff = min(BACKOFF_MAX, delay * 2)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            w.restarts += 1
            self.restarts += 1
            self._publish_status()
            try:
                await self._spawn(w)
            except OSError as exc:
                self.log.error("worker_start_failed", worker=w.index, error=str(exc))
                w.started = loop.time()
                continue

    def _publish_status(self) -> None:
        """The supervisor's own figures, where the workers' /metrics read them."""
        if self.hub is not None:
            doc = {"workers": self.count, "restarts": self.restarts}
            self.hub.put("bastion:supervisor", json.dumps(doc))

    async def _watch_pings(self) -> None:
        """A worker that stopped petting its watchdog (a hung loop) is killed; `_supervise` starts it again. One that is
        (re)starting pets nothing until it serves: it gets START_TIMEOUT (a loaded machine took 11 s to start four)."""
        serving = 2 * WATCHDOG_USEC / 1_000_000
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(serving / 4)
            for w in self._workers:
                limit = serving if w.ready.is_set() else START_TIMEOUT
                if w.process is not None and w.process.returncode is None and loop.time() - w.last_ping > limit:
                    self.log.error("worker_unresponsive", worker=w.index, pid=w.process.pid, silent=round(loop.time() - w.last_ping, 1))
                    self._signal(w, signal.SIGKILL)
                    w.last_ping = loop.time()

    async def _pet(self, every: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(every)

    # Stopping.

    async def _stop_all(self) -> None:
        self._stopping = True
        for t in [*self._tasks, *self._reloads]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._reloads, return_exceptions=True)
        live = [w for w in self._workers if w.process is not None and w.process.returncode is None]
        if live:
            self.notifier.stopping(f"stopping {len(live)} workers")
            self.log.info("workers_stopping", pids=[w.process.pid for w in live if w.process is not None])
        for w in live:
            self._signal(w, signal.SIGTERM)
        deadline = self.cfg.gateway.shutdown_grace + STOP_MARGIN
        procs = [w.process for w in live if w.process is not None]
        if procs:
            try:
                async with asyncio.timeout(deadline):
                    await asyncio.gather(*(p.wait() for p in procs))
            except TimeoutError:
                for w in live:
                    if w.process is not None and w.process.returncode is None:
                        self.log.error("worker_killed", worker=w.index, pid=w.process.pid, after=deadline)
                        self._signal(w, signal.SIGKILL)
                await asyncio.gather(*(p.wait() for p in procs))
        loop = asyncio.get_running_loop()
        for w in self._workers:
            if w.notify is not None:
                loop.remove_reader(w.notify.fileno())
                w.notify.close()
        if self.hub is not None:
            await self.hub.stop()
        self._close_sockets()
        if self._dir is not None:
            for p in self._dir.iterdir():
                with contextlib.suppress(OSError):
                    p.unlink()
            with contextlib.suppress(OSError):
                self._dir.rmdir()
        self.log.info("workers_stopped", workers=self.count)


def worker_command(config_path: Path, log_format: str) -> list[str]:
    return [sys.executable, "-m", "gateway", "serve", "--config", str(config_path), "--log-format", log_format]


def supervisor_status(raw: str | None) -> dict[str, Any]:
    """The supervisor's figures as a worker reads them from the hub ({} when there are none)."""
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}
