"""`python -m rlloop.config_docs [--check]`: write docs/config.md, the config reference, from the schema.

Every key of every command's structured config (rlloop/config.py and the commands' own dataclasses) with
its type, its default and its description. The description is the field's comment in the source: the
comment lines right above it and the comment at the end of its line. Defaults are what the command runs
with when given no overrides (the schema's default merged with the command's YAML in conf/), with the
schema's own value beside it where a preset changes it. `--check` exits 1 when docs/config.md is stale
(tests/test_config_docs.py runs it).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"

# (heading, "module:Schema", config name in conf/ or None, its commands)
COMMANDS = [
    ("Training", "rlloop.config:Config", "config", "`rlloop train`, `rlloop eval`, `rlloop check-data`, `rlloop verify-reward`, `rlloop sft`"),
    ("PRM training", "rlloop.prm_train:PRMTrainConfig", "prm_train", "`rlloop prm-train`"),
    ("Q-RM training", "rlloop.qrm_train:QRMTrainConfig", "qrm_train", "`rlloop qrm-train`"),
    ("Q-RM pairs", "rlloop.qrm_pairs:QRMPairsConfig", None, "`rlloop qrm-pairs`"),
    ("Search", "rlloop.search.cli:SearchConfig", "search", "`rlloop search`"),
    ("Rollouts", "rlloop.rollout.__main__:RolloutCLIConfig", "rollout_cli", "`rlloop rollout`"),
]  # fmt: skip
# An end-of-line comment ending like this goes on over the comment lines below it.
_CONTINUES = re.compile(r"([+,(;:]|\b(and|or|the|a|an|of|to|by|with|for|in|when|than|from))$")


def _field_comments(cls: type) -> dict[str, str]:
    """field name -> its comment text (the lines above it, then its end-of-line comment)."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}  # line (1-based within `source`) -> comment text
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    body = ast.parse(textwrap.dedent(source)).body[0].body
    fields = [(n.target.id, n.lineno) for n in body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    out: dict[str, str] = {}
    carried: list[str] = []  # comment lines continuing the previous field's end-of-line comment
    for i, (name, line) in enumerate(fields):
        above = []
        j = line - 1
        while j in comments and j not in code_lines:
            above.insert(0, comments[j])
            j -= 1
        if carried:  # the first lines of `above` belong to the field before
            out[fields[i - 1][0]] += " " + " ".join(above[: len(carried)])
            above = above[len(carried) :]
        inline = comments.get(line, "") if line in code_lines else ""
        out[name] = " — ".join(part for part in (" ".join(above), inline) if part)
        carried = []
        if inline and _CONTINUES.search(inline):
            nxt = line + 1
            while nxt in comments and nxt not in code_lines:
                carried.append(comments[nxt])
                nxt += 1
    return out


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return " \\| ".join(_type_name(a) for a in rest) + " \\| null"
    if origin in (list, typing.List):
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin in (dict, typing.Dict):
        return "dict"
    if hint is Any:
        return "any"
    return getattr(hint, "__name__", str(hint))


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value) if (value == "" or value.strip() != value or "\n" in value) else value
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o))
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _load(target: str) -> type:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _composed_defaults(config_name: str | None, schema: type) -> dict:
    """The command's config with no overrides: its YAML in conf/ over the schema (the schema alone when
    the command has no YAML of its own). Interpolations stay as written (`${...}`)."""
    from omegaconf import OmegaConf

    if config_name is None:
        return OmegaConf.to_container(OmegaConf.structured(schema), resolve=False)
    from hydra import compose, initialize_config_dir

    from rlloop.confdir import conf_dir

    register = getattr(sys.modules[schema.__module__], "register_configs", None)  # schemas stored on demand
    if register is not None:
        register()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose(config_name=config_name)
    return OmegaConf.to_container(cfg, resolve=False)


def _rows(schema: type, composed: dict, prefix: str) -> list[str]:
    hints = typing.get_type_hints(schema, vars(sys.modules[schema.__module__]))
    comments = _field_comments(schema)
    rows, nested = [], []
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            nested.append((f, hint, key))
            continue
        schema_default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        value = composed.get(f.name, schema_default) if isinstance(composed, dict) else schema_default
        default = f"`{_cell(_yaml(value))}`" if value != "???" else "**required**"
        if _yaml(value) != _yaml(schema_default):
            default += f" (schema: `{_cell(_yaml(schema_default))}`)"
        rows.append(f"| `{key}` | {_type_name(hint)} | {default} | {_cell(comments.get(f.name, ''))} |")
    out = []
    if rows:
        title = f"`{prefix.rstrip('.')}`" if prefix else "top level"
        doc = inspect.getdoc(schema) or ""
        intro = "" if doc.startswith(f"{schema.__name__}(") else f"{' '.join(doc.split())}\n\n"
        out += [f"#### {title}", "", intro + "| key | type | default | description |", "|---|---|---|---|", *rows, ""]
    # a section shared by several commands (task, model, ...) is listed in each: their presets differ
    for f, hint, key in nested:
        out += _rows(hint, composed.get(f.name, {}) if isinstance(composed, dict) else {}, f"{key}.")
    return out


def _presets() -> list[str]:
    from rlloop.confdir import conf_dir

    out = ["| group | presets (`group=name`) |", "|---|---|"]
    for group in sorted(p for p in Path(conf_dir()).iterdir() if p.is_dir()):
        out.append(f"| `{group.name}` | {', '.join(f'`{p.stem}`' for p in sorted(group.glob('*.yaml')))} |")
    return out


def render() -> str:
    lines = [
        "# Config reference",
        "",
        "<!-- Generated by `python -m rlloop.config_docs` from the structured configs; do not edit by hand. -->",
        "",
        "Every key each command takes as a Hydra override (`rlloop train trainer.total_steps=5`), with its type,",
        "the default it runs with when given no overrides, and what it does. A preset from a group",
        "(`model=tiny`, `reward=tdrm`, ...) sets several keys at once; `rlloop train --cfg job` prints the",
        "composed config of any command line. A key that is not in the schema, or a value of the wrong",
        "type, stops the command before anything starts, naming the key.",
        "",
        "## Presets (conf/)",
        "",
        *_presets(),
        "",
    ]
    from rlloop.config import register_configs

    register_configs()
    for heading, target, config_name, commands in COMMANDS:
        schema = _load(target)
        lines += [f"## {heading}: {commands}", ""]
        lines += _rows(schema, _composed_defaults(config_name, schema), "")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlloop.config_docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/config.md is not up to date")
    parser.add_argument("--out", default=str(DOC), help=f"where to write (default {DOC})")
    args = parser.parse_args(argv)
    text = render()
    out = Path(args.out)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            print(f"{out} is out of date: run `python -m rlloop.config_docs`", file=sys.stderr)
            sys.exit(1)
        return
    out.write_text(text)
    print(out)


if __name__ == "__main__":
    main()
