"""The VLM worker subprocess and its supervisor: llama.cpp crashes, hangs and OOMs stay out of the daemon.

The model is loaded once per worker process. The supervisor (`VlmWorker`, in the daemon) starts the
worker at `start()`, sends one request at a time over a pipe, enforces the per-request timeout
(the worker stops generating at the deadline itself; a worker stuck in native code is killed a
grace period later), notices a dead worker and restarts it with exponential back-off.

Example:
    worker = VlmWorker(config); worker.start()
    reply = worker.infer(prompt.messages, prompt.grammar)   # blocks; never raises for model trouble
    if reply.ok: print(reply.text)
    worker.stop()
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..config.vlm import VlmConfig
from .runner import LlamaRunner

log = logging.getLogger(__name__)

POLL_S = 0.05


@dataclass(frozen=True)
class WorkerReply:
    """The outcome of one request. `reason` says why it failed (it goes into the result update)."""

    ok: bool
    text: str = ""
    reason: str = ""
    completion: dict[str, Any] = field(default_factory=dict)  # runner.Completion.to_json()
    model: str = ""
    chat_format: str = ""
    wall_ms: float = 0.0


def hard_timeout(timeout_s: float) -> float:
    """When the supervisor stops waiting for a worker that did not stop itself at the deadline."""
    return timeout_s + max(2.0, 0.25 * timeout_s)


def backoff_delay(failures: int, initial_s: float, max_s: float) -> float:
    """Wait before restart number `failures` (1, 2, ...): initial, 2x initial, ... capped at max."""
    if failures <= 0:
        return 0.0
    return min(max_s, initial_s * 2.0 ** (failures - 1))


def _child_main(conn: Any, config_json: str) -> None:
    """Entry point of the worker process: load once, then answer requests until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the daemon: the supervisor stops us

    config = VlmConfig.model_validate_json(config_json)
    started = time.monotonic()
    try:
        runner = LlamaRunner.load(config)
    except Exception as exc:  # any load failure is reported, the supervisor backs off
        conn.send({"op": "load_failed", "error": f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)})
        return
    conn.send(
        {
            "op": "ready",
            "model": runner.model_name,
            "chat_format": runner.chat_format,
            "load_ms": 1000.0 * (time.monotonic() - started),
        }
    )
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message.get("op") == "stop":
            break
        if message.get("op") != "infer":
            continue
        deadline = time.monotonic() + float(message["timeout_s"])
        try:
            done = runner.complete(
                message["messages"],
                message["grammar"],
                max_tokens=int(message["max_tokens"]),
                temperature=float(message["temperature"]),
                seed=int(message["seed"]),
                deadline=deadline,
                repeat_penalty=float(message.get("repeat_penalty", 1.0)),
            )
        except Exception as exc:  # a failed request must not end the worker
            conn.send({"op": "result", "id": message["id"], "ok": False, "reason": f"llama.cpp error: {exc}"})
            continue
        if done.finish_reason == "timeout":
            reply = {"ok": False, "reason": f"timeout after {message['timeout_s']:g} s (generation stopped)"}
        else:
            reply = {"ok": True}
        conn.send({"op": "result", "id": message["id"], "completion": done.to_json(), **reply})
    runner.close()


