"""``onceonly demo``: a scripted agent charges cards and emails a receipt, and everything
that can go wrong in production goes wrong once — on a real ledger, offline. Then the
same agent runs under governance (``guard.gov``, same ledger): a policy blocks a
destructive tool, the daily budget stops a runaway loop, the kill switch stops its next
call, and a refund waits for a human and then runs exactly once.

Run it with ``onceonly demo`` (the ``cli`` extra) or ``python -m onceonly_core.cli.demo``
(core install only; rich output when rich is installed, plain text otherwise).

The "outside world" is simulated: a payment provider and a mail provider that write
every effect they perform to a JSON-lines file. They do **not** de-duplicate on their
own, so a double execution would show up there; the demo counts the effects at the end
and proves each one happened once.

The story is a list of :class:`Scene` objects in :data:`SCENES`. Adding a scene means
writing one function ``(Demo) -> Row`` and appending it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..errors import ConfigError, OnceOnlyError, SchemaError
from ..guard import GLOBAL, Guard, current_call
from ..protocol import NOT_DONE, CallContext, Outcome
from ..stores import Record

__all__ = ["SCENES", "Demo", "DemoReport", "Row", "Scene", "World", "main", "run_demo"]

DEFAULT_URL = "sqlite:///onceonly.db"
CHARGE_TOOL = "shop.charge_card"
RECEIPT_TOOL = "shop.send_receipt"
# The governed part of the story (scenes 6-9): one agent, one policy, four tools.
AGENT = "shop-agent"
DELETE_TOOL = "shop.delete_customer"
LABEL_TOOL = "shop.buy_label"
SMS_TOOL = "shop.send_sms"
REFUND_TOOL = "shop.refund"
LABEL_PRICE = 9.00
DAILY_BUDGET = 20.00


# -- the outside world ------------------------------------------------------------------
class CardDeclined(Exception):
    """The payment provider refused the card."""


class World:
    """A simulated payment provider and mail provider.

    Every effect that really happens is appended to one JSON-lines file, so effects made
    by another process (the worker that crashes in scene 3) are counted too.
    """

    def __init__(
        self,
        path: Path,
        *,
        latency: float = 0.0,
        decline_once: Sequence[str] = (),
        hang_after_send: bool = False,
    ) -> None:
        self.path = path
        self.latency = latency
        self.decline_once = set(decline_once)
        self.hang_after_send = hang_after_send
        self._lock = threading.Lock()

    def _append(self, event: dict[str, Any]) -> None:
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [e for e in rows if kind is None or e["kind"] == kind]

    # The payment provider.
    def charge(
        self, order_id: str, customer: str, amount_cents: int, idempotency_key: str | None
    ) -> dict[str, Any]:
        time.sleep(self.latency)
        if order_id in self.decline_once and not any(
            e["order"] == order_id for e in self.events("decline")
        ):
            self._append({"kind": "decline", "order": order_id, "customer": customer})
            raise CardDeclined(f"card of {customer} declined (insufficient funds)")
        charge_id = "ch_" + uuid.uuid4().hex[:8]
        self._append(
            {
                "kind": "charge",
                "id": charge_id,
                "order": order_id,
                "customer": customer,
                "amount_cents": amount_cents,
                "idempotency_key": idempotency_key,
            }
        )
        return {"charge_id": charge_id, "order_id": order_id, "amount_cents": amount_cents}

    # The mail provider.
    def send_email(
        self, order_id: str, to: str, subject: str, idempotency_key: str | None
    ) -> dict[str, Any]:
        time.sleep(self.latency)
        message_id = "msg_" + uuid.uuid4().hex[:8]
        self._append(
            {
                "kind": "email",
                "id": message_id,
                "order": order_id,
                "to": to,
                "subject": subject,
                "idempotency_key": idempotency_key,
            }
        )
        if self.hang_after_send:
            # The crash point of scene 3: the provider has accepted the message, the
            # worker has not told the ledger yet. Report it, then wait to be killed.
            print(json.dumps({"sent": message_id, "pid": os.getpid()}), flush=True)
            time.sleep(120)
        return {"message_id": message_id, "to": to}

    # The governed tools' providers (scenes 6-9): each effect is one line of the file.
    def effect(self, kind: str, prefix: str, **fields: Any) -> dict[str, Any]:
        time.sleep(self.latency)
        event = {"kind": kind, "id": f"{prefix}_{uuid.uuid4().hex[:8]}", **fields}
        self._append(event)
        return event

    def find_email(self, idempotency_key: str) -> dict[str, Any] | None:
        """The provider's "look up a message by idempotency key" endpoint."""
        for e in self.events("email"):
            if e["idempotency_key"] == idempotency_key:
                return e
        return None


