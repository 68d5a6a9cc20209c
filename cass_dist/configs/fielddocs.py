"""What each config field means, for ``--help``: read from the ``# comment`` beside it in the source.

The config dataclasses already explain their fields in comments (``batch_size: int = 32  # per
process``); the flag help reads them there rather than from a second copy that would drift. A field's
trailing comment wins; without one, the block of ``#`` lines directly above it is used. Every flag
also shows its type and default, so a field nobody commented still says what it takes.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal


def field_comments(cls: type) -> dict[str, str]:
    """Return ``{field name: explanation}`` of a dataclass's fields (inherited ones too) from its source.

    Fields without a comment are absent; a class whose source is unavailable gives ``{}``.
    """
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_own_comments(klass))
    return out


def _own_comments(klass: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(klass))
        tree = ast.parse(source)
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):  # built in a REPL, or odd source
        return {}
    trailing: dict[int, str] = {}  # row -> comment after code on that row
    alone: dict[int, tuple[int, str]] = {}  # row -> (column, comment) on a line of its own
    code_rows: set[int] = set()
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if tok.start[0] in code_rows:
                trailing[tok.start[0]] = text
            else:
                alone[tok.start[0]] = (tok.start[1], text)
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_rows.update(range(tok.start[0], tok.end[0] + 1))
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    out = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        rows = range(node.lineno, (node.end_lineno or node.lineno) + 1)
        after = [trailing[r] for r in rows if r in trailing]
        above, row = [], node.lineno - 1
        while row in alone and alone[row][0] == node.col_offset:
            above.insert(0, alone[row][1])
            row -= 1
        text = " ".join(after) or " ".join(above)
        if text:
            out[node.target.id] = text
    return out


def type_text(tp: Any) -> str:
    """Return how a flag of type ``tp`` is written (``one of a|b``, ``int or null``, ``YAML list`` ...)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_text(a) for a in args)
    if tp is bool:
        return "true|false; the flag alone means true"
    if origin in (list, tuple) or tp in (list, tuple):
        return "YAML list, e.g. [1, 2]"
    if origin is dict or tp is dict:
        return "YAML mapping, e.g. {key: 1}"
    return {int: "int", float: "number", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


def show_default(value: Any) -> str:
    """Return ``value`` as it would be written on the command line (JSON is valid YAML)."""
    try:
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    except TypeError:
        return repr(value)


def flag_help(meaning: str, tp: Any, default: Any) -> str:
    """Return the argparse help of one field: its meaning, then type and default (``%`` escaped)."""
    text = f"{meaning} [{type_text(tp)}; default {show_default(default)}]" if meaning else \
        f"[{type_text(tp)}; default {show_default(default)}]"
    return text.replace("%", "%%")
