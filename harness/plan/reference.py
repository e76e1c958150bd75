"""The plan reference, docs/PLAN.md, generated from the schema: every block a plan can hold, and
each of its fields with its type in words, its default and the docstring written under it in
harness/plan/*.py. Every field is documented there, once; this only lays the docstrings out.

    python -m harness.plan.reference > docs/PLAN.md

tests/test_docs.py fails while docs/PLAN.md differs from what this prints, and while a field has
no docstring. Reads the schema only: no torch, no plan file.
"""
from __future__ import annotations

import ast
import inspect
import json
import re
import textwrap
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel
from pydantic.fields import FieldInfo

from harness.plan.fields import Strict
from harness.plan.phases import Plan, StageOverride, StageSettings
from harness.plan.training import TrainSettings

REGENERATE = "python -m harness.plan.reference > docs/PLAN.md"

# A multistep stage is given in override form (every field optional, merged over its phase); it is
# documented as the settings it overrides.
SHOWN_AS = {StageOverride: StageSettings}
# Blocks a plan holds outside the schema: load.parse_plan merges `defaults:` under every phase first.
OUTSIDE_THE_SCHEMA = {"defaults": TrainSettings}
WORDS = {int: "integer", float: "number", str: "text", bool: "true or false", Any: "anything"}
# Field(ge=1, lt=2, min_length=1, pattern=...) lands in FieldInfo.metadata as objects with these attributes.
BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def blocks(root: type[BaseModel] = Plan) -> dict[type[BaseModel], list[str]]:
    """Every block reachable from the plan, in the order first met, with each place in a plan it
    appears at ('phases[].optimizer'). A block that extends another (a phase is training settings
    plus its kind and data) lists its own fields; the block it extends is a block of its own."""
    found: dict[type[BaseModel], list[str]] = {}

    def visit(model: type[BaseModel], path: str) -> None:
        model = SHOWN_AS.get(model, model)
        found.setdefault(model, []).append(path)
        for base in extended(model):
            visit(base, path)
        for name in own_fields(model):
            for nested, suffix in nested_blocks(model.model_fields[name].annotation):
                visit(nested, f"{path}.{name}{suffix}" if path else f"{name}{suffix}")

    visit(root, "")
    if root is Plan:
        for path, model in OUTSIDE_THE_SCHEMA.items():
            visit(model, path)
    return found


def extended(model: type[BaseModel]) -> list[type[BaseModel]]:
    """The schema blocks a block extends (its base classes other than Strict)."""
    return [base for base in model.__bases__ if issubclass(base, Strict) and base is not Strict]


def own_fields(model: type[BaseModel]) -> list[str]:
    """The fields a block declares itself, not those of the blocks it extends, in their order."""
    inherited = {name for base in extended(model) for name in base.model_fields}
    return [name for name in model.model_fields if name not in inherited]