class Shop:
    """The agent's tools. Each passes its call's idempotency key downstream."""

    def __init__(self, world: World) -> None:
        self.world = world

    def charge_card(self, order_id: str, customer: str, amount_cents: int) -> dict[str, Any]:
        call = current_call()
        return self.world.charge(
            order_id, customer, amount_cents, call.idempotency_key if call else None
        )

    def send_receipt(self, order_id: str, to: str) -> dict[str, Any]:
        call = current_call()
        return self.world.send_email(
            order_id,
            to,
            f"Your receipt for order {order_id}",
            call.idempotency_key if call else None,
        )

    def delete_customer(self, customer: str) -> dict[str, Any]:
        return self.world.effect("delete", "del", customer=customer)

    def buy_label(self, parcel: str) -> dict[str, Any]:
        return self.world.effect("label", "lbl", parcel=parcel)

    def send_sms(self, order_id: str, to: str) -> dict[str, Any]:
        return self.world.effect("sms", "sms", order=order_id, to=to)

    def refund(self, order_id: str, amount_cents: int) -> dict[str, Any]:
        return self.world.effect("refund", "re", order=order_id, amount_cents=amount_cents)

    def reconcile_receipt(self, ctx: CallContext) -> Any:
        """``on_unknown`` for send_receipt: ask the mail provider whether the message with
        this call's idempotency key went out. Found: that is the result. Not found:
        ``NOT_DONE``, and the guard sends it."""
        sent = self.world.find_email(ctx.idempotency_key)
        if sent is None:
            return NOT_DONE
        return {"message_id": sent["id"], "to": sent["to"]}


def guarded_tools(
    g: Guard, shop: Shop, lease: float
) -> tuple[Callable[..., dict[str, Any]], Callable[..., dict[str, Any]]]:
    """The two guarded tools. Explicit names keep their keys identical in the demo and in
    the worker process it starts (``python -m`` would otherwise name them ``__main__.…``)."""
    charge = g.once(name=CHARGE_TOOL)(shop.charge_card)
    send = g.once(name=RECEIPT_TOOL, lease=lease, on_unknown=shop.reconcile_receipt)(
        shop.send_receipt
    )
    return charge, send


# -- output -----------------------------------------------------------------------------
class Printer:
    """Rich output when rich is installed, plain text otherwise."""

    def __init__(self, out: TextIO | None = None, *, plain: bool = False) -> None:
        self.out = out if out is not None else sys.stdout
        encoding = getattr(self.out, "encoding", None) or "utf-8"
        try:
            "✓↺✗→—…⊘⧗".encode(encoding)
            self.marks = {"ok": "✓", "replay": "↺", "fail": "✗", "event": "!", "arrow": "→"}
            self.marks.update(stop="⊘", wait="⧗")
        except (UnicodeEncodeError, LookupError):
            self.marks = {"ok": "+", "replay": "~", "fail": "x", "event": "!", "arrow": "->"}
            self.marks.update(stop="#", wait="?")
        self._console: Any = None
        if not plain:
            try:
                from rich.console import Console
            except ImportError:
                pass
            else:
                self._console = Console(file=self.out, highlight=False, soft_wrap=True)
                if not self._console.is_terminal:  # a pipe or a file: do not cut table cells
                    self._console = Console(
                        file=self.out, highlight=False, soft_wrap=True, width=120
                    )

    def _line(self, text: str, style: str = "", mark: str = "", mark_style: str = "") -> None:
        if self._console is None:
            print(f"{mark} {text}" if mark else text, file=self.out, flush=True)
            return
        from rich.text import Text

        line = Text()
        if mark:
            line.append(mark, style=mark_style or style)
            line.append(" ")
        line.append(text, style=style)
        self._console.print(line)

    def title(self, text: str) -> None:
        self._line(text, "bold")

    def blank(self) -> None:
        self._line("")

    def scene(self, number: int, title: str) -> None:
        self.blank()
        self._line(f"{number}. {title}", "bold underline")

    def say(self, text: str) -> None:
        self._line(f"   {text}", "dim")

    def info(self, text: str) -> None:
        self._line(f"   {text}")

    def ok(self, text: str) -> None:
        self._line(text, "", f"   {self.marks['ok']}", "bold green")

    def replay(self, text: str) -> None:
        self._line(text, "", f"   {self.marks['replay']}", "bold cyan")

    def fail(self, text: str) -> None:
        self._line(text, "", f"   {self.marks['fail']}", "bold red")

    def event(self, text: str) -> None:
        self._line(text, "yellow", f"   {self.marks['event']}", "bold yellow")

    def stop(self, text: str) -> None:
        """A call governance stopped before it ran."""
        self._line(text, "", f"   {self.marks['stop']}", "bold red")

    def wait(self, text: str) -> None:
        self._line(text, "", f"   {self.marks['wait']}", "bold yellow")

    def proof(self, ok: bool, text: str) -> None:
        mark = self.marks["ok"] if ok else self.marks["fail"]
        self._line(text, "" if ok else "red", mark, "bold green" if ok else "bold red")

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        if self._console is not None:
            from rich import box
            from rich.table import Table

            t = Table(
                title=title,
                title_justify="left",
                title_style="bold",
                box=box.SIMPLE_HEAD,
                pad_edge=False,
                show_edge=False,
            )
            for h in headers:
                t.add_column(h, no_wrap=True)
            for r in rows:
                t.add_row(*r)
            self._console.print(t)
            return
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        print(title, file=self.out)
        for r in (headers, ["-" * w for w in widths], *rows):
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)), file=self.out)
        self.out.flush()


