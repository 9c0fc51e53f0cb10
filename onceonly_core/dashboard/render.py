"""HTML for the dashboard: one escape rule, one cell model, one small script.

A page is built from *cells* — ``{"t": text, "cls": css, "href": "/path", "meter":
[value, max], "forms": [{"action": "/actions/x", "label": "…", "fields": {...}}],
"label": "…"}`` — rendered here on the server for the first paint and, for live updates,
by the inline script from the same cells in JSON, with ``textContent`` and DOM properties
only. Every interpolated value goes through :func:`esc`; the script never parses HTML.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

__all__ = ["CSS", "SCRIPT", "cell_html", "esc", "href", "page", "rows_html"]

Cell = Mapping[str, Any]
Row = Mapping[str, Any]


def esc(value: object) -> str:
    """Text → HTML text or attribute value (``& < > " '`` escaped)."""
    return html.escape("" if value is None else str(value), quote=True)


def href(path: str, **query: str | None) -> str:
    q = {k: v for k, v in query.items() if v}
    return path + ("?" + urlencode(q) if q else "")


def safe_href(h: object) -> bool:
    return isinstance(h, str) and h.startswith("/") and not h.startswith("//") and "\\" not in h


def when(ts: float | None) -> str:
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"


def clock(ts: float | None) -> str:
    return "" if ts is None else time.strftime("%H:%M:%S", time.gmtime(ts))


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def form_html(f: Mapping[str, Any], csrf: str, next_url: str) -> str:
    if not safe_href(f.get("action")):
        return ""
    fields = {"csrf": csrf, "next": next_url, **dict(f.get("fields") or {})}
    hidden = "".join(
        f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">' for k, v in fields.items()
    )
    cls = f' class="{esc(f["cls"])}"' if f.get("cls") else ""
    return (
        f'<form class="inline" method="post" action="{esc(f["action"])}">{hidden}'
        f'<button type="submit"{cls}>{esc(f.get("label", "submit"))}</button></form>'
    )


def cell_html(c: Cell, csrf: str, next_url: str) -> str:
    parts = []
    text = esc(c.get("t", ""))
    if safe_href(c.get("href")):
        parts.append(f'<a href="{esc(c["href"])}">{text}</a>')
    else:
        parts.append(text)
    meter = c.get("meter")
    if meter:
        value, high = float(meter[0]), float(meter[1])
        parts.append(f' <meter min="0" max="{esc(high)}" value="{esc(value)}"></meter>')
    for f in c.get("forms") or ():
        parts.append(form_html(f, csrf, next_url))
    cls = f' class="{esc(c["cls"])}"' if c.get("cls") else ""
    return f"<span{cls}>{''.join(parts)}</span>"


def rows_html(layout: str, rows: Sequence[Row], csrf: str, next_url: str) -> str:
    """The inner HTML of a live container: ``<tr>`` rows or cards."""
    out = []
    for r in rows:
        cls = f' class="{esc(r["cls"])}"' if r.get("cls") else ""
        if layout == "cards":
            lines = "".join(
                f'<div class="line"><span class="label">{esc(c.get("label", ""))}</span>'
                f"{cell_html(c, csrf, next_url)}</div>"
                for c in r.get("cells", ())
            )
            card_cls = esc(("card " + str(r.get("cls") or "")).strip())
            out.append(f'<div class="{card_cls}"><h3>{esc(r.get("title", ""))}</h3>{lines}</div>')
        else:
            tds = "".join(f"<td>{cell_html(c, csrf, next_url)}</td>" for c in r.get("cells", ()))
            out.append(f"<tr{cls}>{tds}</tr>")
    if not rows:
        empty = '<p class="empty">nothing yet</p>'
        return empty if layout == "cards" else f'<tr><td class="empty">{empty}</td></tr>'
    return "".join(out)


def live_html(
    src: str,
    layout: str,
    rows: Sequence[Row],
    csrf: str,
    next_url: str,
    columns: Iterable[str] = (),
) -> str:
    """A container the script refreshes from ``src`` (a same-origin ``/api/<view>`` JSON
    endpoint): pushed by its event stream ``/api/stream/<view>``, polled without one."""
    inner = rows_html(layout, rows, csrf, next_url)
    stream = "/api/stream/" + src[len("/api/") :] if src.startswith("/api/") else ""
    attrs = f'data-live="{esc(src)}" data-stream="{esc(stream)}" data-layout="{esc(layout)}"'
    if layout == "cards":
        return f'<div id="live" class="cards" {attrs}>{inner}</div>'
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    return (
        f'<table id="live-table"><thead><tr>{head}</tr></thead>'
        f'<tbody id="live" {attrs}>{inner}</tbody></table>'
    )


NAV = (
    ("/", "Live feed"),
    ("/agents", "Agents"),
    ("/approvals", "Approvals"),
    ("/runs", "Runs"),
    ("/notifications", "Notifications"),
)


def page(
    title: str,
    body: str,
    *,
    nonce: str,
    csrf: str,
    active: str,
    header: Sequence[Cell],
    next_url: str,
    notice: str = "",
) -> str:
    on = ' class="active"'
    nav = "".join(
        f'<a href="{esc(p)}"{on if p == active else ""}>{esc(label)}</a>' for p, label in NAV
    )
    head_cells = "".join(cell_html(c, csrf, next_url) for c in header)
    note = f'<p class="notice" role="status">{esc(notice)}</p>' if notice else ""
    return (
        "<!doctype html>"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="csrf-token" content="{esc(csrf)}">'
        '<link rel="icon" href="data:,">'
        f"<title>{esc(title)} · OnceOnly</title>"
        f'<style nonce="{esc(nonce)}">{CSS}</style></head><body>'
        f'<header><strong class="brand">OnceOnly</strong><nav>{nav}</nav>'
        f'<div id="global">{head_cells}</div>'
        '<span id="live-status" class="status">server-rendered</span></header>'
        f"<main><h1>{esc(title)}</h1>{note}{body}</main>"
        f'<script nonce="{esc(nonce)}">{SCRIPT}</script>'
        "</body></html>"
    )


CSS = """
:root{--bg:#f7f7f8;--fg:#1d1d1f;--mut:#6b6b73;--ok:#1a7f37;--dd:#0969da;--bad:#cf222e;
--warn:#9a6700;--card:#fff;--line:#d8d8de}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",
Roboto,sans-serif;background:var(--bg);color:var(--fg)}
header{display:flex;gap:16px;align-items:center;flex-wrap:wrap;padding:10px 20px;
background:#24292f;color:#fff}header a{color:#d0d7de;text-decoration:none;margin-right:12px}
header a.active,header a:hover{color:#fff;text-decoration:underline}.brand{font-size:16px}
#global{margin-left:auto;display:flex;gap:8px;align-items:center}
.status{font-size:12px;color:#9da7b3}.status.stale{color:#ffb4b4}
main{padding:16px 20px}h1{font-size:20px;margin:4px 0 12px}h2{font-size:16px;margin:20px 0 8px}
table{border-collapse:collapse;width:100%;background:var(--card);border:1px solid var(--line)}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top;
word-break:break-word}th{background:#eef0f3;font-weight:600}
.badge{display:inline-block;padding:0 7px;border-radius:9px;font-size:12px;font-weight:600;
background:#eaeef2}.d-executed{color:var(--ok)}.d-dedup{color:var(--dd)}
.d-blocked,.d-failed{color:var(--bad)}.d-pending_approval,.d-running{color:var(--warn)}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{background:var(--card);border:1px solid
var(--line);border-radius:8px;padding:10px 14px;min-width:260px;max-width:380px;flex:1}
.card h3{margin:0 0 6px;font-size:15px;word-break:break-all}.card.disabled{border-color:var(--bad)}
.line{display:grid;grid-template-columns:96px 1fr;gap:8px;align-items:center;margin:3px 0}
.line>span{overflow-wrap:anywhere}.label{color:var(--mut)}meter{width:110px}
th,.badge,#live-table td:first-child,#live-table td:nth-child(8){white-space:nowrap}
form.inline{display:inline;margin:0 0 0 6px}button{cursor:pointer;font:inherit;padding:2px 10px;
border-radius:6px;border:1px solid #8c959f;background:#f6f8fa}button.danger{background:var(--bad);
color:#fff;border-color:var(--bad)}button.go{background:var(--ok);color:#fff;border-color:var(--ok)}
.killed{color:#ffb4b4;font-weight:600}form.filters{display:flex;gap:8px;flex-wrap:wrap;
margin-bottom:12px;align-items:end}form.filters label{display:flex;flex-direction:column;
font-size:12px;color:var(--mut)}input,select{font:inherit;padding:2px 6px}
pre{background:#fff;border:1px solid var(--line);padding:8px;overflow:auto;max-height:420px;
white-space:pre-wrap;word-break:break-word}.empty{color:var(--mut)}
.notice{background:#dafbe1;border:1px solid #aceebb;padding:6px 10px;border-radius:6px}
.error{background:#ffebe9;border:1px solid #ffcecb;padding:6px 10px;border-radius:6px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px}dt{color:var(--mut)}
dd{margin:0;word-break:break-all}
"""

# The only script: listens to the container's event stream (server-sent events; polling
# its JSON endpoint every second where EventSource is missing) and rebuilds its rows from
# cells with createElement/textContent (never innerHTML). Links, form actions and the
# stream must be same-origin paths. The status says "stale" when no event came for 8 s
# (the server pings every 5 s); EventSource reconnects by itself after a dropped stream.
SCRIPT = """
(function(){"use strict";
var live=document.getElementById("live"),st=document.getElementById("live-status"),
glob=document.getElementById("global"),m=document.querySelector('meta[name="csrf-token"]'),
csrf=m?m.getAttribute("content"):"",last=null;
if(!live)return;var src=live.getAttribute("data-live"),layout=live.getAttribute("data-layout");
function ok(h){return typeof h==="string"&&h.charAt(0)==="/"&&h.charAt(1)!=="/"&&
h.indexOf("\\\\")<0;}
function el(t,c,x){var e=document.createElement(t);if(c)e.className=String(c);
if(x!==undefined&&x!==null)e.textContent=String(x);return e;}
function hid(f,n,v){var i=document.createElement("input");i.type="hidden";i.name=String(n);
i.value=String(v);f.appendChild(i);}
function form(p){if(!ok(p.action))return null;var f=el("form","inline");f.method="post";
f.action=p.action;hid(f,"csrf",csrf);hid(f,"next",location.pathname+location.search);
var fs=p.fields||{};Object.keys(fs).forEach(function(k){hid(f,k,fs[k]);});
var b=el("button",p.cls||"",p.label||"submit");b.type="submit";f.appendChild(b);return f;}
function cell(c){var s=el("span",c.cls||"");var t=c.t===undefined||c.t===null?"":String(c.t);
if(ok(c.href)){var a=el("a","",t);a.href=c.href;s.appendChild(a);}
else s.appendChild(document.createTextNode(t));
if(c.meter){s.appendChild(document.createTextNode(" "));var me=document.createElement("meter");
me.min=0;me.max=Number(c.meter[1]);me.value=Number(c.meter[0]);s.appendChild(me);}
(c.forms||[]).forEach(function(p){var f=form(p);if(f)s.appendChild(f);});return s;}
function clear(n){while(n.firstChild)n.removeChild(n.firstChild);}
function rows(d){clear(live);var rs=d.rows||[];
if(!rs.length){var e=el("p","empty","nothing yet");if(layout==="cards")live.appendChild(e);
else{var tr=el("tr"),td=el("td","empty");td.appendChild(e);tr.appendChild(td);live.appendChild(tr);}
return;}
rs.forEach(function(r){var cs=r.cells||[];
if(layout==="cards"){var card=el("div",("card "+(r.cls||"")).trim());
card.appendChild(el("h3","",r.title||""));cs.forEach(function(c){var l=el("div","line");
l.appendChild(el("span","label",c.label||""));l.appendChild(cell(c));card.appendChild(l);});
live.appendChild(card);}else{var tr=el("tr",r.cls||"");cs.forEach(function(c){
var td=el("td");td.appendChild(cell(c));tr.appendChild(td);});live.appendChild(tr);}});}
function apply(text){if(text!==last){var d=JSON.parse(text);last=text;rows(d);
if(glob&&d.header){clear(glob);d.header.forEach(function(c){glob.appendChild(cell(c));});}}}
function fresh(){seen=Date.now();if(st){st.className="status";
st.textContent="live \\u00b7 "+new Date().toLocaleTimeString();}}
function stale(){if(st){st.className="status stale";st.textContent="stale \\u00b7 retrying";}}
var seen=0,stream=live.getAttribute("data-stream");
if(window.EventSource&&ok(stream)){var es=null;
function listen(){es=new EventSource(stream);
es.addEventListener("update",function(e){apply(e.data);fresh();});
es.addEventListener("ping",fresh);es.addEventListener("stale",stale);
es.onerror=function(){if(es.readyState===2){stale();setTimeout(listen,5000);}};}
listen();setInterval(function(){if(Date.now()-seen>8000)stale();},2000);return;}
function tick(){fetch(src,{headers:{"Accept":"application/json"},credentials:"same-origin",
cache:"no-store"}).then(function(r){if(!r.ok)throw new Error(String(r.status));return r.text();})
.then(function(text){apply(text);fresh();}).catch(stale)
.then(function(){setTimeout(tick,1000);});}
setTimeout(tick,1000);})();
"""