def nested_blocks(annotation: Any, suffix: str = "") -> list[tuple[type[BaseModel], str]]:
    """The blocks inside a field's type, each with what its path adds ('[]' for a list item)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, suffix)]
    inner = "[]" if get_origin(annotation) is list else ""
    return [found for arg in get_args(annotation) for found in nested_blocks(arg, suffix + inner)]


def field_docs(model: type[BaseModel]) -> dict[str, str]:
    """The docstring under each field the class body declares: the string right after the field's
    annotated assignment (PEP 257's attribute docstrings, which Python itself keeps nowhere)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(model))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def undocumented(root: type[BaseModel] = Plan) -> list[str]:
    """'Block.field' for every field without a docstring; the reference needs none of these."""
    return [f"{model.__name__}.{name}" for model in blocks(root) for name in own_fields(model) if name not in field_docs(model)]


def words(annotation: Any) -> str:
    """A field type as a reader says it: 'list of integer', 'one of `auto`, `off`'."""
    origin, args = get_origin(annotation), get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return link(SHOWN_AS.get(annotation, annotation))
    if origin is Literal:
        return ("one of " if len(args) > 1 else "") + ", ".join(f"`{value}`" for value in args)
    if origin in (Union, UnionType):
        return " or ".join(words(arg) for arg in args if arg is not NoneType)
    if origin is Annotated:
        return validated_text(args[1:]) or words(args[0])
    if origin is list:
        return f"list of {words(args[0])}"
    if origin is tuple:
        return f"[{', '.join(words(arg) for arg in args)}]"
    if origin is dict:
        return "mapping" if args[1] is Any else f"mapping of {words(args[0])} to {words(args[1])}"
    return WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def link(model: type[BaseModel]) -> str:
    """A link to the block's section of the reference (GitHub's anchor of its heading)."""
    return f"[{model.__name__}](#{model.__name__.lower()})"


def validated_text(metadata: tuple | list) -> str:
    """What an injection-safe text type of fields.py allows, in the words its error message starts
    with ('one shell word'): fields._text closes over that message as `allowed`."""
    for item in metadata:
        if isinstance(item, AfterValidator) and inspect.isfunction(item.func):
            allowed = inspect.getclosurevars(item.func).nonlocals.get("allowed")
            if isinstance(allowed, str):
                return allowed.split(": ")[0]
    return ""


def field_type(field: FieldInfo) -> str:
    """The field's type in words with its bounds: 'integer >= 1', 'text matching `^...$`'."""
    text = validated_text(field.metadata) or words(field.annotation)
    signs = [f"{sign} {value}" for item in field.metadata for bound, sign in BOUNDS.items() if (value := getattr(item, bound, None)) is not None]
    if signs:
        text += " " + " and ".join(signs)
    for item in field.metadata:
        if getattr(item, "min_length", None) is not None:
            text += f", at least {item.min_length}"
        if getattr(item, "pattern", None) is not None:
            text += f" matching `{item.pattern}`"
    return text


def default(field: FieldInfo) -> str:
    """'required', 'unset', or the default as a plan would spell it: 'default `auto`'."""
    if field.is_required():
        return "required"
    if field.default is None:
        return "unset"
    if isinstance(field.default, BaseModel):
        return "its fields' defaults"
    value = field.default if isinstance(field.default, str) else json.dumps(field.default)
    return f"default `{value}`"


def prose(text: str) -> str:
    """A docstring as one Markdown line: its lines joined, and outside `code` the characters
    Markdown would read as markup (<tag>, *emphasis*) escaped."""
    parts = " ".join(text.split()).split("`")
    return "`".join(re.sub(r"([<*])", r"\\\1", part) if i % 2 == 0 else part for i, part in enumerate(parts))


def place(path: str) -> str:
    """Where a block sits in a plan, as the reference says it."""
    return f"`{path}`" if path else "the top level of the plan file"


def render(root: type[BaseModel] = Plan) -> str:
    """The text of docs/PLAN.md."""
    found = blocks(root)
    lines = [
        "# Plan reference",
        "",
        "Generated from the docstrings of the plan schema (`harness/plan/*.py`): do not edit this file;",
        "edit the docstring under a field, then regenerate it with",
        "",
        f"    {REGENERATE}",
        "",
        "(`tests/test_docs.py` fails while this file is stale or a field has no docstring.)",
        "A whole plan is shown in the [README](../README.md#the-plan); a plan that breaks a rule below is",
        "refused before anything is written, each problem with its field, value and what is allowed.",
        "",
        "Blocks: " + ", ".join(link(model) for model in found) + ".",
    ]
    for model, paths in found.items():
        lines += ["", f"## {model.__name__}", "", "In a plan: " + ", ".join(place(path) for path in dict.fromkeys(paths)) + ".", ""]
        lines.append(prose(inspect.cleandoc(model.__doc__ or "")))
        if extended(model):
            lines += ["", f"Besides every field of {', '.join(link(base) for base in extended(model))}:"]
        lines.append("")
        docs = field_docs(model)
        for name in own_fields(model):
            field = model.model_fields[name]
            lines.append(f"- `{name}`: {field_type(field)}; {default(field)}.")
            lines.append(f"  {prose(docs.get(name, '(no docstring)'))}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