# -- the story --------------------------------------------------------------------------
@dataclass(frozen=True)
class Order:
    id: str
    customer: str
    email: str
    amount_cents: int

    @property
    def amount(self) -> str:
        return f"${self.amount_cents / 100:.2f}"


ALICE = Order("A-1001", "cus_alice", "alice@example.com", 4999)
BOB = Order("B-2002", "cus_bob", "bob@example.com", 2500)
CAROL = Order("C-3003", "cus_carol", "carol@example.com", 1250)


@dataclass(frozen=True)
class Pace:
    lease: float  # the crashing worker's lease (scene 3)
    latency: float  # every provider call
    race_latency: float  # the charge the workers race for (scene 4)
    pause: float  # between scenes, for people reading along


NORMAL = Pace(lease=1.5, latency=0.05, race_latency=0.4, pause=0.4)
FAST = Pace(lease=0.5, latency=0.0, race_latency=0.2, pause=0.0)


@dataclass
class Row:
    """One line of the summary table."""

    scene: str
    tool: str
    calls: int
    ran: str
    replayed: str
    stopped: str = ""  # calls governance stopped before they ran, and why
    world: str = ""  # filled in by run_demo: the effects the world saw during the scene


@dataclass
class Demo:
    """What every scene gets: the guard, the tools, the world and the printer."""

    guard: Guard
    world: World
    shop: Shop
    out: Printer
    url: str
    namespace: str
    pace: Pace
    charge_card: Callable[..., dict[str, Any]]
    send_receipt: Callable[..., dict[str, Any]]
    calls: Counter[str] = field(default_factory=Counter)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # by order id
    run_id: str = ""  # the agent run of the current scene
    decisions: list[tuple[str, str]] = field(default_factory=list)  # (thread, decision)
    governed: list[Any] = field(default_factory=list)  # the ToolResults of scenes 6-9
    facts: dict[str, Any] = field(default_factory=dict)  # what scenes 6-9 saw, for proofs
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, outcome: Outcome) -> None:
        """Guard hook: remember each decision and the thread that got it."""
        with self._lock:
            self.decisions.append((threading.current_thread().name, outcome.decision))

    @contextlib.contextmanager
    def tally(self) -> Iterator[Counter[str]]:
        """Count the decisions made inside the block (filled in when it ends)."""
        counts: Counter[str] = Counter()
        start = len(self.decisions)
        try:
            yield counts
        finally:
            counts.update(d for _, d in self.decisions[start:])

    def count(self, what: str) -> None:
        with self._lock:
            self.calls[what] += 1

    def charge(self, order: Order) -> dict[str, Any]:
        self.count("charge")
        return self.charge_card(order.id, order.customer, order.amount_cents)

    def receipt(self, order: Order) -> dict[str, Any]:
        self.count("send")
        return self.send_receipt(order.id, order.email)

    def govern(self, fn: Callable[..., Any], tool: str, args: dict[str, Any], **kw: Any) -> Any:
        """One governed call of the agent (``guard.call_tool``): never raises, decides.

        ``scope=GLOBAL``: the demo's namespace is already this run's own, so a call is
        deduplicated across the whole run on purpose (no unscoped-call warning)."""
        res = self.guard.call_tool(fn, args, tool=tool, agent_id=AGENT, scope=GLOBAL, **kw)
        self.governed.append(res)
        return res

    def ledger_record(self, tool: str, result_field: str, value: str) -> Record | None:
        """This run's record of ``tool`` whose stored result has ``result_field == value``."""
        for rec in self.guard.store.list(namespace=self.namespace, tool=tool, limit=1000):
            try:
                if rec.result is not None and json.loads(rec.result)[result_field] == value:
                    return rec
            except (ValueError, KeyError, TypeError):
                continue
        return None


@dataclass(frozen=True)
class Scene:
    title: str
    play: Callable[[Demo], Row]


def scene_normal_run(demo: Demo) -> Row:
    o = ALICE
    demo.out.say(f"the agent charges order {o.id}: {o.amount} to {o.customer}")
    with demo.tally() as t:
        r = demo.charge(o)
    demo.results[o.id] = r
    demo.out.ok(f"charge_card executed {demo.out.marks['arrow']} {r['charge_id']}")
    return Row("normal run", "charge_card", 1, str(t["executed"]), "0")


