"""The dashboard's FastAPI application (imported only when FastAPI is installed).

Safety by construction:

* every value is escaped (:func:`render.esc`); the one inline script builds DOM with
  ``textContent`` and runs under a per-response CSP nonce (``default-src 'self'``);
* state changes only by ``POST /actions/<name>`` with a form field ``csrf`` equal to
  HMAC(per-process secret, session cookie); a cross-site ``Origin`` or
  ``Sec-Fetch-Site`` is refused with 403 before the body is read;
* the ``Host`` header must name the loopback interface (or a host the operator bound to):
  a DNS-rebinding page cannot reach the dashboard under its own name;
* an optional access token (``?token=`` once → an HttpOnly, SameSite=Strict cookie);
* ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer``, ``nosniff``, ``no-store``.

Live updates are server-sent events: ``GET /api/stream/<view>`` (the same checks as every
GET: host, access token, session) pushes the view's JSON whenever it changes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)

from ..errors import ConfigError, OnceOnlyError
from ..guard import Guard
from . import data
from .render import (
    clock,
    esc,
    href,
    live_html,
    page,
    pretty,
    when,
)

__all__ = ["build_app"]

log = logging.getLogger("onceonly.dashboard")

SID_COOKIE = "onceonly_sid"
AUTH_COOKIE = "onceonly_auth"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
DECISIONS = ("executed", "dedup", "blocked", "failed", "pending_approval", "running", "cleared")
NOTICES = {
    "agent_disabled": "Agent disabled: its next call is refused (agent_disabled).",
    "agent_enabled": "Agent enabled.",
    "all_disabled": "Global kill switch on: every agent of this tenant is stopped.",
    "all_enabled": "Global kill switch off.",
    "approved": "Approved: the call runs once when the agent asks again.",
    "denied": "Denied: the agent's next ask is refused (approval_denied).",
    "notification_retried": "Notification queued again: the deliverer sends it within seconds.",
}
FEED_COLUMNS = (
    "time",
    "decision",
    "reason",
    "agent",
    "tool",
    "workflow",
    "run",
    "spend",
    "record",
)


# Server-sent events: how often a stream looks for changes, how often it says it is alive
# when nothing changed, and how long one stream lives before the browser reconnects (a
# bound on what a forgotten tab holds, and on how long a server shutdown waits for it).
STREAM_TICK = 0.5
STREAM_PING = 5.0
STREAM_SECONDS = 30.0
STREAM_RETRY_MS = 500


def safe_json(content: Any) -> str:
    """JSON with ``<``, ``>`` and ``&`` as unicode escapes, on one line: a name with markup
    stays inert even in a client that ignores the content type, and an event-stream
    ``data:`` line can never be split by a value."""
    text = json.dumps(content, ensure_ascii=False, separators=(",", ":"), default=str)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text  # json.dumps escapes CR and LF inside strings: always one line


class SafeJSON(JSONResponse):
    """JSON rendered by :func:`safe_json`."""

    def render(self, content: Any) -> bytes:
        return safe_json(content).encode("utf-8")


def _host_of(header: str) -> str:
    """``Host`` header → host name without the port (IPv6 literals keep brackets)."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[: h.find("]") + 1] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def safe_next(value: str | None) -> str:
    v = (value or "").strip()
    if (
        not v.startswith("/")
        or v.startswith("//")
        or "\\" in v
        or any(ord(c) < 32 for c in v)
        or len(v) > 2000
    ):
        return "/"
    return v


