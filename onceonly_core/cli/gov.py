"""Governance from the shell: ``onceonly policy | agent | tools | approvals | audit |
timeline`` (issue 3 item 9; reference in ``docs/cli-governance.md``).

Every command works on the governance state of one tenant, ``--namespace`` (default
``ONCEONLY_NAMESPACE``, else ``default``: the namespace a ``Guard()`` uses), in the
ledger at ``--url``, through the Python API (``guard.gov``). Reads never create a ledger;
writes to a SQLite URL create the file like the first guarded call would, and a server
database needs ``onceonly migrate`` first.

``app.py`` registers these commands on the ``onceonly`` app (:func:`register`).
"""

import contextlib
import datetime as dt
import getpass
import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import sqlalchemy as sa
import typer
from pydantic import BaseModel, ValidationError
from rich.table import Table
from rich.text import Text

from ..governance.models import Policy
from ..governance.templates import TEMPLATES, template
from ..guard import Guard
from ._common import (
    DEFAULT_URL,
    NAMESPACE_ENV,
    CliError,
    JsonOpt,
    UrlOpt,
    _busy,
    _console,
    _emit_json,
    _interactive,
    _note,
    _open,
    _short_key,
    _table,
    _when,
)

if TYPE_CHECKING:
    from ..governance.engine import Governance

DEFAULT_NAMESPACE = "default"

# -- options -----------------------------------------------------------------------------
NamespaceOpt = Annotated[
    str,
    typer.Option(
        "--namespace",
        "-n",
        envvar=NAMESPACE_ENV,
        help="The tenant (the guard's namespace) whose governance state to use.",
    ),
]
AgentArg = Annotated[str, typer.Argument(help="The agent id.", show_default=False)]
ScopeOpt = Annotated[
    str,
    typer.Option("--scope", help="Where the tool is registered: global or agent:<id>."),
]
DECISION_STYLES = {
    "executed": "green",
    "dedup": "cyan",
    "blocked": "red",
    "failed": "red",
    "pending_approval": "yellow",
}
APPROVAL_STYLES = {"pending": "yellow", "approved": "green", "denied": "red", "consumed": "dim"}


class Period(str, Enum):
    hour = "hour"
    day = "day"
    week = "week"


class ApprovalState(str, Enum):
    pending = "pending"
    approved = "approved"
    denied = "denied"
    consumed = "consumed"
    all = "all"


class Auth(str, Enum):
    none = "none"
    hmac_sha256 = "hmac_sha256"


# -- opening the governance API ----------------------------------------------------------
@contextlib.contextmanager
def _governance(url: str, namespace: str, *, write: bool = False) -> Iterator["Governance"]:
    """``guard.gov`` over the ledger at ``url``, for tenant ``namespace``.

    A write to a SQLite URL creates the ledger (as the first guarded call would); a
    read never does, and a server database is never migrated here."""
    create = False
    if write and url.startswith("sqlite"):
        with contextlib.suppress(Exception):
            database = sa.make_url(url).database
            create = True
            if database and database != ":memory:" and not Path(database).exists():
                _note(f"creating a new ledger at {Path(database).resolve()}")
    with _open(url, create=create) as store:
        guard = Guard(store=store, namespace=namespace, quiet=True)
        gov = guard.gov
        try:
            yield gov
        finally:
            gov.close()  # the store is closed by _open


