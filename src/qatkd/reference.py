"""The configuration reference, read from the pydantic models themselves: `qatkd <command> --help`
and the documentation's configuration page both render it, so neither can drift from the code."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from qatkd.balance.config import BALANCERS
from qatkd.config import (
    FAMILY_CONFIGS,
    Config,
    _section_type,
    build_config,
    config_to_dict,
    dotted,
)
from qatkd.quant import QUANTIZERS, QuantConfig
from qatkd.registry import Registry

REGISTRY_CHOICES: dict[str, Registry[Any]] = {
    "quant.method": QUANTIZERS,
    "quant.weight_method": QUANTIZERS,
    "quant.act_method": QUANTIZERS,
    "balancer.name": BALANCERS,
}
"""Keys whose values a registry validates: their choices are the registry's names, so a method
registered by a plug-in appears in the reference too."""

_BOUNDS = {
    annotated_types.Gt: (">", "gt"),
    annotated_types.Ge: ("≥", "ge"),
    annotated_types.Lt: ("<", "lt"),
    annotated_types.Le: ("≤", "le"),
}
"""pydantic's numeric constraints: how the reference writes each, and the attribute holding it."""


@dataclass(frozen=True)
class KeyDoc:
    """One configuration key as the reference shows it."""

    key: str
    type: str
    default: Any
    allowed: str
    description: str


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "str"
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _allowed(key: str, info: FieldInfo) -> str:
    if key in REGISTRY_CHOICES:
        return ", ".join(REGISTRY_CHOICES[key].names())
    for arg in (info.annotation, *typing.get_args(info.annotation)):
        if typing.get_origin(arg) is Literal:
            return ", ".join(str(choice) for choice in typing.get_args(arg))
    return ", ".join(
        f"{_BOUNDS[type(m)][0]} {getattr(m, _BOUNDS[type(m)][1])}"
        for m in info.metadata
        if type(m) in _BOUNDS
    )


def _description(model: type[BaseModel], name: str) -> str:
    """A field's help text; a family's subclass that narrows a field (`task`, `data.name`)
    without its own text inherits its base's."""
    for cls in model.__mro__:
        fields = getattr(cls, "model_fields", {})
        if name in fields and fields[name].description:
            return fields[name].description
    return ""


def section_keys(
    model: type[BaseModel], values: dict[str, Any] | None, prefix: str = ""
) -> list[KeyDoc]:
    """The keys of a section, with their defaults taken from `values` (a resolved config's
    section), or from the section's own defaults where the section is null (`quant`)."""
    if values is None:
        values = model().model_dump(mode="json")
    docs: list[KeyDoc] = []
    for name, info in model.model_fields.items():
        key = prefix + name
        section = _section_type(info.annotation)
        if section is not None:
            if info.default is None:  # an optional section: the key itself turns it on
                docs.append(KeyDoc(key, "section or null", None, "", _description(model, name)))
            docs += section_keys(section, values.get(name), f"{key}.")
            continue
        docs.append(
            KeyDoc(
                key,
                _type_name(info.annotation),
                values.get(name),
                _allowed(key, info),
                _description(model, name),
            )
        )
    return docs


def family_keys(task: str) -> list[KeyDoc]:
    """Every key of a task family's runs, with that family's defaults (its `quant.*` defaults
    where a config quantizes)."""
    config = build_config({"task": task})
    values = config_to_dict(config)
    quant = QuantConfig().model_dump(mode="json")
    values["quant"] = {**quant, **FAMILY_CONFIGS[task].quant}
    return section_keys(type(config), values)


def fine_tune_defaults(task: str) -> dict[str, Any]:
    """The keys whose default changes when a run starts from a trained model (`model.init`)."""
    plain = dotted(config_to_dict(build_config({"task": task})))
    tuned = dotted(config_to_dict(build_config({"task": task, "model": {"init": "model.pt"}})))
    return {k: v for k, v in tuned.items() if k != "model.init" and plain.get(k) != v}


def _value(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def help_lines() -> list[str]:
    """`key = default  description` lines for `--help`: the keys of every run, then per task
    family the keys it adds or whose default it changes (described once, where first shown)."""

    def line(doc: KeyDoc, described: bool) -> str:
        text = f"  {doc.key} = {_value(doc.default)}"
        return f"{text}  {doc.description}" if described and doc.description else text

    common = section_keys(Config, None)
    lines = [line(d, True) for d in common]
    defaults = {d.key: _value(d.default) for d in common}
    for task in sorted(FAMILY_CONFIGS):
        lines.append(f"task={task}:")
        for d in family_keys(task):
            if d.key == "data.name" or (
                d.key != "task" and defaults.get(d.key) != _value(d.default)
            ):
                lines.append(line(d, d.key not in defaults or d.key == "data.name"))
        tuned = fine_tune_defaults(task)
        if tuned:
            pairs = ", ".join(f"{k}={_value(v)}" for k, v in tuned.items())
            lines.append(f"  with model.init: {pairs}")
    return lines


def _cell(text: str) -> str:
    """Text for a markdown table cell: pipes escaped, and `<name>` shown, not read as HTML."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def markdown() -> str:
    """The documentation's configuration reference: one table per task family (every key, its
    type, default, allowed values and meaning) and the fine-tuning defaults."""
    out: list[str] = []
    for task in sorted(FAMILY_CONFIGS):
        out += [
            f"## `task: {task}`",
            "",
            "| key | type | default | allowed | meaning |",
            "|---|---|---|---|---|",
        ]
        for d in family_keys(task):
            default = _value(d.default).replace("|", "\\|")
            out.append(
                f"| `{d.key}` | {_cell(d.type)} | `{default}` | "
                f"{_cell(d.allowed)} | {_cell(d.description)} |"
            )
        tuned = fine_tune_defaults(task)
        if tuned:
            out += [
                "",
                "Starting from a trained model (`model.init` set: QAT, distillation, PTQ), these "
                "defaults change unless the configuration gives them: "
                + ", ".join(f"`{k}={_value(v)}`" for k, v in tuned.items())
                + ".",
            ]
        out.append("")
    return "\n".join(out)