def build_app(
    guard: Guard,
    *,
    token: str | None = None,
    allowed_hosts: Sequence[str] | None = None,
    owns_guard: bool = True,
) -> FastAPI:
    secret = secrets.token_bytes(32)
    hosts = {h.lower() for h in (allowed_hosts or ())} | LOOPBACK_HOSTS
    any_host = "*" in hosts
    auth_value = (
        hmac.new(secret, b"auth:" + token.encode(), hashlib.sha256).hexdigest() if token else None
    )

    def csrf_for(sid: str) -> str:
        return hmac.new(secret, b"csrf:" + sid.encode(), hashlib.sha256).hexdigest()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            closing.set()
            if owns_guard:
                guard.close()

    app = FastAPI(
        title="OnceOnly dashboard",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.guard = guard
    # Set when the server stops (serve_dashboard's uvicorn, on Ctrl+C): open event streams
    # end at their next tick, so a graceful shutdown does not wait for them.
    closing = threading.Event()
    app.state.closing = closing

    def refuse(status: int, text: str, nonce: str = "") -> Response:
        body = (
            "<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>{status}</title></head><body><h1>{status}</h1><p>{esc(text)}</p></body></html>"
        )
        return HTMLResponse(body, status_code=status)

    @app.middleware("http")
    async def guard_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        nonce = secrets.token_urlsafe(18)
        request.state.nonce = nonce
        response = await _checked(request, call_next)
        h = response.headers
        h["Content-Security-Policy"] = (
            f"default-src 'self'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'"
        )
        h["X-Frame-Options"] = "DENY"
        h["Referrer-Policy"] = "no-referrer"
        h["X-Content-Type-Options"] = "nosniff"
        h["Cache-Control"] = "no-store"
        h["Cross-Origin-Opener-Policy"] = "same-origin"
        h["Cross-Origin-Resource-Policy"] = "same-origin"
        h["Permissions-Policy"] = "camera=(), microphone=(), geolocation=()"
        return response

    async def _checked(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        host_header = request.headers.get("host", "")
        if not any_host and _host_of(host_header) not in hosts:
            return refuse(421, "This dashboard answers only on the host it was started for.")
        if request.method not in ("GET", "HEAD", "POST"):
            return refuse(405, "Method not allowed.")
        if request.method == "POST":
            site = request.headers.get("sec-fetch-site")
            if site is not None and site != "same-origin":
                return refuse(403, "Cross-site requests are refused.")
            origin = request.headers.get("origin")
            # With Referrer-Policy no-referrer, Chromium sends `Origin: null` on our own
            # form posts; it is accepted only with the browser's own same-origin mark.
            null_ok = origin == "null" and site == "same-origin"
            if (
                origin is not None
                and not null_ok
                and origin != f"{request.url.scheme}://{host_header}"
            ):
                return refuse(403, "Cross-origin requests are refused.")
        if auth_value is not None:
            given = request.query_params.get("token")
            if given is not None and request.method == "GET":
                if not hmac.compare_digest(given.encode(), (token or "").encode()):
                    return refuse(401, "Wrong access token.")
                rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
                target = safe_next(request.url.path + ("?" + urlencode(rest) if rest else ""))
                resp: Response = RedirectResponse(target, status_code=303)
                resp.set_cookie(AUTH_COOKIE, auth_value, httponly=True, samesite="strict", path="/")
                return resp
            cookie = request.cookies.get(AUTH_COOKIE, "")
            if not hmac.compare_digest(cookie.encode(), auth_value.encode()):
                return refuse(
                    401,
                    "This dashboard needs its access token: open the URL that "
                    "`onceonly dashboard` printed (it ends with ?token=…).",
                )
        sid = request.cookies.get(SID_COOKIE, "")
        fresh = not (
            16 <= len(sid) <= 128
            and sid.isascii()
            and sid.replace("-", "").replace("_", "").isalnum()
        )
        if fresh:
            if request.method == "POST":
                return refuse(403, "Missing session: reload the page and try again.")
            sid = secrets.token_urlsafe(24)
        request.state.sid = sid
        request.state.csrf = csrf_for(sid)
        response = await call_next(request)
        if fresh:
            response.set_cookie(SID_COOKIE, sid, httponly=True, samesite="strict", path="/")
        return response

    @app.exception_handler(OnceOnlyError)
    async def unavailable(request: Request, err: OnceOnlyError) -> Response:
        # The database is down, a schema is missing, ...: say so, never a stack trace.
        log.warning("dashboard request failed: %s", err)
        if request.url.path.startswith("/api/"):
            return SafeJSON({"error": str(err)}, status_code=503)
        return refuse(503, f"The ledger could not be read: {err}")

    # -- pieces ------------------------------------------------------------------------
    def header_cells(request: Request | None = None) -> list[dict[str, Any]]:
        g = data.global_status(guard)
        if g["disabled"]:
            return [
                {
                    "t": "GLOBAL KILL SWITCH ON: " + (g["reason"] or "all agents stopped"),
                    "cls": "killed",
                },
                {
                    "forms": [
                        {"action": "/actions/enable_all", "label": "Resume all agents", "cls": "go"}
                    ]
                },
            ]
        return [
            {
                "forms": [
                    {
                        "action": "/actions/disable_all",
                        "label": "Stop all agents",
                        "cls": "danger",
                        "fields": {"reason": "global kill switch (dashboard)"},
                    }
                ]
            }
        ]

    def next_of(request: Request) -> str:
        q = request.url.query
        return safe_next(request.url.path + ("?" + q if q else ""))

    def html_page(request: Request, title: str, active: str, body: str) -> HTMLResponse:
        done = request.query_params.get("done", "")
        return HTMLResponse(
            page(
                title,
                body,
                nonce=request.state.nonce,
                csrf=request.state.csrf,
                active=active,
                header=header_cells(request),
                next_url=next_of(request),
                notice=NOTICES.get(done, ""),
            )
        )

    def live(rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """A live view's JSON: the rows the page renders, the header, the data behind."""
        return {"rows": rows, "header": header_cells(), "now": data.stamp(), **extra}

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    # -- live feed ---------------------------------------------------------------------
    def feed_rows(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = []
        for i in items:
            rec = (
                {"t": i["key"][:12] + "…", "href": href("/record", key=i["key"], ns=i["namespace"])}
                if i["key"]
                else {"t": ""}
            )
            rows.append(
                {
                    "cls": "d-" + i["decision"],
                    "cells": [
                        {"t": clock(i["time"])},
                        {"t": i["decision"], "cls": "badge d-" + i["decision"]},
                        {"t": i["reason"]},
                        {
                            "t": i["agent"],
                            "href": href("/", agent=i["agent"]) if i["agent"] else None,
                        },
                        {"t": i["tool"], "href": href("/", tool=i["tool"])},
                        {
                            "t": i["workflow"],
                            "href": href("/", workflow=i["workflow"]) if i["workflow"] else None,
                        },
                        {"t": i["run"], "href": href("/run", id=i["run"]) if i["run"] else None},
                        {"t": f"${i['spend_usd']:.2f}" if i["spend_usd"] else ""},
                        rec,
                    ],
                }
            )
        return rows

    @app.get("/", response_class=HTMLResponse)
    def feed_page(request: Request) -> Response:
        f = data.Filters.from_query(request.query_params)
        fd = data.feed(guard, f)
        q = {k: v for k, v in f.as_dict().items() if v}
        src = href("/api/feed", **q)
        inputs = []
        for name in ("agent", "tool", "workflow", "run"):
            options = "".join(f'<option value="{esc(v)}">' for v in fd.choices.get(name, ()))
            inputs.append(
                f'<label>{esc(name)}<input name="{esc(name)}" id="f-{esc(name)}" '
                f'list="l-{esc(name)}" value="{esc(getattr(f, name))}" autocomplete="off">'
                f'<datalist id="l-{esc(name)}">{options}</datalist></label>'
            )
        sel = " selected"
        dec = "".join(
            f'<option value="{esc(d)}"{sel if d == f.decision else ""}>{esc(d or "any")}</option>'
            for d in ("", *DECISIONS)
        )
        inputs.append(
            f'<label>decision<select name="decision" id="f-decision">{dec}</select></label>'
        )
        body = (
            f'<form class="filters" method="get" action="/">{"".join(inputs)}'
            '<button type="submit" id="apply">Filter</button> <a href="/">clear</a></form>'
            + live_html(
                src,
                "table",
                feed_rows(fd.items),
                request.state.csrf,
                next_of(request),
                FEED_COLUMNS,
            )
        )
        return html_page(request, "Live feed", "/", body)

    def feed_view(q: Mapping[str, str]) -> dict[str, Any]:
        f = data.Filters.from_query(q)
        try:
            limit = int(q.get("limit", "100"))
        except ValueError:
            limit = 100
        fd = data.feed(guard, f, limit=limit)
        return live(feed_rows(fd.items), items=fd.items, filters=f.as_dict())

    @app.get("/api/feed")
    def feed_api(request: Request) -> Response:
        return SafeJSON(feed_view(request.query_params))

    # -- agents ------------------------------------------------------------------------
    def agent_rows(a: dict[str, Any]) -> list[dict[str, Any]]:
        rows = []
        for c in a["agents"]:
            m = c["metrics"]
            cells: list[dict[str, Any]] = []
            if c["disabled"]:
                cells.append(
                    {
                        "label": "status",
                        "t": "disabled" + (": " + c["reason"] if c["reason"] else ""),
                        "cls": "d-blocked",
                        "forms": [
                            {
                                "action": "/actions/enable",
                                "label": "Enable",
                                "cls": "go",
                                "fields": {"agent": c["agent"]},
                            }
                        ],
                    }
                )
            else:
                cells.append(
                    {
                        "label": "status",
                        "t": "stopped by the global switch" if a["global_disabled"] else "active",
                        "cls": "d-blocked" if a["global_disabled"] else "d-executed",
                        "forms": [
                            {
                                "action": "/actions/disable",
                                "label": "Kill switch",
                                "cls": "danger",
                                "fields": {"agent": c["agent"]},
                            }
                        ],
                    }
                )
            spend, budget = c["spend_today_usd"], c["budget_usd"]
            cells.append(
                {
                    "label": "spend today",
                    "t": f"${spend:.2f}"
                    + (f" of ${budget:.2f}" if budget is not None else " (no budget)"),
                    "meter": [spend, budget] if budget else None,
                }
            )
            used, cap = c["actions_this_hour"], c["actions_cap"]
            cells.append(
                {
                    "label": "actions/hour",
                    "t": f"{used}" + (f" of {cap}" if cap is not None else " (no cap)"),
                    "meter": [used, cap] if cap else None,
                }
            )
            for t in c["tool_caps"]:
                cells.append(
                    {
                        "label": "calls today",
                        "t": f"{t['tool']}: {t['used']} of {t['cap']}",
                        "meter": [t["used"], t["cap"]] if t["cap"] else None,
                    }
                )
            cells.append(
                {
                    "label": "last 24 h",
                    "t": f"{m['executed']} executed · {m['dedup']} dedup · {m['blocked']} blocked"
                    f" · {m['failed']} failed · {m['pending_approval']} pending",
                }
            )
            if m["top_tools"]:
                cells.append(
                    {
                        "label": "top tools",
                        "t": ", ".join(f"{n} x{k}" for n, k in m["top_tools"][:5]),
                    }
                )
            if not c["has_policy"]:
                cells.append({"label": "policy", "t": "none (no caps)"})
            for k, v in c["policy"]:
                cells.append({"label": k, "t": v})
            cells.append({"label": "calls", "t": "live feed", "href": href("/", agent=c["agent"])})
            rows.append(
                {"title": c["agent"], "cls": "disabled" if c["disabled"] else "", "cells": cells}
            )
        return rows

    @app.get("/agents", response_class=HTMLResponse)
    def agents_page(request: Request) -> Response:
        rows = agent_rows(data.agents(guard))
        body = live_html("/api/agents", "cards", rows, request.state.csrf, next_of(request))
        return html_page(request, "Agents", "/agents", body)

    def agents_view(q: Mapping[str, str]) -> dict[str, Any]:
        a = data.agents(guard)
        return live(agent_rows(a), agents=a["agents"], global_disabled=a["global_disabled"])

    @app.get("/api/agents")
    def agents_api(request: Request) -> Response:
        return SafeJSON(agents_view(request.query_params))

    # -- approvals ---------------------------------------------------------------------
    def approval_rows(items: list[dict[str, Any]], pending: bool) -> list[dict[str, Any]]:
        rows = []
        for a in items:
            forms = (
                [
                    {
                        "action": "/actions/approve",
                        "label": "Approve",
                        "cls": "go",
                        "fields": {"approval": a["id"]},
                    },
                    {
                        "action": "/actions/deny",
                        "label": "Deny",
                        "cls": "danger",
                        "fields": {"approval": a["id"]},
                    },
                ]
                if pending
                else []
            )
            rows.append(
                {
                    "cls": "d-" + ("pending_approval" if pending else a["state"]),
                    "cells": [
                        {"t": when(a["created_at"])},
                        {"t": a["agent"]},
                        {"t": a["tool"]},
                        {"t": a["workflow"]},
                        {
                            "t": json.dumps(
                                a["args"], sort_keys=True, ensure_ascii=False, default=str
                            )
                        },
                        {
                            "t": a["state"] + (f" by {a['decided_by']}" if a["decided_by"] else ""),
                            "forms": forms,
                        },
                        {
                            "t": a["id"][:8],
                            "href": href("/record", key=a["key"], ns=a["namespace"]),
                        },
                    ],
                }
            )
        return rows

    @app.get("/approvals", response_class=HTMLResponse)
    def approvals_page(request: Request) -> Response:
        ap = data.approvals(guard)
        cols = ("asked", "agent", "tool", "workflow", "arguments (redacted)", "state", "record")
        decided = "".join(
            "<tr>" + "".join(f"<td>{esc(c.get('t', ''))}</td>" for c in r["cells"]) + "</tr>"
            for r in approval_rows(ap["decided"], False)
        )
        body = (
            "<h2>Pending</h2>"
            + live_html(
                "/api/approvals",
                "table",
                approval_rows(ap["pending"], True),
                request.state.csrf,
                next_of(request),
                cols,
            )
            + "<h2>Decided</h2><table><thead><tr>"
            + "".join(f"<th>{esc(c)}</th>" for c in cols)
            + f"</tr></thead><tbody>{decided}</tbody></table>"
        )
        return html_page(request, "Approvals", "/approvals", body)

    def approvals_view(q: Mapping[str, str]) -> dict[str, Any]:
        ap = data.approvals(guard)
        return live(approval_rows(ap["pending"], True), pending=ap["pending"])

    @app.get("/api/approvals")
    def approvals_api(request: Request) -> Response:
        return SafeJSON(approvals_view(request.query_params))

    # -- runs --------------------------------------------------------------------------
    @app.get("/runs", response_class=HTMLResponse)
    def runs_page(request: Request) -> Response:
        runs = data.recent_runs(guard)
        rows = (
            "".join(
                f'<tr><td><a href="{esc(href("/run", id=r["run"]))}">{esc(r["run"])}</a></td>'
                f"<td>{esc(when(r['last']))}</td><td>{esc(r['calls'])}</td></tr>"
                for r in runs
            )
            or '<tr><td class="empty" colspan="3">nothing yet</td></tr>'
        )
        body = (
            '<form class="filters" method="get" action="/run"><label>run id'
            '<input name="id" id="run-id"></label><button type="submit">Open</button></form>'
            "<table><thead><tr><th>run</th><th>last call</th><th>calls</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
        return html_page(request, "Runs", "/runs", body)

    def timeline_rows(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {
                "cls": "d-" + (e["status"] or e["type"]),
                "cells": [
                    {"t": clock(e["time"])},
                    {"t": e["type"], "cls": "badge d-" + (e["status"] or e["type"])},
                    {"t": e["agent"]},
                    {"t": e["tool"]},
                    {"t": e["status"]},
                    {
                        "t": ""
                        if e["data"] is None
                        else json.dumps(e["data"], sort_keys=True, ensure_ascii=False, default=str)
                    },
                ],
            }
            for e in events
        ]

    @app.get("/run", response_class=HTMLResponse)
    def run_page(request: Request) -> Response:
        run_id = request.query_params.get("id", "").strip()
        if not run_id:
            return RedirectResponse("/runs", status_code=303)
        rows = timeline_rows(data.run_timeline(guard, run_id))
        body = (
            f'<p>Run <code>{esc(run_id)}</code> · <a href="{esc(href("/", run=run_id))}">'
            "its calls in the live feed</a></p>"
            + live_html(
                href("/api/run", id=run_id),
                "table",
                rows,
                request.state.csrf,
                next_of(request),
                ("time", "event", "agent", "tool", "status", "data (redacted)"),
            )
        )
        return html_page(request, "Run timeline", "/runs", body)

    def run_view(q: Mapping[str, str]) -> dict[str, Any]:
        run_id = str(q.get("id", "")).strip()
        events = data.run_timeline(guard, run_id) if run_id else []
        return live(timeline_rows(events), events=events)

    @app.get("/api/run")
    def run_api(request: Request) -> Response:
        return SafeJSON(run_view(request.query_params))

    # -- notifications: the outbox's dead letters ----------------------------------------
    def notification_rows(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {
                "cls": "d-" + ("failed" if n["state"] == "dead" else n["state"]),
                "cells": [
                    {"t": when(n["created_at"])},
                    {"t": n["event_type"]},
                    {"t": n["destination"]},
                    {"t": str(n["attempts"])},
                    {"t": n["last_error"] or ""},
                    {
                        "t": n["state"],
                        "forms": [
                            {
                                "action": "/actions/retry_notification",
                                "label": "Retry",
                                "cls": "go",
                                "fields": {"notification": n["id"]},
                            }
                        ]
                        if n["state"] == "dead"
                        else [],
                    },
                    {"t": n["event_id"]},
                ],
            }
            for n in items
        ]

    notification_columns = ("created", "event", "destination", "tries", "last error", "state", "id")

    @app.get("/notifications", response_class=HTMLResponse)
    def notifications_page(request: Request) -> Response:
        n = data.notifications(guard)
        recent = "".join(
            "<tr>" + "".join(f"<td>{esc(c.get('t', ''))}</td>" for c in r["cells"]) + "</tr>"
            for r in notification_rows(n["recent"])
        )
        body = (
            "<h2>Dead letters</h2>"
            + live_html(
                "/api/notifications",
                "table",
                notification_rows(n["dead"]),
                request.state.csrf,
                next_of(request),
                notification_columns,
            )
            + "<h2>Latest</h2><table><thead><tr>"
            + "".join(f"<th>{esc(c)}</th>" for c in notification_columns)
            + f"</tr></thead><tbody>{recent}</tbody></table>"
        )
        return html_page(request, "Notifications", "/notifications", body)

    def notifications_view(q: Mapping[str, str]) -> dict[str, Any]:
        return live(notification_rows(data.notifications(guard)["dead"]))

    @app.get("/api/notifications")
    def notifications_api(request: Request) -> Response:
        return SafeJSON(notifications_view(request.query_params))

    # -- live updates: server-sent events ----------------------------------------------
    views: dict[str, Callable[[Mapping[str, str]], dict[str, Any]]] = {
        "feed": feed_view,
        "agents": agents_view,
        "approvals": approvals_view,
        "run": run_view,
        "notifications": notifications_view,
    }

    @app.get("/api/stream/{view}")
    async def stream(request: Request, view: str) -> Response:
        """``text/event-stream`` of one live view: an ``update`` event (the view's JSON, as
        ``/api/<view>`` answers it) at once and whenever it changes, a ``ping`` when nothing
        did for a while, ``stale`` while the ledger cannot be read. The stream ends after
        STREAM_SECONDS; the browser's EventSource reconnects by itself."""
        build = views.get(view)
        if build is None:
            return SafeJSON({"error": f"no live view {view!r}"}, status_code=404)
        query = dict(request.query_params)
        return StreamingResponse(
            _events(build, query, closing),
            media_type="text/event-stream",
            headers={"X-Accel-Buffering": "no"},  # a proxy in front must not buffer it
        )

    # -- one record --------------------------------------------------------------------
    @app.get("/record", response_class=HTMLResponse)
    def record_page(request: Request) -> Response:
        key = request.query_params.get("key", "")
        ns = request.query_params.get("ns") or None
        try:
            d = data.record_detail(guard, key, ns)
        except ConfigError as err:
            return html_page(request, "Record", "/", f'<p class="error">{esc(err)}</p>')
        parts = [f"<p>Key <code>{esc(key)}</code></p>"]
        rec = d["record"]
        if rec is None:
            parts.append(
                '<p class="empty">No ledger record (the call was refused before its claim, '
                "or it was cleared).</p>"
            )
        else:
            fields = [
                ("tool", rec["tool"]),
                ("state", rec["state"]),
                ("namespace", rec["namespace"]),
                ("workflow", rec["workflow"]),
                ("fencing token", rec["token"]),
                ("executions", rec["executions"]),
                ("attempt", rec["attempt"]),
                ("run", rec["run"]),
                ("caller", rec["caller"]),
                ("owner", rec["owner"]),
                ("args digest", rec["args_digest"]),
                ("created", when(rec["created_at"])),
                ("updated", when(rec["updated_at"])),
                ("lease until", when(rec["lease_until"])),
                ("expires", when(rec["expires_at"])),
                ("error", rec["error"]),
            ]
            parts.append(
                '<dl id="record">'
                + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in fields)
                + "</dl>"
            )
            kind, value = d["result"]
            title = {
                "decoded": "Replay result (what every retry receives; redacted)",
                "stored": "Replay result, as stored (the dashboard never imports the classes "
                "a record names; redacted)",
                "invalid": "Replay result: not valid JSON",
                "none": "No result stored",
            }[kind]
            parts.append(f"<h2>{esc(title)}</h2>")
            if kind in ("decoded", "stored"):
                parts.append(f'<pre id="result">{esc(pretty(value))}</pre>')
        parts.append("<h2>Audit rows for this key (arguments redacted)</h2>")
        if not d["audit"]:
            parts.append('<p class="empty">none: an ungoverned call</p>')
        for a in d["audit"]:
            parts.append(
                f"<h3>{esc(when(a['time']))} · {esc(a['agent'])} · "
                f'<span class="badge d-{esc(a["decision"])}">{esc(a["decision"])}</span> '
                f"{esc(a['reason'])}</h3>"
                f'<pre class="args">{esc(pretty(a["args"]))}</pre>'
            )
        return html_page(request, "Record", "/", "".join(parts))

    # -- actions (the only state changes) ----------------------------------------------
    @app.post("/actions/{action}")
    async def action(request: Request, action: str) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            return refuse(403, "Actions are form posts from the dashboard's own pages.")
        raw = await request.body()
        if len(raw) > 16_384:
            return refuse(413, "Request too large.")
        form: Mapping[str, str] = dict(
            parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True)
        )
        given = form.get("csrf", "")
        if not hmac.compare_digest(given.encode(), request.state.csrf.encode()):
            return refuse(403, "Missing or wrong CSRF token: reload the page and try again.")
        if action not in data.ACTIONS:
            return refuse(404, "No such action.")
        from starlette.concurrency import run_in_threadpool

        try:
            done = await run_in_threadpool(data.act, guard, action, form)
        except ConfigError as err:
            return refuse(409, str(err))
        target = safe_next(form.get("next"))
        base, _, query = target.partition("?")
        q = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "done"]
        q.append(("done", done))
        return RedirectResponse(base + "?" + urlencode(q), status_code=303)

    return app


async def _events(
    build: Callable[[Mapping[str, str]], dict[str, Any]],
    query: Mapping[str, str],
    closing: threading.Event,
) -> AsyncIterator[str]:
    """The event stream of one view. The ledger is read in a worker thread (its calls
    block) and only changes are sent: the same rows as before cost no bytes."""
    yield f"retry: {STREAM_RETRY_MS}\n\n"
    last: str | None = None
    quiet_since = time.monotonic()
    deadline = quiet_since + STREAM_SECONDS
    while time.monotonic() < deadline and not closing.is_set():
        try:
            payload = await anyio.to_thread.run_sync(build, query)
        except OnceOnlyError as err:
            log.warning("dashboard stream: %s", err)
            yield f"event: stale\ndata: {safe_json({'error': str(err)})}\n\n"
            last = None  # send the whole view again once the ledger answers
        else:
            now = payload.pop("now", None)
            text = safe_json(payload)
            if text != last:
                last = text
                quiet_since = time.monotonic()
                payload["now"] = now
                yield f"event: update\ndata: {safe_json(payload)}\n\n"
            elif time.monotonic() - quiet_since >= STREAM_PING:
                quiet_since = time.monotonic()
                yield "event: ping\ndata: {}\n\n"
        await anyio.sleep(STREAM_TICK)