class VlmWorker:
    """Supervisor of one worker process (one request at a time)."""

    def __init__(self, config: VlmConfig, name: str = "vlm-worker") -> None:
        self.config = config
        self.name = name
        self._mp = multiprocessing.get_context("spawn")  # never fork a process holding threads
        self._cond = threading.Condition()
        self._request_lock = threading.Lock()
        self._stopping = threading.Event()
        self._proc: Any = None
        self._conn: Any = None
        self._ready = False
        self._loading = False
        self._busy = False
        self._model = ""
        self._chat_format = ""
        self._load_ms = 0.0
        self._failures = 0
        self._next_start = 0.0
        self._starts = 0
        self._deaths = 0
        self._last_error = ""
        self._load_error = ""
        self._request_id = 0
        self._monitor: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker (the model loads in the background) and the restart monitor."""
        if self._monitor is not None:
            return
        self._stopping.clear()
        self._monitor = threading.Thread(target=self._monitor_loop, name=f"{self.name}-monitor", daemon=True)
        self._monitor.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit, kill it if it does not within `timeout`."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._monitor is not None:
            self._monitor.join(timeout)
            self._monitor = None
        got_lock = self._request_lock.acquire(timeout=timeout)
        try:
            with self._cond:
                proc, conn = self._proc, self._conn
                self._proc, self._conn, self._ready = None, None, False
            if proc is not None:
                try:
                    if got_lock and conn is not None:
                        conn.send({"op": "stop"})
                except (OSError, ValueError):
                    pass
                proc.join(timeout if got_lock else 0)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout)
            if conn is not None:
                conn.close()
        finally:
            if got_lock:
                self._request_lock.release()

    @property
    def pid(self) -> int | None:
        with self._cond:
            return self._proc.pid if self._proc is not None else None

    def state(self) -> dict[str, Any]:
        with self._cond:
            return {
                "ready": self._ready,
                "loading": self._loading,
                "busy": self._busy,
                "pid": self._proc.pid if self._proc is not None else None,
                "model": self._model,
                "chat_format": self._chat_format,
                "load_ms": round(self._load_ms, 1),
                "starts": self._starts,
                "deaths": self._deaths,
                "consecutive_failures": self._failures,
                "next_restart_in_s": round(max(0.0, self._next_start - time.monotonic()), 2)
                if self._proc is None
                else 0.0,
                "last_error": self._last_error,
            }

    def wait_ready(self, timeout: float) -> bool:
        """Block until a worker is ready (True) or the timeout passes / loading failed (False)."""
        end = time.monotonic() + timeout
        with self._cond:
            while not self._ready and not self._stopping.is_set():
                if self._load_error and not self._loading and self._proc is None:
                    return False
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.5))
            return self._ready

    # -- requests ----------------------------------------------------------------------------------

    def infer(
        self,
        messages: list[dict[str, Any]],
        grammar: str,
        timeout_s: float | None = None,
        max_tokens: int | None = None,
    ) -> WorkerReply:
        """Run one request. Waits for a (re)starting worker; fails fast when the model cannot load.
        `max_tokens` defaults to vlm.max_tokens (follow-up answers use vlm.ask.max_tokens)."""
        timeout_s = float(timeout_s or self.config.timeout_s)
        started = time.monotonic()
        with self._request_lock:
            wait_s = self.config.load_timeout_s + self.config.restart_backoff_max_s
            if not self.wait_ready(wait_s):
                with self._cond:
                    reason = self._unavailable_reason()
                return WorkerReply(ok=False, reason=reason, wall_ms=1000.0 * (time.monotonic() - started))
            with self._cond:
                proc, conn = self._proc, self._conn
                self._busy = True
                self._request_id += 1
                request_id = self._request_id
                model, chat_format = self._model, self._chat_format
            try:
                reply, lost_reason = self._exchange(proc, conn, request_id, messages, grammar, timeout_s, max_tokens)
            finally:
                with self._cond:
                    self._busy = False
            wall_ms = 1000.0 * (time.monotonic() - started)
            if reply is None:  # the worker is gone or was killed
                return WorkerReply(ok=False, reason=lost_reason, model=model, chat_format=chat_format, wall_ms=wall_ms)
            if reply.get("ok"):
                with self._cond:
                    self._failures = 0
            completion = reply.get("completion") or {}
            return WorkerReply(
                ok=bool(reply.get("ok")),
                text=completion.get("text", ""),
                reason=reply.get("reason", ""),
                completion=completion,
                model=model,
                chat_format=chat_format,
                wall_ms=wall_ms,
            )

    def _exchange(
        self, proc: Any, conn: Any, request_id: int, messages: list, grammar: str, timeout_s: float,
        max_tokens: int | None = None,
    ) -> tuple[dict[str, Any] | None, str]:
        request = {
            "op": "infer",
            "id": request_id,
            "messages": messages,
            "grammar": grammar,
            "timeout_s": timeout_s,
            "max_tokens": max_tokens or self.config.max_tokens,
            "temperature": self.config.temperature,
            "seed": self.config.seed,
            "repeat_penalty": self.config.repeat_penalty,
        }
        # Requests carry base64 images (easily megabytes), more than a socket buffer holds: a hung
        # worker would block a plain send() forever, so it runs beside the timeout loop below.
        send_error: list[BaseException] = []

        def send() -> None:
            try:
                conn.send(request)
            except (OSError, ValueError) as exc:
                send_error.append(exc)

        sender = threading.Thread(target=send, name=f"{self.name}-send", daemon=True)
        sender.start()

        def lost(reason: str, kill: bool = False, count: bool = True) -> tuple[None, str]:
            if kill and proc.is_alive():
                proc.kill()
                proc.join(5.0)
            sender.join(2.0)  # a send into a dead worker fails at once; then the pipe may close
            return None, self._lost(proc, reason, kill=kill, count=count)

        end = time.monotonic() + hard_timeout(timeout_s)
        while True:
            if self._stopping.is_set():
                return lost("vlm stage stopping", kill=True, count=False)
            try:
                if conn.poll(POLL_S):
                    reply = conn.recv()
                    if reply.get("op") == "result" and reply.get("id") == request_id:
                        return reply, ""
                    continue
            except (EOFError, OSError):
                proc.join(1.0)
                return lost(f"worker died mid-request ({_exit_description(proc)})")
            if not proc.is_alive():
                proc.join(1.0)
                return lost(f"worker died mid-request ({_exit_description(proc)})")
            if send_error:
                proc.join(1.0)
                if not proc.is_alive():
                    return lost(f"worker died mid-request ({_exit_description(proc)})")
                return lost(f"could not send the request to the worker ({send_error[0]}); restarting it", kill=True)
            if time.monotonic() > end:
                return lost(f"timeout after {timeout_s:g} s (worker unresponsive, killed)", kill=True)

    # -- process management ------------------------------------------------------------------------

    def _unavailable_reason(self) -> str:
        if self._stopping.is_set():
            return "vlm stage stopping"
        if self._load_error:
            return f"model load failed: {self._load_error}"
        if self._loading:
            return f"model still loading after {self.config.load_timeout_s:g} s"
        return f"worker unavailable ({self._last_error or 'not started'})"

    def _lost(self, proc: Any, reason: str, kill: bool = False, count: bool = True) -> str:
        """Forget a dead (or to-be-killed) worker and schedule its restart with back-off."""
        if kill and proc.is_alive():
            proc.kill()
            proc.join(5.0)
        with self._cond:
            if self._proc is proc:
                if self._conn is not None:
                    self._conn.close()
                self._proc, self._conn, self._ready = None, None, False
            self._last_error = reason
            if count:
                self._deaths += 1
                self._failures += 1
            delay = backoff_delay(self._failures, self.config.restart_backoff_s, self.config.restart_backoff_max_s)
            self._next_start = time.monotonic() + delay
            self._cond.notify_all()
        if count:
            log.warning("vlm worker: %s; restarting in %.1f s", reason, delay)
        return reason

    def _monitor_loop(self) -> None:
        while not self._stopping.is_set():
            with self._cond:
                idle_dead = self._proc is not None and not self._busy and not self._proc.is_alive()
                due = self._proc is None and time.monotonic() >= self._next_start
                proc = self._proc
            if idle_dead:
                self._lost(proc, f"worker died while idle ({_exit_description(proc)})")
            elif due:
                self._spawn()
            self._stopping.wait(POLL_S * 2)

    def _spawn(self) -> None:
        parent_conn, child_conn = self._mp.Pipe(duplex=True)
        proc = self._mp.Process(
            target=_child_main,
            args=(child_conn, self.config.model_dump_json()),
            name=self.name,
            daemon=True,
        )
        with self._cond:
            self._loading = True
            self._starts += 1
        started = time.monotonic()
        proc.start()
        child_conn.close()  # so a dead child reads as EOF here
        message: dict[str, Any] | None = None
        error = ""
        end = started + self.config.load_timeout_s
        while message is None and not self._stopping.is_set():
            try:
                if parent_conn.poll(POLL_S):
                    message = parent_conn.recv()
                    break
            except (EOFError, OSError):
                proc.join(1.0)
                error = f"worker exited while loading ({_exit_description(proc)})"
                break
            if not proc.is_alive():
                proc.join(1.0)
                error = f"worker exited while loading ({_exit_description(proc)})"
                break
            if time.monotonic() > end:
                error = f"loading took longer than vlm.load_timeout_s={self.config.load_timeout_s:g} s"
                break
        if message is not None and message.get("op") == "ready":
            with self._cond:
                self._proc, self._conn, self._ready, self._loading = proc, parent_conn, True, False
                self._model = str(message.get("model", ""))
                self._chat_format = str(message.get("chat_format", ""))
                self._load_ms = float(message.get("load_ms", 0.0))
                self._load_error = ""
                self._cond.notify_all()
            log.info(
                "vlm worker pid %s ready: %s (%s) loaded in %.0f ms",
                proc.pid, self._model, self._chat_format, self._load_ms,
            )
            return
        if message is not None:
            error = str(message.get("error", "unknown load error"))
        if proc.is_alive():
            proc.kill()
        proc.join(5.0)
        parent_conn.close()
        with self._cond:
            self._loading = False
            if self._stopping.is_set():
                self._cond.notify_all()
                return
            self._load_error = error
            self._last_error = f"model load failed: {error}"
            self._failures += 1
            delay = backoff_delay(self._failures, self.config.restart_backoff_s, self.config.restart_backoff_max_s)
            self._next_start = time.monotonic() + delay
            self._cond.notify_all()
        log.error("vlm worker: model load failed: %s; retrying in %.1f s", error, delay)


def _exit_description(proc: Any) -> str:
    code = proc.exitcode
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