def scene_retry_after_timeout(demo: Demo) -> Row:
    o = ALICE
    first = demo.results[o.id]
    demo.out.event(
        f"the charge went through, but the agent's HTTP client timed out before "
        f"{first['charge_id']} arrived"
    )
    demo.out.say("so it retries the same tool call — the card must not be charged again")
    with demo.tally() as t:
        r1 = demo.charge(o)
        _replayed(demo, r1["charge_id"], first["charge_id"], " (the stored result)")
        demo.out.say("the planner re-plans from its checkpoint and issues the call once more")
        r2 = demo.charge(o)
        _replayed(demo, r2["charge_id"], first["charge_id"])
    ran, replayed = str(t["executed"]), str(t["replayed"])
    return Row("retry on timeout", "charge_card", 2, ran, replayed)


def _replayed(demo: Demo, got: str, first: str, note: str = "") -> None:
    arrow = demo.out.marks["arrow"]
    if got == first:
        demo.out.replay(f"charge_card replayed {arrow} {got}{note}")
    else:
        demo.out.fail(f"charge_card ran again {arrow} {got} (expected the replay of {first})")


def scene_crash_mid_send(demo: Demo) -> Row:
    o = ALICE
    out, arrow = demo.out, demo.out.marks["arrow"]
    out.say(
        f"a worker process claims send_receipt for {o.id} with a {demo.pace.lease:g} s lease "
        "and sends the email"
    )
    sent = _run_crashing_worker(demo, o)
    demo.count("send")
    out.event(
        f"the mail provider accepted {sent['sent']}, then the worker (pid {sent['pid']}) was "
        "killed with SIGKILL before the ledger heard back"
    )
    rec = next(iter(demo.guard.store.list(namespace=demo.namespace, tool=RECEIPT_TOOL)), None)
    if rec is not None:
        left = max(0.0, (rec.lease_until or rec.now) - rec.now)
        out.info(
            f"ledger: send_receipt is '{rec.state}' (token {rec.token}, claimed by {rec.caller}), "
            f"lease ends in {left:.1f} s — did the email go out? unknown"
        )
    out.say(
        "the agent resumes the order; the guard waits for the lease to expire, then asks "
        "on_unknown=reconcile_receipt"
    )
    with demo.tally() as t:
        r = demo.receipt(o)
    if r["message_id"] == sent["sent"]:
        out.replay(
            f"reconciled: the provider already has the message with this call's idempotency "
            f"key {arrow} {r['message_id']}; not sent again"
        )
    else:
        out.fail(f"sent again {arrow} {r['message_id']}")
    ran = "1 (killed)" + (f" + {t['executed']}" if t["executed"] else "")
    return Row("crash mid-send", "send_receipt", 2, ran, f"{t['reconciled']} reconciled")