class _validating:  # a context manager: with _validating("what"): ...
    """Turn a pydantic ValidationError into one readable CliError."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: Any, tb: Any) -> None:
        if isinstance(err, ValidationError):
            raise CliError(f"{self.what}: {_errors(err)}") from None


def _errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = str(e["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


def _agent_label(agent: str) -> str:
    if agent == "*":
        raise CliError("'*' is the global switch, not an agent: use --all")
    return agent


def _require_agent(gov: "Governance", agent: str) -> None:
    """Unknown agents are an error for reads: a typo must not look like a clean agent."""
    _agent_label(agent)
    if gov.store.get_agent(gov.tenant, agent) is None and not gov.agent_logs(agent, limit=1):
        raise CliError(
            f"no agent {agent!r} in namespace {gov.tenant!r}: no policy, no kill-switch state "
            f"and no audit rows (see: onceonly policy list --namespace {gov.tenant})"
        )


def _styled(value: str, styles: Mapping[str, str]) -> Text:
    return Text(value, style=styles.get(value, ""))


def _usd(value: float | None) -> str:
    return "no limit" if value is None else f"${value:,.2f}"


def _compact(value: Any, width: int = 60) -> str:
    if value is None:
        return ""
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= width else text[: width - 1] + "…"


def _done(text: str, detail: str, style: str = "bold green") -> None:
    _console().print(Text.assemble((text + " ", style), detail), soft_wrap=True)


# -- policy ------------------------------------------------------------------------------
policy_app = typer.Typer(
    help="Agent policies: allow/block lists, caps, budgets, prices, approvals, risk.",
    no_args_is_help=True,
)

_DICT_FIELDS = {"max_calls_per_tool", "pricing_rules", "risk_levels"}
_SETTABLE = [name for name in Policy.model_fields if name != "agent_id"]


def _value(text: str) -> Any:
    """JSON where it parses (50, true, null, ["a"], {"a": 1}), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _apply_sets(base: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """``key=value`` and, for the table fields, ``key.TOOL=value`` (``null`` removes)."""
    fields = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for item in sets:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CliError(f"--set {item!r}: expected key=value")
        field, dot, sub = key.partition(".")
        if field == "agent_id":
            raise CliError("--set agent_id: the agent is the command's argument")
        if field not in _SETTABLE or (dot and field not in _DICT_FIELDS):
            raise CliError(
                f"--set {item!r}: unknown policy field {key!r}; fields: {', '.join(_SETTABLE)}"
                f" (and {'/'.join(sorted(_DICT_FIELDS))}.TOOL=value)"
            )
        value = _value(raw)
        if dot:
            if not sub:
                raise CliError(f"--set {item!r}: name the tool after {field}.")
            table = dict(fields.get(field) or {})
            if value is None:
                table.pop(sub, None)
            else:
                table[sub] = value
            fields[field] = table
        else:
            fields[field] = value
    return fields


def _read_policy_file(path: str, agent: str) -> dict[str, Any]:
    name = "stdin" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise CliError(f"cannot read {name}: {err.strerror or err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CliError(
            f"{name} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})"
        ) from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise CliError(f"{name} must hold a JSON object of policy fields, not a {kind}")
    other = data.pop("agent_id", agent)
    if other != agent:
        raise CliError(f"{name} is the policy of agent {other!r}, not {agent!r}")
    return data


def _policy_rows(fields: Mapping[str, Any]) -> list[tuple[str, str]]:
    def show(name: str, value: Any) -> str:
        if name == "allowed_tools" and value is None:
            return "any tool (unless blocked)"
        if name.startswith("max_") and value is None:
            return "no limit"
        if name == "max_spend_usd_per_day":
            return _usd(value)
        if isinstance(value, list):
            return ", ".join(str(v) for v in value) or "—"
        if isinstance(value, dict):
            return ", ".join(f"{k}={v}" for k, v in value.items()) or "—"
        return "—" if value is None else str(value)

    return [(name, show(name, fields.get(name))) for name in _SETTABLE if name in fields]


def _print_policy(fields: Mapping[str, Any], title: str) -> None:
    table = _table(title)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    for name, shown in _policy_rows(fields):
        table.add_row(name, shown)
    _console().print(table)


@policy_app.command("set")
def policy_set(
    agent: AgentArg,
    file: Annotated[
        str | None,
        typer.Option("--file", "-f", help="A JSON object of policy fields ('-': stdin)."),
    ] = None,
    template_name: Annotated[
        str | None,
        typer.Option("--template", "-t", help="Start from a template (onceonly policy template)."),
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="key=value (JSON where it parses), or TABLE.TOOL=value for "
            "max_calls_per_tool, pricing_rules, risk_levels; repeatable.",
        ),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """Set an agent's policy: from a file, a template, or the current policy, then --set.

    With --file or --template the policy is replaced; with only --set, the agent's current
    policy is changed field by field."""
    agent = _agent_label(agent)
    sets = list(sets or [])
    if file is not None and template_name is not None:
        raise CliError("--file and --template are exclusive: put the fields in the file")
    if file is None and template_name is None and not sets:
        raise CliError("nothing to set: pass --file, --template or --set key=value")
    with _governance(url, namespace, write=True) as gov:
        if template_name is not None:
            fields = _apply_sets(template(template_name), sets)
            with _validating(f"policy of {agent!r}"):
                policy = gov.policy_from_template(agent, template_name, fields)
        else:
            if file is not None:
                base = _read_policy_file(file, agent)
            else:
                current = gov.get_policy(agent)
                base = current.model_dump(exclude={"agent_id"}) if current else {}
            fields = _apply_sets(base, sets)
            with _validating(f"policy of {agent!r}"):
                policy = gov.upsert_policy(Policy.model_validate({**fields, "agent_id": agent}))
        if as_json:
            _emit_json(_dump(policy))
            return
        _done("policy set", f"for agent {agent} in namespace {namespace}")
        _print_policy(_dump(policy), f"Policy of {agent}")


@policy_app.command("get")
def policy_get(
    agent: AgentArg,
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """Show an agent's policy."""
    with _governance(url, namespace) as gov:
        policy = gov.get_policy(_agent_label(agent))
        if policy is None:
            raise CliError(
                f"no policy for agent {agent!r} in namespace {namespace!r} "
                f"(see: onceonly policy list --namespace {namespace})"
            )
        if as_json:
            _emit_json(_dump(policy))
            return
        status = gov.agent_status(agent)
        _print_policy(_dump(policy), f"Policy of {agent} in {namespace}")
        if status["disabled"]:
            _note(f"agent {agent} is disabled: {status['reason'] or 'no reason given'}")


@policy_app.command("list")
def policy_list(
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """Every agent policy of the namespace."""
    with _governance(url, namespace) as gov:
        policies = gov.list_policies()
        if as_json:
            _emit_json([_dump(p) for p in policies])
            return
        if not policies:
            _note(f"No policies in namespace {namespace!r}: onceonly policy set AGENT ...")
            return
        table = _table(f"Policies in {namespace}")
        for col in ("agent", "template", "allowed", "blocked", "approval", "actions/h", "$/day"):
            table.add_column(col, overflow="fold")
        table.add_column("status", no_wrap=True)
        for p in policies:
            status = gov.agent_status(p.agent_id)
            table.add_row(
                p.agent_id,
                p.template or "",
                "any" if p.allowed_tools is None else ", ".join(p.allowed_tools) or "none",
                ", ".join(p.blocked_tools),
                ", ".join(p.require_approval),
                "no limit" if p.max_actions_per_hour is None else str(p.max_actions_per_hour),
                _usd(p.max_spend_usd_per_day),
                Text("disabled", "bold red") if status["disabled"] else Text("enabled", "green"),
            )
        _console().print(table)


@policy_app.command("rm")
def policy_rm(
    agent: AgentArg,
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """Remove an agent's policy (its calls are then not limited; the kill switch stays)."""
    with _governance(url, namespace, write=True) as gov:
        if gov.get_policy(_agent_label(agent)) is None:
            raise CliError(f"no policy for agent {agent!r} in namespace {namespace!r}")
        gov.delete_policy(agent)
        if as_json:
            _emit_json({"agent_id": agent, "namespace": namespace, "deleted": True})
            return
        _done("removed", f"the policy of agent {agent} in namespace {namespace}")


@policy_app.command("template")
def policy_template(
    name: Annotated[str | None, typer.Argument(help="A template to show; none: list them.")] = None,
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """List the policy templates, or show what one contains (built in: no ledger is read)."""
    del url, namespace  # accepted like everywhere; templates are part of the library
    if name is not None:
        fields = template(name)
        if as_json:
            _emit_json(fields)
            return
        _print_policy(fields, f"Template {name}")
        _note(f"use it: onceonly policy set AGENT --template {name} [--set key=value ...]")
        return
    if as_json:
        _emit_json({n: template(n) for n in sorted(TEMPLATES)})
        return
    table = _table("Policy templates")
    for col in ("template", "allowed", "blocked", "approval", "actions/h", "$/day"):
        table.add_column(col, overflow="fold")
    for n in sorted(TEMPLATES):
        f = template(n)
        table.add_row(
            n,
            "any" if f.get("allowed_tools") is None else ", ".join(f["allowed_tools"]),
            ", ".join(f.get("blocked_tools", [])),
            ", ".join(f.get("require_approval", [])),
            str(f.get("max_actions_per_hour", "no limit")),
            _usd(f.get("max_spend_usd_per_day")),
        )
    _console().print(table)


# -- agent -------------------------------------------------------------------------------
agent_app = typer.Typer(
    help="The kill switch, and what an agent did: logs, metrics, status.",
    no_args_is_help=True,
)
OptionalAgentArg = Annotated[
    str | None, typer.Argument(help="The agent id (or --all).", show_default=False)
]
AllOpt = Annotated[bool, typer.Option("--all", help="The global switch: every agent.")]


def _one_or_all(agent: str | None, every: bool) -> str | None:
    if every and agent is not None:
        raise CliError("give an agent id or --all, not both")
    if not every and agent is None:
        raise CliError("which agent? give an agent id, or --all for every agent")
    return None if every else _agent_label(agent or "")


@agent_app.command("disable")
def agent_disable(
    agent: OptionalAgentArg = None,
    every: AllOpt = False,
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (shown to callers).")] = "",
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """The kill switch: the agent's next call is blocked, in every process on this ledger."""
    target = _one_or_all(agent, every)
    with _governance(url, namespace, write=True) as gov:
        if target is None:
            gov.disable_all(reason)
        else:
            gov.disable_agent(target, reason)
        status = gov.agent_status(target or "*")
        if as_json:
            _emit_json({**status, "namespace": namespace})
            return
        who = "every agent" if target is None else f"agent {target}"
        _done(
            "disabled",
            f"{who} in namespace {namespace}: the next call is blocked (agent_disabled) "
            "in every process sharing this ledger",
            "bold red",
        )


@agent_app.command("enable")
def agent_enable(
    agent: OptionalAgentArg = None,
    every: AllOpt = False,
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """Lift the kill switch of one agent, or the global switch (--all)."""
    target = _one_or_all(agent, every)
    with _governance(url, namespace, write=True) as gov:
        if target is None:
            gov.enable_all()
        else:
            gov.enable_agent(target)
        status = gov.agent_status(target or "*")
        if as_json:
            _emit_json({**status, "namespace": namespace})
            return
        who = "every agent" if target is None else f"agent {target}"
        _done("enabled", f"{who} in namespace {namespace}")
        if target is not None and status["global_disabled"]:
            _note(
                "the global switch is still on, so this agent stays stopped: "
                "onceonly agent enable --all"
            )


@agent_app.command("status")
def agent_status(
    agent: AgentArg,
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """Is the agent enabled, and does it have a policy?"""
    with _governance(url, namespace) as gov:
        _require_agent(gov, agent)
        status = gov.agent_status(agent)
        if as_json:
            _emit_json({**status, "namespace": namespace})
            return
        state = Text("disabled", "bold red") if status["disabled"] else Text("enabled", "green")
        line = Text.assemble(f"agent {agent} in {namespace}: ", state)
        if status["disabled"]:
            where = "the global switch" if status["global_disabled"] else "its kill switch"
            line.append(f" by {where}")
            if status["reason"]:
                line.append(f" ({status['reason']})")
        line.append("; " + ("has a policy" if status["has_policy"] else "no policy"), "dim")
        _console().print(line, soft_wrap=True)


@agent_app.command("logs")
def agent_logs(
    agent: AgentArg,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 50,
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """The agent's audit trail, newest first: one row per decision (args redacted)."""
    with _governance(url, namespace) as gov:
        _require_agent(gov, agent)
        rows = gov.agent_logs(agent, limit=limit)
        if as_json:
            _emit_json([_dump(r) for r in rows])
            return
        if not rows:
            _note(f"No audit rows for agent {agent!r} in namespace {namespace!r}.")
            return
        table = _table(f"Decisions of {agent} in {namespace}")
        table.add_column("time", no_wrap=True)
        table.add_column("seq", justify="right", no_wrap=True)
        table.add_column("tool", overflow="fold")
        table.add_column("decision", no_wrap=True)
        table.add_column("reason", no_wrap=True)
        table.add_column("risk", no_wrap=True)
        table.add_column("spend", justify="right", no_wrap=True)
        table.add_column("run id", overflow="fold")
        table.add_column("key", no_wrap=True)
        for r in rows:
            table.add_row(
                _when(r.created_at),
                str(r.seq),
                r.tool,
                _styled(r.decision, DECISION_STYLES),
                r.reason,
                r.risk_level,
                f"${r.spend_usd:,.2f}" if r.spend_usd else "",
                r.run_id or "",
                _short_key(r.key) if r.key else "",
            )
        _console().print(table)


@agent_app.command("metrics")
def agent_metrics(
    agent: AgentArg,
    period: Annotated[Period, typer.Option("--period", help="The window, up to now.")] = (
        Period.day
    ),
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """Actions, blocks, spend and top tools over the last hour, day or week."""
    with _governance(url, namespace) as gov:
        _require_agent(gov, agent)
        m = gov.agent_metrics(agent, period.value)
        if as_json:
            _emit_json(_dump(m))
            return
        table = _table(f"{agent} in {namespace}, last {m.period}")
        table.add_column("metric", no_wrap=True)
        table.add_column("value", overflow="fold")
        for name in ("total_actions", "executed", "dedup", "blocked", "failed"):
            table.add_row(name.replace("_", " "), str(getattr(m, name)))
        table.add_row("pending approval", str(m.pending_approval))
        table.add_row("spend", f"${m.spend_usd:,.2f}")
        table.add_row("top tools", ", ".join(f"{t} ({n})" for t, n in m.top_tools) or "—")
        _console().print(table)


# -- tools -------------------------------------------------------------------------------
tools_app = typer.Typer(
    help="The tools registry: remote HTTP tools and their switches (secrets never shown).",
    no_args_is_help=True,
)


def _read_secret(env: str | None, stdin: bool) -> str | None:
    """The signing secret: from an environment variable, stdin, or a hidden prompt —
    never from the command line, where shell history and ``ps`` would keep it."""
    import os

    if env is not None and stdin:
        raise CliError("--secret-env and --secret-stdin are exclusive")
    if env is not None:
        secret = os.environ.get(env, "")
        if not secret:
            raise CliError(f"--secret-env {env}: the environment variable {env} is not set")
        return secret
    if stdin:
        secret = sys.stdin.readline().rstrip("\r\n")
        if not secret:
            raise CliError("--secret-stdin: stdin gave no secret")
        return secret
    return None


@tools_app.command("list")
def tools_list(
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """Every registered tool of the namespace (has_secret, never the secret)."""
    with _governance(url, namespace) as gov:
        tools = gov.list_tools()
        if as_json:
            _emit_json([_dump(t) for t in tools])
            return
        if not tools:
            _note(f"No tools registered in namespace {namespace!r}: onceonly tools add ...")
            return
        table = _table(f"Tools in {namespace}")
        table.add_column("name", overflow="fold")
        table.add_column("scope", overflow="fold")
        table.add_column("kind", no_wrap=True)
        table.add_column("url", overflow="fold")
        table.add_column("auth", no_wrap=True)
        table.add_column("secret", no_wrap=True)
        table.add_column("timeout", justify="right", no_wrap=True)
        table.add_column("retries", justify="right", no_wrap=True)
        table.add_column("enabled", no_wrap=True)
        for t in tools:
            table.add_row(
                t.name,
                t.scope_id,
                t.kind,
                t.url or "",
                t.auth,
                "set" if t.has_secret else "",
                f"{t.timeout_ms} ms",
                str(t.max_retries),
                Text("on", "green") if t.enabled else Text("off", "red"),
            )
        _console().print(table)


@tools_app.command("add")
def tools_add(
    name: Annotated[str, typer.Argument(help="The tool name (letters, digits, _ . : -).")],
    endpoint: Annotated[
        str,
        typer.Option(
            "--endpoint",
            "-e",
            help="The tool's http(s) URL (--url is the ledger, as in every command).",
            show_default=False,
        ),
    ],
    scope: ScopeOpt = "global",
    auth: Annotated[
        Auth | None,
        typer.Option("--auth", help="Request signing; hmac_sha256 when a secret is given."),
    ] = None,
    secret_env: Annotated[
        str | None,
        typer.Option("--secret-env", help="Read the signing secret from this env variable."),
    ] = None,
    secret_stdin: Annotated[
        bool, typer.Option("--secret-stdin", help="Read the signing secret from stdin.")
    ] = False,
    timeout_ms: Annotated[
        int, typer.Option("--timeout-ms", min=1, max=600_000, help="Per attempt.")
    ] = 10_000,
    max_retries: Annotated[
        int, typer.Option("--max-retries", min=0, max=10, help="Retries of safe failures.")
    ] = 2,
    description: Annotated[str, typer.Option("--description", help="Free text.")] = "",
    disabled: Annotated[bool, typer.Option("--disabled", help="Register it switched off.")] = (
        False
    ),
    replace: Annotated[
        bool, typer.Option("--replace", help="Overwrite a tool of this name and scope.")
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """Register a remote HTTP tool. The secret comes from --secret-env VAR, --secret-stdin,
    or a hidden prompt; never from the command line."""
    secret = _read_secret(secret_env, secret_stdin)
    mode = auth.value if auth is not None else ("hmac_sha256" if secret else "none")
    if mode == "none" and secret:
        raise CliError("--auth none takes no secret (drop --secret-env / --secret-stdin)")
    if mode == "hmac_sha256" and not secret:
        if as_json or not _interactive():
            raise CliError(
                "--auth hmac_sha256 needs a secret: --secret-env VAR or --secret-stdin "
                "(or run in a terminal to be asked)"
            )
        secret = typer.prompt("Signing secret", hide_input=True, confirmation_prompt=True)
        if not secret:
            raise CliError("no secret given")
    with _governance(url, namespace, write=True) as gov:
        if not replace and gov.get_tool(name, scope) is not None:
            raise CliError(
                f"tool {name!r} is already registered in scope {scope}: pass --replace "
                "to overwrite it"
            )
        with _validating(f"tool {name!r}"):
            spec = gov.create_tool(
                name,
                url=endpoint,
                scope_id=scope,
                auth=mode,
                secret=secret,
                timeout_ms=timeout_ms,
                max_retries=max_retries,
                enabled=not disabled,
                description=description,
            )
        if as_json:
            _emit_json(_dump(spec))
            return
        signed = " (signed, secret stored)" if spec.has_secret else ""
        _done("registered", f"{spec.name} in scope {spec.scope_id} → {spec.url}{signed}")


def _missing_tool(name: str, scope: str, namespace: str) -> CliError:
    return CliError(
        f"no tool {name!r} in scope {scope} of namespace {namespace!r} "
        f"(see: onceonly tools list --namespace {namespace})"
    )


@tools_app.command("toggle")
def tools_toggle(
    name: Annotated[str, typer.Argument(help="The tool name.")],
    on: Annotated[
        bool | None,
        typer.Option("--on/--off", help="Switch the tool on or off.", show_default=False),
    ] = None,
    scope: ScopeOpt = "global",
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """Switch a registered tool on or off (off: calls are blocked, tool_disabled)."""
    if on is None:
        raise CliError("say which: --on or --off")
    with _governance(url, namespace, write=True) as gov:
        if not gov.toggle_tool(name, on, scope):
            raise _missing_tool(name, scope, namespace)
        spec = gov.get_tool(name, scope)
        if as_json:
            _emit_json(_dump(spec) if spec else {"name": name, "scope_id": scope, "enabled": on})
            return
        _done("on" if on else "off", f"{name} in scope {scope}", "bold green" if on else "bold red")


@tools_app.command("rm")
def tools_rm(
    name: Annotated[str, typer.Argument(help="The tool name.")],
    scope: ScopeOpt = "global",
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """Remove a registered tool (and its secret)."""
    with _governance(url, namespace, write=True) as gov:
        if not gov.delete_tool(name, scope):
            raise _missing_tool(name, scope, namespace)
        if as_json:
            _emit_json({"name": name, "scope_id": scope, "namespace": namespace, "deleted": True})
            return
        _done("removed", f"{name} from scope {scope}")


# -- approvals ---------------------------------------------------------------------------
approvals_app = typer.Typer(
    help="Calls waiting for a human: list, approve (runs once), deny.", no_args_is_help=True
)
ByOpt = Annotated[
    str | None,
    typer.Option("--by", help="Who decides (default: your user name).", show_default=False),
]


def _who(by: str | None) -> str | None:
    if by:
        return by
    try:
        return getpass.getuser()
    except Exception:
        return None


def _approval_line(verb: str, a: Any, style: str, tail: str = "") -> None:
    _done(verb, f"{a.id}: {a.tool} for agent {a.agent_id}{tail}", style)


@approvals_app.command("list")
def approvals_list(
    state: Annotated[
        ApprovalState, typer.Option("--state", help="Only requests in this state.")
    ] = ApprovalState.pending,
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """Approval requests, oldest first (args redacted)."""
    with _governance(url, namespace) as gov:
        rows = gov.list_approvals(None if state is ApprovalState.all else state.value)
        if as_json:
            _emit_json([_dump(a) for a in rows])
            return
        if not rows:
            which = "" if state is ApprovalState.all else f"{state.value} "
            _note(f"No {which}approval requests in namespace {namespace!r}.")
            return
        table = _table(f"Approval requests in {namespace}")
        table.add_column("id", no_wrap=True)
        table.add_column("state", no_wrap=True)
        table.add_column("agent", overflow="fold")
        table.add_column("tool", overflow="fold")
        table.add_column("args", overflow="fold")
        table.add_column("asked", no_wrap=True)
        table.add_column("decided by", overflow="fold")
        table.add_column("reason", overflow="fold")
        for a in rows:
            table.add_row(
                a.id,
                _styled(a.state, APPROVAL_STYLES),
                a.agent_id,
                a.tool,
                _compact(a.args),
                _when(a.created_at),
                a.decided_by or "",
                a.reason or "",
            )
        _console().print(table)


def _approval_or_fail(gov: "Governance", approval_id: str) -> Any:
    found = gov.get_approval(approval_id)
    if found is None:
        raise CliError(
            f"no approval request {approval_id!r} in namespace {gov.tenant!r} "
            f"(see: onceonly approvals list --state all --namespace {gov.tenant})"
        )
    return found


@approvals_app.command("approve")
def approvals_approve(
    approval_id: Annotated[str, typer.Argument(help="The request id (apr_...).")],
    by: ByOpt = None,
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """Approve a request: the agent's next ask of that call runs it, exactly once."""
    with _governance(url, namespace, write=True) as gov:
        _approval_or_fail(gov, approval_id)
        done = gov.approve(approval_id, by=_who(by))
        if as_json:
            _emit_json(_dump(done))
            return
        _approval_line("approved", done, "bold green", ": the next ask runs it, once")


@approvals_app.command("deny")
def approvals_deny(
    approval_id: Annotated[str, typer.Argument(help="The request id (apr_...).")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (shown to the agent).")] = "",
    by: ByOpt = None,
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """Deny a request: the call is blocked (approval_denied) whenever it is asked."""
    with _governance(url, namespace, write=True) as gov:
        _approval_or_fail(gov, approval_id)
        done = gov.deny(approval_id, by=_who(by), reason=reason)
        if as_json:
            _emit_json(_dump(done))
            return
        _approval_line("denied", done, "bold red", f" ({reason})" if reason else "")


# -- audit -------------------------------------------------------------------------------
audit_app = typer.Typer(
    help="The tamper-evident audit log: verify its hash chains, purge old rows.",
    no_args_is_help=True,
)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


@audit_app.command("verify")
def audit_verify(
    all_namespaces: Annotated[
        bool, typer.Option("--all-namespaces", help="Every tenant of the ledger.")
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """Walk every hash chain and cross-check the ledger's governed executions against
    the audit rows; exit 1 naming each broken chain's first bad row and each execution
    without its audit row. Expired budget holds are settled (and audited) first."""
    with (
        _governance(url, namespace) as gov,
        _busy("verifying the audit hash chains …", as_json),
    ):
        report = gov.audit_report(all_tenants=all_namespaces)
    problems = report["problems"]
    chains, execs = report["chains"], report["executions"]
    broken = [p for p in problems if p.get("key") is None]
    missing = [p for p in problems if p.get("key") is not None]
    where = "every namespace" if all_namespaces else f"namespace {namespace}"
    checked = (
        f"{chains} {'chain' if chains == 1 else 'chains'} verified in {where}; "
        f"{execs} governed {'execution' if execs == 1 else 'executions'} in the ledger "
        "cross-checked against the audit rows"
    )
    if as_json:
        _emit_json(
            {
                "ok": not problems,
                "namespace": None if all_namespaces else namespace,
                "chains": chains,
                "broken": len(broken),
                "executions": execs,
                "ungoverned": report["ungoverned"],
                "in_flight": report["in_flight"],
                "missing": len(missing),
                "problems": problems,
            }
        )
    elif not problems:
        _done(
            "ok",
            f"{checked}: no row altered, moved or removed, every execution has its audit row",
        )
    else:
        console = _console()
        console.print(
            Text.assemble(
                ("TAMPERED " if broken else "INCOMPLETE ", "bold red"),
                f"{len(broken)} of {max(chains, len(broken))} chains broken, "
                f"{len(missing)} of {execs} executions without an audit row ({checked})",
            ),
            soft_wrap=True,
        )
        for p in missing:
            ns = f" in namespace {p['namespace']}"
            console.print(f"  {p['problem']}{ns}", soft_wrap=True, highlight=False)
        for p in broken:
            row = "row id " + (str(p["id"]) if p["id"] is not None else "(none)")
            seq = "seq " + (str(p["seq"]) if p["seq"] is not None else "(none)")
            ns = f" in namespace {p['tenant']}" if all_namespaces else ""
            console.print(
                f"  agent {p['agent_id']}{ns}: first bad row at {seq}, {row}: {p['problem']}",
                soft_wrap=True,
                highlight=False,
            )
    if problems:
        raise typer.Exit(1)


def _cutoff(text: str, now: float) -> float:
    """``30d`` / ``12h`` / ``90m`` / ``2w`` / ``45s`` before now (the database clock), or
    an ISO date or datetime; without a UTC offset it is read as UTC."""
    m = _RELATIVE.match(text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise CliError(
            f"--before {text!r}: expected an ISO date or datetime (2026-01-31, "
            "2026-01-31T12:00:00+00:00) or an age like 30d, 12h, 2w"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


@audit_app.command("purge")
def audit_purge(
    before: Annotated[
        str,
        typer.Option(
            "--before",
            help="Delete rows recorded before this: an ISO date/datetime (UTC unless it "
            "says otherwise) or an age like 30d, 12h, 2w.",
            show_default=False,
        ),
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """Retention: delete old audit rows of the namespace; the chains keep verifying."""
    with _governance(url, namespace, write=True) as gov:
        now = gov.store.now()
        cut = _cutoff(before, now)
        if cut > now:
            raise CliError(
                f"--before {before!r} is in the future ({_iso(cut)}): that would purge rows "
                "written from now on too; use 0s to purge everything so far"
            )
        if not yes:
            if as_json or not _interactive():
                raise CliError("purging audit rows needs confirmation: pass --yes")
            question = f"Delete the audit rows of namespace {namespace!r} before {_iso(cut)}?"
            if not typer.confirm(question, default=False):
                _note("nothing purged")
                raise typer.Exit(1)
        with _busy("purging old audit rows …", as_json):
            n = gov.purge_audit(cut)
        if as_json:
            _emit_json(
                {"namespace": namespace, "before": cut, "before_iso": _iso(cut), "purged": n}
            )
            return
        _done("purged", f"{n} audit rows of namespace {namespace} before {_iso(cut)}")


# -- timeline ----------------------------------------------------------------------------
EVENT_STYLES = {
    "run_started": "bold",
    "run_finished": "bold",
    "tool_call": "",
    "tool_result": "green",
    "dedup": "cyan",
    "blocked": "red",
}


def timeline(
    run_id: Annotated[str, typer.Argument(help="The run id (guard.run(...), run_id=...).")],
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 100,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Skip this many first.")] = 0,
    url: UrlOpt = DEFAULT_URL,
    namespace: NamespaceOpt = DEFAULT_NAMESPACE,
    as_json: JsonOpt = False,
) -> None:
    """The ordered events of one agent run: calls, results, dedups, blocks, custom events."""
    with _governance(url, namespace) as gov:
        events = gov.get_run_timeline(run_id, limit=limit, offset=offset)
        if not events and (offset == 0 or not gov.get_run_timeline(run_id, limit=1)):
            raise CliError(f"no events for run {run_id!r} in namespace {namespace!r}")
    if as_json:
        _emit_json([_dump(e) for e in events])
        return
    if not events:
        _note(f"no events after the first {offset} of run {run_id!r}")
        return
    table: Table = _table(f"Run {run_id} in {namespace}")
    table.add_column("time", no_wrap=True)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("event", no_wrap=True)
    table.add_column("agent", overflow="fold")
    table.add_column("tool", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("data", overflow="fold")
    for e in events:
        table.add_row(
            _when(e.created_at),
            str(e.id),
            _styled(e.type, EVENT_STYLES),
            e.agent_id or "",
            e.tool or "",
            _styled(e.status, DECISION_STYLES) if e.status else "",
            _compact(e.data, 80),
        )
    _console().print(table)


# -- registration ------------------------------------------------------------------------
def register(app: typer.Typer) -> None:
    """Add the governance commands to the ``onceonly`` app."""
    app.add_typer(policy_app, name="policy")
    app.add_typer(agent_app, name="agent")
    app.add_typer(tools_app, name="tools")
    app.add_typer(approvals_app, name="approvals")
    app.add_typer(audit_app, name="audit")
    app.command("timeline")(timeline)
