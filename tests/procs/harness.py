"""Helpers for the multi-process tests: start workers, read their output and the ledger."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onceonly_core.codec import default_codec
from onceonly_core.stores import open_store
from onceonly_core.stores.base import Record, Store

WORKER = Path(__file__).resolve().parent / "worker.py"


@dataclass
class Worker:
    """One worker process: its Popen, the file it writes its results to, its console log."""

    proc: subprocess.Popen[bytes]
    out: Path
    log: Path

    def console(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def results(self) -> list[dict[str, Any]]:
        return read_jsonl(self.out)

    def wait(self, timeout: float = 120.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"worker hung: {self.proc.args}\n{self.console()}") from None

    def expect_exit(self, code: int, timeout: float = 120.0) -> None:
        got = self.wait(timeout)
        assert got == code, f"worker exited {got}, expected {code}; console:\n{self.console()}"

    def expect_killed(self) -> None:
        """The worker SIGKILLed itself at its crash point (and not earlier or later)."""
        self.expect_exit(-signal.SIGKILL)


class Workers:
    """The worker processes of one test; whatever happens, all are gone at the end."""

    def __init__(self, tmp: Path, url: str, namespace: str) -> None:
        self.tmp = tmp
        self.url = url
        self.namespace = namespace
        self.effects = tmp / "effects.jsonl"
        self.started: list[Worker] = []

    def start(self, mode: str, *args: str) -> Worker:
        n = len(self.started) + 1
        out, log = self.tmp / f"out-{n}.jsonl", self.tmp / f"console-{n}.txt"
        cmd = [
            sys.executable,
            str(WORKER),
            mode,
            "--url",
            self.url,
            "--namespace",
            self.namespace,
            "--effects",
            str(self.effects),
            "--out",
            str(out),
            *args,
        ]
        with open(log, "wb") as console:
            proc = subprocess.Popen(cmd, cwd=self.tmp, stdout=console, stderr=subprocess.STDOUT)
        worker = Worker(proc, out, log)
        self.started.append(worker)
        return worker

    def effect_lines(self) -> list[dict[str, Any]]:
        return read_jsonl(self.effects)

    def stop_all(self) -> None:
        for w in self.started:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGCONT)  # a stopped process cannot die otherwise
                w.proc.kill()  # our own child, by its pid
                w.proc.wait()


@contextmanager
def workers(tmp: Path, url: str, namespace: str) -> Iterator[Workers]:
    group = Workers(tmp, url, namespace)
    try:
        yield group
    finally:
        group.stop_all()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete lines only: a line still being written by a live process is skipped."""
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def wait_for_file(path: Path, worker: Worker, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        code = worker.proc.poll()
        assert code is None, f"worker exited {code} before {path.name}:\n{worker.console()}"
        assert time.monotonic() < deadline, f"timed out waiting for {path.name}"
        time.sleep(0.01)


def open_ledger(url: str) -> Store:
    """The test's own view of the ledger. Creates the schema if the database is fresh, so
    that worker processes never race each other to create it (a separate concern)."""
    store = open_store(url, auto_migrate=True)
    store.get("probe", "probe")
    return store


def ledger(store: Store, namespace: str) -> dict[str, Record]:
    return {r.key: r for r in store.list(namespace=namespace, limit=10**6)}


def stored_value(rec: Record) -> Any:
    assert rec.result is not None, f"record {rec.key} has no stored result"
    return default_codec.decode(rec.result)