def _run_crashing_worker(demo: Demo, order: Order) -> dict[str, Any]:
    """Start a worker process that claims and sends, then SIGKILL it before it records."""
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        "-m",
        "onceonly_core.cli.demo",
        "--child",
        "send-receipt",
        "--url",
        demo.url,
        "--namespace",
        demo.namespace,
        "--world",
        str(demo.world.path),
        "--lease",
        str(demo.pace.lease),
        "--order",
        order.id,
        "--run-id",
        demo.run_id,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60.0)
        line = proc.stdout.readline() if ready else ""
        if not line:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise DemoError(f"the worker process did not reach the crash point:\n{err}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        info: dict[str, Any] = json.loads(line)
        return info
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def scene_race(demo: Demo) -> Row:
    o = BOB
    out, arrow = demo.out, demo.out.marks["arrow"]
    n = 4
    out.say(f"{n} workers pick up order {o.id} at the same instant and all charge {o.amount}")
    barrier = threading.Barrier(n)
    results: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            barrier.wait(timeout=30)
            # Context variables do not follow a new thread: set caller and run here.
            with demo.guard.as_caller(name), demo.guard.run(demo.run_id):
                results[name] = demo.charge(o)
        except BaseException as err:  # reported below
            errors.append(err)

    demo.world.latency = demo.pace.race_latency
    try:
        with demo.tally() as t:
            threads = [
                threading.Thread(target=worker, args=(f"worker-{i}",), name=f"worker-{i}")
                for i in range(1, n + 1)
            ]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
    finally:
        demo.world.latency = demo.pace.latency
    if errors:
        raise errors[0]
    got = {name: d for name, d in demo.decisions if name in results}
    for name in sorted(results):
        r = results[name]
        if got.get(name) == "executed":
            out.ok(f"{name}: charge_card executed {arrow} {r['charge_id']}")
        else:
            out.replay(f"{name}: waited for the winner, replayed {arrow} {r['charge_id']}")
    same = len({json.dumps(r, sort_keys=True) for r in results.values()}) == 1
    out.info(f"{len(results)} results, {'all identical' if same else 'NOT identical'}")
    return Row(
        "4 workers race",
        "charge_card",
        n,
        str(t["executed"]),
        str(t["replayed"]),
    )


def scene_declined_then_retried(demo: Demo) -> Row:
    o = CAROL
    out, arrow = demo.out, demo.out.marks["arrow"]
    out.say(f"the agent charges order {o.id}: {o.amount} to {o.customer}")
    with demo.tally() as t:
        try:
            demo.charge(o)
        except CardDeclined as err:
            out.fail(f"charge_card failed: CardDeclined: {err} — a failure is not cached")
        out.say("the customer updates the card; the agent retries the same call")
        r = demo.charge(o)
    rec = demo.ledger_record(CHARGE_TOOL, "charge_id", r["charge_id"])
    attempt = f" (attempt {rec.attempt})" if rec is not None else ""
    out.ok(f"charge_card executed {arrow} {r['charge_id']}{attempt}")
    ran = f"{t['executed'] + t['failed']} ({t['failed']} declined)"
    return Row("declined, retried", "charge_card", 2, ran, "0")


# -- governance (scenes 6-9): the same agent, under a policy, on the same ledger --------
def _operator(demo: Demo, command: str) -> None:
    demo.out.info(f"operator: onceonly {command} --namespace {demo.namespace}")


def scene_blocked_tool(demo: Demo) -> Row:
    gov, out, arrow = demo.guard.gov, demo.out, demo.out.marks["arrow"]
    gov.policy_from_template(
        AGENT,
        "moderate",
        {"max_spend_usd_per_day": DAILY_BUDGET, "pricing_rules": {LABEL_TOOL: LABEL_PRICE}},
    )
    _operator(
        demo,
        f"policy set {AGENT} --template moderate --set max_spend_usd_per_day={DAILY_BUDGET:g} "
        f"--set pricing_rules.{LABEL_TOOL}={LABEL_PRICE:g}",
    )
    out.say(
        "the 'moderate' template: delete_* blocked, refunds need approval; "
        f"budget ${DAILY_BUDGET:.2f} a day, a shipping label costs ${LABEL_PRICE:.2f}"
    )
    out.say(f"a confused plan makes the agent call delete_customer({BOB.customer})")
    r = demo.govern(demo.shop.delete_customer, DELETE_TOOL, {"customer": BOB.customer})
    if r.decision == "blocked":
        out.stop(f"delete_customer blocked {arrow} {r.policy_reason}; nothing was deleted")
        out.say(f"the agent is told: {r.message}")
    else:
        out.fail(f"delete_customer was not blocked {arrow} {r.decision}")
    demo.facts["blocked"] = r
    stopped = "1 by policy" if r.decision == "blocked" else "0"
    return Row("blocked tool", "delete_customer", 1, "0", "0", stopped)


def scene_budget_stop(demo: Demo) -> Row:
    out, arrow = demo.out, demo.out.marks["arrow"]
    out.say("a bug makes the agent buy a shipping label for every retry of a parcel, in a loop")
    spent, results = 0.0, []
    for n in range(1, 6):
        r = demo.govern(demo.shop.buy_label, LABEL_TOOL, {"parcel": f"P-{n}"})
        results.append(r)
        if r.decision != "executed":
            out.stop(
                f"buy_label P-{n} blocked {arrow} {r.policy_reason}: ${spent:.2f} spent today, "
                f"another ${LABEL_PRICE:.2f} would pass the ${DAILY_BUDGET:.2f} cap"
            )
            out.say(
                "the cap is checked and counted in one database transaction, so "
                "concurrent workers cannot overspend it either"
            )
            break
        spent += r.spend_usd
        out.ok(
            f"buy_label P-{n} executed {arrow} {r.result['id']} "
            f"(${r.spend_usd:.2f}; ${spent:.2f} of ${DAILY_BUDGET:.2f} today)"
        )
    ran = sum(r.decision == "executed" for r in results)
    stopped = [r for r in results if r.decision == "blocked"]
    demo.facts["budget"] = results
    return Row("budget stop", "buy_label", len(results), str(ran), "0", f"{len(stopped)} budget")


def scene_kill_switch(demo: Demo) -> Row:
    gov, out, arrow = demo.guard.gov, demo.out, demo.out.marks["arrow"]
    o = BOB
    reason = "texting customers at 3 a.m."
    out.event("the agent starts texting customers at 3 a.m.; the operator hits the kill switch")
    gov.disable_agent(AGENT, reason)
    _operator(demo, f"agent disable {AGENT} --reason '{reason}'")
    out.say("the switch is a row in the ledger: every process sharing it sees it on the next call")
    args = {"order_id": o.id, "to": o.email}
    first = demo.govern(demo.shop.send_sms, SMS_TOOL, args)
    if first.decision == "blocked":
        out.stop(f"send_sms {o.id} blocked {arrow} {first.policy_reason} ({first.error})")
    else:
        out.fail(f"send_sms ran while the agent was disabled {arrow} {first.decision}")
    gov.enable_agent(AGENT)
    _operator(demo, f"agent enable {AGENT}")
    out.say("the agent retries the same call")
    second = demo.govern(demo.shop.send_sms, SMS_TOOL, args)
    if second.decision == "executed":
        out.ok(f"send_sms {o.id} executed {arrow} {second.result['id']}")
    else:
        out.fail(f"send_sms did not run after enable {arrow} {second.decision}")
    demo.facts["kill"] = (first, second)
    ran = str(int(second.decision == "executed"))
    stopped = "1 disabled" if first.policy_reason == "agent_disabled" else "0"
    return Row("kill switch", "send_sms", 2, ran, "0", stopped)


def scene_approval(demo: Demo) -> Row:
    gov, out, arrow = demo.guard.gov, demo.out, demo.out.marks["arrow"]
    o = CAROL
    gov.create_tool(REFUND_TOOL, demo.shop.refund, description="refund an order")
    args = {"order_id": o.id, "amount_cents": o.amount_cents}

    def ask() -> Any:
        r = gov.run_tool(AGENT, REFUND_TOOL, args)
        demo.governed.append(r)
        return r

    out.say(f"the agent refunds order {o.id} ({o.amount}); the policy says refunds need a human")
    first = ask()
    if first.decision == "pending_approval":
        out.wait(f"refund {o.id} pending_approval {arrow} request {first.approval_id}")
    else:
        out.fail(f"refund did not wait for approval {arrow} {first.decision}")
    again = ask()
    out.wait(f"asked again before anyone decided: still {again.decision}, the same request")
    if first.approval_id:
        gov.approve(first.approval_id, by="operator")
        _operator(demo, f"approvals approve {first.approval_id}")
    out.say("the agent re-asks three times: a retry, a resume from its checkpoint, a duplicate")
    later = [ask() for _ in range(3)]
    for r in later:
        if r.decision == "executed":
            out.ok(f"refund {o.id} executed {arrow} {r.result['id']}")
        elif r.decision == "dedup":
            out.replay(f"refund {o.id} replayed {arrow} {r.result['id']} (already refunded)")
        else:
            out.fail(f"refund {o.id} {r.decision} {arrow} {r.policy_reason}")
    approval = gov.get_approval(first.approval_id) if first.approval_id else None
    demo.facts["approval"] = (first, again, later, approval)
    if approval is not None:
        out.info(f"the request is now '{approval.state}': approved once, used once")
    ran = sum(r.decision == "executed" for r in later)
    replayed = sum(r.decision == "dedup" for r in later)
    waited = sum(r.decision == "pending_approval" for r in (first, again))
    return Row("approval", "refund", 5, str(ran), str(replayed), f"{waited} waiting")


SCENES: list[Scene] = [
    Scene("A normal run", scene_normal_run),
    Scene("The agent retries after a timeout", scene_retry_after_timeout),
    Scene("A worker crashes in the middle of sending an email", scene_crash_mid_send),
    Scene("Four workers race for the same charge", scene_race),
    Scene("A declined card, retried", scene_declined_then_retried),
    Scene("A policy blocks a destructive tool", scene_blocked_tool),
    Scene("The daily budget stops a runaway loop", scene_budget_stop),
    Scene("The kill switch stops the agent's next call", scene_kill_switch),
    Scene("A refund waits for a human, then runs once", scene_approval),
]
"""The story, in order. Append a :class:`Scene` to extend the demo."""


# -- running it -------------------------------------------------------------------------
class DemoError(OnceOnlyError):
    """The demo could not run (not a failed proof: that is ``DemoReport.ok``)."""


@dataclass
class DemoReport:
    url: str
    namespace: str
    ok: bool
    rows: list[Row]
    charges: int
    charge_calls: int
    emails: int
    send_calls: int
    proofs: list[tuple[bool, str]]


def store_options(url: str) -> dict[str, Any]:
    if url.startswith("memory:"):
        raise ConfigError(
            "the demo needs a ledger shared between processes (scene 3 crashes a second "
            "process): use sqlite:///file.db or a server URL, not memory://"
        )
    # A server database is never migrated here: its schema belongs to `onceonly migrate`
    # (docs/operations.md), run by whoever owns that database. SQLite files create
    # themselves, as they do for every Guard.
    return {}


def new_namespace() -> str:
    return f"demo/{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def run_demo(
    url: str | None = None,
    *,
    fast: bool = False,
    out: TextIO | None = None,
    plain: bool = False,
    scenes: Sequence[Scene] | None = None,
) -> DemoReport:
    """Play the story on the ledger at ``url`` (default: ``ONCEONLY_DB_URL`` or
    ``sqlite:///onceonly.db``) in a fresh namespace ``demo/<timestamp>``."""
    url = url or os.environ.get("ONCEONLY_DB_URL") or DEFAULT_URL
    pace = FAST if fast else NORMAL
    printer = Printer(out, plain=plain)
    namespace = new_namespace()
    g = Guard(url, namespace=namespace, quiet=True, store_options=store_options(url))
    with tempfile.TemporaryDirectory(prefix="onceonly-demo-") as tmp:
        world = World(Path(tmp) / "world.jsonl", latency=pace.latency, decline_once=[CAROL.id])
        shop = Shop(world)
        charge, send = guarded_tools(g, shop, pace.lease)
        demo = Demo(g, world, shop, printer, url, namespace, pace, charge, send)
        for hook in (g.on_success, g.on_replay, g.on_block, g.on_failure):
            hook(demo.record)
        try:
            try:
                g.store.list(namespace=namespace, limit=1)  # a bad URL fails before the story
            except SchemaError as err:
                raise SchemaError(
                    f"{err}\nThe demo does not create or upgrade the schema of a server "
                    "database: migrations are explicit (docs/operations.md)."
                ) from None
            printer.title("OnceOnly demo: an agent that charges cards and emails receipts")
            printer.say(f"ledger:    {_display(url)}")
            printer.say(f"namespace: {namespace}")
            printer.say(
                "the world: a simulated payment provider and mail provider that do NOT "
                "de-duplicate, so any double execution would show"
            )
            rows = []
            for number, scene in enumerate(scenes if scenes is not None else SCENES, 1):
                if number > 1 and pace.pause:
                    time.sleep(pace.pause)
                printer.scene(number, scene.title)
                demo.run_id = f"scene-{number}"
                before = Counter(e["kind"] for e in world.events())
                with g.as_caller("agent"), g.run(demo.run_id):
                    row = scene.play(demo)
                row.world = _effects(Counter(e["kind"] for e in world.events()) - before)
                rows.append(row)
            report = _prove(demo, rows)
        finally:
            g.close()
    _summarize(printer, report, url)
    return report


