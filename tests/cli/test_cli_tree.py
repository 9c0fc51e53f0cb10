"""The shape of the ``onceonly`` command, checked by walking its click tree: one home per
command, a help text and a documented example for each, ``--json`` wherever state is
read, documented exit codes, shell completion, and a docs site whose nav has every page."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("typer")
pytest.importorskip("rich")

import typer
from typer.testing import CliRunner

from onceonly_core.cli import build_app

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").rglob("*.md"))
ROOT_COMMAND = typer.main.get_command(build_app())
# Commands that run until stopped (or play a story) print no state to parse.
NO_JSON = {"serve", "worker", "dashboard", "demo", "mcp-proxy"}


# typer vendors its own click: the tree is walked by shape, not by class.
Command = Any


def walk(
    group: Command, path: tuple[str, ...] = (), *, hidden: bool = False
) -> Iterator[tuple[tuple[str, ...], Command]]:
    """(path, command) for every leaf command; hidden ones only when asked."""
    if isinstance(getattr(group, "commands", None), dict):
        for name, sub in group.commands.items():
            if sub.hidden and not hidden:
                continue
            yield from walk(sub, (*path, name), hidden=hidden)
    else:
        yield path, group


COMMANDS = list(walk(ROOT_COMMAND))
IDS = [" ".join(p) for p, _ in COMMANDS]


def _code_lines() -> str:
    """Every line of every fenced code block in the docs, for example lookup."""
    lines: list[str] = []
    for page in DOCS:
        for block in re.findall(r"```[a-z]*\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            lines += [line.strip().removeprefix("$ ") for line in block.splitlines()]
    return "\n".join(lines)


CODE = _code_lines()


def test_the_tree_has_the_commands_a_user_looks_for() -> None:
    names = set(IDS)
    assert {"doctor", "demo", "show", "migrate", "serve", "worker", "dashboard"} <= names
    assert {"keys create", "keys list", "keys revoke"} <= names
    assert len(COMMANDS) >= 35


def test_each_command_has_one_home() -> None:
    homes: dict[object, list[str]] = {}
    for path, command in COMMANDS:
        homes.setdefault(inspect.unwrap(command.callback), []).append(" ".join(path))
    twice = {k: v for k, v in homes.items() if len(v) > 1}
    assert not twice, f"visible in more than one place: {list(twice.values())}"
    assert not [i for i in IDS if i.startswith("server ")]


def test_the_old_spellings_are_hidden_aliases_of_the_homes() -> None:
    visible = dict(COMMANDS)
    hidden = {p: c for p, c in walk(ROOT_COMMAND, hidden=True) if p not in visible}
    aliases = {
        ("server", "create-key"): ("keys", "create"),
        ("server", "list-keys"): ("keys", "list"),
        ("server", "revoke-key"): ("keys", "revoke"),
        ("server", "serve"): ("serve",),
        ("server", "worker"): ("worker",),
    }
    assert set(hidden) == set(aliases)
    for old, home in aliases.items():
        assert inspect.unwrap(hidden[old].callback) is inspect.unwrap(visible[home].callback)


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_every_command_has_help_and_a_documented_example(
    path: tuple[str, ...], command: Command
) -> None:
    text = (command.help or "").strip()
    assert len(text) >= 15, f"onceonly {' '.join(path)} has no real help text"
    example = re.compile(rf"^onceonly {re.escape(' '.join(path))}(\s|$)", re.M)
    assert example.search(CODE), f"no example of `onceonly {' '.join(path)}` in docs/"
    for param in command.params:
        if param.param_type_name == "option" and not getattr(param, "hidden", False):
            assert param.help, f"onceonly {' '.join(path)} {param.opts[0]} has no help"


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_every_command_that_reads_state_takes_json(path: tuple[str, ...], command: Command) -> None:
    options = {opt for p in command.params for opt in getattr(p, "opts", [])}
    if path[0] in NO_JSON:
        return
    assert "--json" in options, f"onceonly {' '.join(path)} has no --json"


def test_exit_codes_are_documented() -> None:
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    section = page[page.index("## Exit codes") :]
    section = section[: section.index("\n## ", 1)]
    for status in ("`0`", "`1`", "`2`"):
        assert f"| {status} |" in section
    assert "nothing matched" in section.lower()


def test_shell_completion_is_offered() -> None:
    result = CliRunner().invoke(build_app(), ["--help"], prog_name="onceonly")
    assert "--install-completion" in result.output and "--show-completion" in result.output
    script = subprocess.run(
        [sys.executable, "-m", "onceonly_core.cli", "--show-completion", "bash"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert script.returncode == 0, script.stderr
    assert "_ONCEONLY_COMPLETE" in script.stdout and "complete " in script.stdout


def test_every_docs_page_is_in_the_site_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = config[config.index("\nnav:") :]
    pages = {str(p.relative_to(ROOT / "docs")) for p in DOCS}
    listed = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, re.M))
    assert pages - listed == set(), "pages missing from mkdocs.yml's nav"
    assert listed - pages == set(), "nav entries without a page"