def _effects(new: Counter[str]) -> str:
    names = {
        "charge": "charge",
        "email": "email",
        "decline": "decline",
        "delete": "deletion",
        "label": "label",
        "sms": "text",
        "refund": "refund",
    }
    parts = [f"{new[k]} {v}{'s' if new[k] > 1 else ''}" for k, v in names.items() if new[k]]
    return ", ".join(parts) or "none"


def _prove(demo: Demo, rows: list[Row]) -> DemoReport:
    world = demo.world
    charges = world.events("charge")
    emails = world.events("email")
    declines = world.events("decline")
    per_order = Counter(e["order"] for e in charges)
    per_receipt = Counter(e["order"] for e in emails)
    ledger = demo.guard.store.list(namespace=demo.namespace, limit=10_000)
    executions = sum(r.executions for r in ledger if r.tool == CHARGE_TOOL)
    proofs = [
        (
            bool(charges) and all(n == 1 for n in per_order.values()),
            f"charges made: {len(charges)} (one per order: {', '.join(sorted(per_order))}) "
            f"— charge calls by the agent: {demo.calls['charge']}",
        ),
        (
            bool(emails) and all(n == 1 for n in per_receipt.values()),
            f"emails sent: {len(emails)} (one receipt) — send calls: {demo.calls['send']}, "
            "one of them killed mid-send",
        ),
        (
            len(declines) <= len(per_order),
            f"declined attempts: {len(declines)} — a failure is not cached, the retry ran",
        ),
        (
            executions == len(charges),
            f"the ledger agrees: {executions} charge executions recorded",
        ),
    ]
    if not (demo.calls["charge"] or demo.calls["send"]):
        proofs = []  # only governed scenes were played (run_demo(scenes=...))
    proofs += _governance_proofs(demo)
    return DemoReport(
        demo.url,
        demo.namespace,
        all(ok for ok, _ in proofs),
        rows,
        len(charges),
        demo.calls["charge"],
        len(emails),
        demo.calls["send"],
        proofs,
    )


def _governance_proofs(demo: Demo) -> list[tuple[bool, str]]:
    """What scenes 6-9 claim, checked against the world and the ledger."""
    world, facts = demo.world, demo.facts
    if not facts:
        return []
    gov = demo.guard.gov
    proofs: list[tuple[bool, str]] = []
    logs = gov.agent_logs(AGENT, limit=1000)
    if "blocked" in facts:
        audited = [a for a in logs if a.tool == DELETE_TOOL]
        ok = not world.events("delete") and [(a.decision, a.reason) for a in audited] == [
            ("blocked", "tool_blocked")
        ]
        proofs.append(
            (
                ok,
                f"blocked by policy: {len(world.events('delete'))} customers deleted — the "
                "audit log has the decision (blocked, tool_blocked)",
            )
        )
    if "budget" in facts:
        labels = world.events("label")
        spent = gov.agent_metrics(AGENT, "day").spend_usd
        stopped = [r for r in facts["budget"] if r.policy_reason == "daily_spend_exceeded"]
        ok = (
            len(labels) == 2
            and abs(spent - len(labels) * LABEL_PRICE) < 1e-9
            and spent <= DAILY_BUDGET
            and len(stopped) == 1
        )
        proofs.append(
            (
                ok,
                f"budget held: {len(labels)} labels bought, ${spent:.2f} spent of the "
                f"${DAILY_BUDGET:.2f} daily cap — the next one was stopped before it ran",
            )
        )
    if "kill" in facts:
        first, second = facts["kill"]
        texts = world.events("sms")
        ok = (
            first.policy_reason == "agent_disabled"
            and second.decision == "executed"
            and len(texts) == 1
        )
        proofs.append(
            (
                ok,
                f"kill switch: the call made while disabled did not run; after enable it "
                f"ran once ({len(texts)} text sent)",
            )
        )
    if "approval" in facts:
        first, again, later, approval = facts["approval"]
        refunds = world.events("refund")
        asks = 2 + len(later)
        ok = (
            first.decision == again.decision == "pending_approval"
            and first.approval_id == again.approval_id
            and [r.decision for r in later] == ["executed", "dedup", "dedup"]
            and approval is not None
            and approval.state == "consumed"
            and len(refunds) == 1
        )
        proofs.append(
            (
                ok,
                f"approval: {len(refunds)} refund for {asks} asks — pending until approved, "
                "then executed once and replayed",
            )
        )
    problems = gov.verify_audit()
    proofs.append(
        (
            not problems,
            f"audit log: {len(logs)} decisions of {AGENT}, hash chain "
            + ("verified" if not problems else f"BROKEN: {problems[0]['problem']}"),
        )
    )
    return proofs


def _summarize(out: Printer, report: DemoReport, url: str) -> None:
    out.blank()
    headers = ["scene", "tool", "calls", "ran", "replayed", "stopped", "world"]
    rows = [
        [r.scene, r.tool, str(r.calls), r.ran, r.replayed, r.stopped, r.world] for r in report.rows
    ]
    out.table("What ran once, what was replayed, what was stopped", headers, rows)
    out.blank()
    for ok, text in report.proofs:
        out.proof(ok, text)
    if report.ok:
        out.proof(True, "nothing ran twice: every effect happened exactly once")
    else:
        out.proof(False, "a side effect ran more than once: this is a bug, please report it")
    default = os.environ.get("ONCEONLY_DB_URL") or DEFAULT_URL
    flag = "" if url == default else f" --url '{url}'"
    out.blank()
    out.title("Where to look next")
    if flag and _display(url) != url:  # never print a password: point to the variable
        flag = ""
        out.say("(first: export ONCEONLY_DB_URL=<the ledger URL you passed to --url>)")
    out.info(f"onceonly show --namespace {report.namespace}{flag}")
    out.info(f"onceonly stats --namespace {report.namespace}{flag}")
    out.info(f"onceonly history {CHARGE_TOOL} --namespace {report.namespace}{flag}")
    out.info(f"onceonly tail{flag}    (then run the demo again in another terminal)")
    if any(r.stopped for r in report.rows):
        ns = f"--namespace {report.namespace}{flag}"
        out.info(f"onceonly agent logs {AGENT} {ns}")
        out.info(f"onceonly agent metrics {AGENT} {ns}")
        out.info(f"onceonly approvals list --state all {ns}")
        out.info(f"onceonly audit verify {ns}")
        out.info(f"onceonly timeline scene-7 {ns}")
        out.info(f"onceonly dashboard {ns}    (the same, live, in a browser; extra: server)")


def _display(url: str) -> str:
    try:
        import sqlalchemy as sa

        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


# -- the crashing worker (scene 3) -------------------------------------------------------
def _child(args: argparse.Namespace) -> int:
    order = {o.id: o for o in (ALICE, BOB, CAROL)}[args.order]
    world = World(Path(args.world), hang_after_send=True)
    g = Guard(args.url, namespace=args.namespace, quiet=True, store_options=store_options(args.url))
    _, send = guarded_tools(g, Shop(world), args.lease)
    with g.as_caller(f"worker-{os.getpid()}"), g.run(args.run_id):
        send(order.id, order.email)
    return 1  # unreachable: the parent kills this process first


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m onceonly_core.cli.demo [--url URL] [--fast] [--plain]``."""
    p = argparse.ArgumentParser(prog="python -m onceonly_core.cli.demo", description=__doc__)
    p.add_argument(
        "--url", default=None, help="ledger URL (default: ONCEONLY_DB_URL or ./onceonly.db)"
    )
    p.add_argument("--fast", action="store_true", help="no pauses, short leases")
    p.add_argument("--plain", action="store_true", help="plain text even if rich is installed")
    p.add_argument("--child", choices=["send-receipt"], help=argparse.SUPPRESS)
    p.add_argument("--namespace", help=argparse.SUPPRESS)
    p.add_argument("--world", help=argparse.SUPPRESS)
    p.add_argument("--lease", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--order", default=ALICE.id, help=argparse.SUPPRESS)
    p.add_argument("--run-id", default="scene-3", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)
    try:
        report = run_demo(args.url, fast=args.fast, plain=args.plain)
    except OnceOnlyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
