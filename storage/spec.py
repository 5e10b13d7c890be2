"""Typed stage settings: one pydantic model per stage, each default written once (issue 23).

A stage's settings are a :class:`Spec` (``storage.specs``, ``translation.spec``, ``ccrk.specs``):

- unknown keys are rejected, and :meth:`Spec.parse` turns any validation error into ONE line that
  names the file, the dotted key and, for a misspelt key, the nearest valid one::

      configs/demo.yaml: build: unknown key 'shard_sise' (did you mean 'shard_size'?)
      configs/x.yaml: train.lr must be a number, not 'abc'

- every field is declared with :func:`versioned` (it changes the stage's output, so it belongs to
  the stage's version: :meth:`Spec.version_params`) or :func:`setting` (how the stage runs:
  device, threads, progress, executor, batch sizes that do not change the output...). The
  marker is ``json_schema_extra={"version": True | False}``; ``tests/test_specs.py`` checks that
  every field of every spec carries it. A nested spec field marked ``versioned`` contributes its
  own version fields only.
- booleans are strict (:data:`Bool`): ``"no"`` or ``1`` is an error, not a truthy value, and a
  bool is not accepted as a number.
- :meth:`Spec.to_config` gives the plain dict downstream code takes today (defaults filled).

Command lines are derived from a spec with :func:`add_arguments` / :func:`from_arguments`.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator
from pydantic_core import PydanticCustomError, PydanticUndefined

from storage.errors import CCRKError
from storage.languages import check_lang
from storage.layout import check_name


__all__ = ["Bool", "Device", "Lang", "Name", "Spec", "SpecError", "add_arguments", "deep_merge",
           "format_errors", "from_arguments", "nearest", "read_yaml", "setting", "versioned"]

# ---------------------------------------------------------------------------- field declarations

Bool = Annotated[bool, Strict()]
"""A strict boolean: YAML ``true``/``false`` (or Python bools) only."""


def _check_device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise PydanticCustomError("device", f"must be auto, cpu, cuda or cuda:N, not {value!r}")
    return value


Device = Annotated[str, AfterValidator(_check_device)]
"""``auto`` (every visible GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""


def _check_lang(value: str) -> str:
    try:
        return check_lang(value)
    except CCRKError as e:
        raise PydanticCustomError("path_part", str(e)) from None


def _check_name(value: str) -> str:
    try:
        return check_name(value, "")
    except CCRKError as e:
        raise PydanticCustomError("path_part", str(e)) from None


Lang = Annotated[str, AfterValidator(_check_lang)]
"""A language code (:func:`storage.languages.check_lang`: ``en``, ``zh-hans``, ``pt-br``), stored
lower case: it becomes a directory and a file name, so nothing else is taken."""

Name = Annotated[str, AfterValidator(_check_name)]
"""A plain name (:func:`storage.layout.check_name`): letters, digits, '-', '_', '.', starting with a
letter or digit -- for anything that becomes a path component under the data root."""


def _field(version: bool, default: Any, description: str, *, default_factory=None, shown: str | None = None,
           omit_none: bool = False, **kwargs) -> Any:
    extra: dict[str, Any] = {"version": version}
    if shown is not None:
        extra["shown"] = shown
    if omit_none:
        extra["omit_none"] = True
    if default_factory is not None:
        return Field(default_factory=default_factory, description=description, json_schema_extra=extra, **kwargs)
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


def versioned(default: Any = PydanticUndefined, description: str = "", **kwargs) -> Any:
    """A field that changes the stage's output (part of :meth:`Spec.version_params`).

    ``default_factory=``: for mutable defaults; ``shown=``: the default as ``--help`` prints it
    (e.g. ``"all of langs"`` for a None that means that); ``omit_none=True``: :meth:`Spec.to_config`
    leaves the key out while it is None (for consumers that test ``"key" in config``); any other
    keyword goes to :func:`pydantic.Field` (``ge``, ``le``, ``min_length``...)."""
    return _field(True, default, description, **kwargs)


def setting(default: Any = PydanticUndefined, description: str = "", **kwargs) -> Any:
    """A field that does not change the stage's output (device, threads, progress...): not versioned."""
    return _field(False, default, description, **kwargs)


def _extra(info) -> dict:
    extra = info.json_schema_extra
    return extra if isinstance(extra, dict) else {}


# ---------------------------------------------------------------------------- the base class


class SpecError(CCRKError, ValueError):
    """A spec that does not validate: one line naming the file, the key and what is wrong."""


class Spec(BaseModel):
    """Base of every stage's settings: unknown keys rejected, one-line errors, version fields marked."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value, info):
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            if _unwrap(cls.model_fields[info.field_name].annotation) in (int, float):
                raise PydanticCustomError("bool_number", "a number, not a boolean")
        return value

    # -- construction

    @classmethod
    def parse(cls, data: Mapping | None, where: str = "", section: str = "") -> Self:
        """Validate ``data`` (None: every default); on error raise :class:`SpecError`, one line.

        ``where``: the file (or other origin) the data came from, printed first; ``section``: the
        dotted place of ``data`` inside it (``"loss"``), prefixed to every key in the message."""
        if isinstance(data, cls):
            return data
        if data is None:
            data = {}
        if isinstance(data, Spec):
            data = data.to_config(defaults=False)
        if not isinstance(data, Mapping):
            raise SpecError(_join(where, f"{section or 'the settings'} must be a mapping, not {_show(data)}"))
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            raise SpecError(format_errors(cls, e, where, section)) from None

    @classmethod
    def load(cls, path: str, section: str = "") -> Self:
        """Parse a YAML file (``section``: a dotted key inside it, else the whole file)."""
        data = read_yaml(path)
        for key in [k for k in section.split(".") if k]:
            data = data.get(key) if isinstance(data, Mapping) else None
        return cls.parse(data, where=path, section=section)

    def merged(self, overrides: Mapping | None, where: str = "") -> Self:
        """A copy with ``overrides`` deep-merged over the values set so far, validated again."""
        return type(self).parse(deep_merge(self.to_config(defaults=False), overrides or {}), where=where)

    # -- views

    def to_config(self, defaults: bool = True) -> dict:
        """The plain dict consumers take (nested specs as dicts). ``defaults=False``: only the keys
        that were given (still normalised), e.g. to keep a hash of the config as it was written."""
        out = {}
        for name, info in type(self).model_fields.items():
            if not defaults and name not in self.model_fields_set:
                continue
            value = getattr(self, name)
            if value is None and _extra(info).get("omit_none"):
                continue
            out[name] = _plain(value, defaults)
        return out

    def version_params(self) -> dict:
        """The fields that change the stage's output (declared with :func:`versioned`), nested specs
        reduced to their own version fields; settings (device, threads, ...) left out."""
        out = {}
        for name, info in type(self).model_fields.items():
            if not _extra(info).get("version"):
                continue
            value = getattr(self, name)
            if value is None and _extra(info).get("omit_none"):
                continue
            out[name] = _versioned(value)
        return out

    @classmethod
    def version_fields(cls) -> list[str]:
        return [n for n, info in cls.model_fields.items() if _extra(info).get("version")]

    @classmethod
    def setting_fields(cls) -> list[str]:
        return [n for n, info in cls.model_fields.items() if not _extra(info).get("version")]


def _plain(value, defaults: bool):
    if isinstance(value, Spec):
        return value.to_config(defaults)
    if isinstance(value, Mapping):
        return {k: _plain(v, defaults) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, defaults) for v in value]
    return value


def _versioned(value):
    if isinstance(value, Spec):
        return value.version_params()
    if isinstance(value, Mapping):
        return {k: _versioned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_versioned(v) for v in value]
    return value


def deep_merge(base: Mapping, overrides: Mapping) -> dict:
    """``base`` with ``overrides`` merged in (mappings recursively, anything else replaced); copies."""
    out = copy.deepcopy(dict(base))
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: str) -> dict:
    """A YAML mapping from ``path`` (an empty file: {}); a missing or unreadable file is a CCRKError."""
    import yaml

    if not os.path.exists(path):
        raise CCRKError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise CCRKError(f"{path}: not valid YAML{line}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise CCRKError(f"{path}: expected a mapping of settings, not {_show(data)}")
    return dict(data)


# ---------------------------------------------------------------------------- one-line errors


def nearest(name: str, candidates, cutoff: float = 0.6) -> str | None:
    """The candidate closest to ``name`` (difflib; case and - vs _ ignored), or None if none is close."""
    by_key = {str(c).lower().replace("-", "_"): str(c) for c in candidates}
    match = difflib.get_close_matches(str(name).lower().replace("-", "_"), list(by_key), n=1, cutoff=cutoff)
    return by_key[match[0]] if match else None


def _join(where: str, body: str) -> str:
    return f"{where}: {body}" if where else body


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dotted(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unwrap(annotation):
    """``X | None`` / ``Optional[X]`` / ``Annotated[X, ...]`` -> X (other unions unchanged)."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _annotation_at(cls, loc):
    """The annotation at ``loc`` inside spec ``cls`` (None where the walk loses the way)."""
    ann = cls
    for part in loc:
        ann = _unwrap(ann)
        origin = typing.get_origin(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel) and isinstance(part, str):
            info = ann.model_fields.get(part)
            if info is None:
                return None
            ann = info.annotation
        elif origin in (list, tuple) and isinstance(part, int):
            ann = typing.get_args(ann)[0]
        elif origin in (dict, Mapping) and typing.get_args(ann):
            ann = typing.get_args(ann)[1]
        else:
            return None
    return ann


_NOUNS = {"float_type": "a number", "float_parsing": "a number", "int_type": "a whole number",
          "int_parsing": "a whole number", "int_from_float": "a whole number", "bool_type": "true or false",
          "bool_parsing": "true or false", "string_type": "text", "list_type": "a list", "tuple_type": "a list",
          "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
          "bool_number": "a number"}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_BOUND_KEYS = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}


def _describe(cls, err: dict, section: str) -> str:
    loc = tuple(err.get("loc", ()))
    if loc and loc[-1] == "[key]":  # a mapping's key: name the key's place, check against the key type
        loc = loc[:-1]
        mapping = _unwrap(_annotation_at(cls, loc[:-1]))
        args = typing.get_args(mapping)
        if args and typing.get_origin(_unwrap(args[0])) is Literal:
            allowed = ", ".join(str(c) for c in typing.get_args(_unwrap(args[0])))
            return f"{_dotted(tuple(k for k in section.split('.') if k) + loc[:-1])}: unknown key " \
                   f"{_show(loc[-1])}; use one of {allowed}"
    full = tuple(k for k in section.split(".") if k) + loc
    kind, value, ctx = err.get("type"), err.get("input"), err.get("ctx") or {}
    if kind == "extra_forbidden":
        parent, key = _dotted(full[:-1]), loc[-1]
        model = _unwrap(_annotation_at(cls, loc[:-1]))
        known = list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []
        guess = nearest(key, known)
        hint = f" (did you mean '{guess}'?)" if guess else (f"; known keys: {', '.join(known)}" if known else "")
        return _join(parent, f"unknown key '{key}'{hint}")
    name = _dotted(full) or "the settings"
    if kind == "missing":
        return f"{name} is required"
    if kind == "literal_error":
        choices = typing.get_args(_unwrap(_annotation_at(cls, loc)) or ())
        allowed = ", ".join(str(c) for c in choices) if choices else ctx.get("expected", "")
        return f"{name} must be one of {allowed}, not {_show(value)}"
    if kind == "bool_number" and _unwrap(_annotation_at(cls, loc)) is int:
        kind = "int_type"
    if kind in _NOUNS:
        return f"{name} must be {_NOUNS[kind]}, not {_show(value)}"
    if kind in _BOUNDS:
        return f"{name} is out of range: must be {_BOUNDS[kind]} {ctx.get(_BOUND_KEYS[kind])}, not {_show(value)}"
    if kind in ("too_short", "too_long"):
        bound = ("at least", ctx.get("min_length")) if kind == "too_short" else ("at most", ctx.get("max_length"))
        return f"{name} must have {bound[0]} {bound[1]} item(s), not {_show(value)}"
    if kind == "device":
        return f"{name} {err['msg']}"
    if kind == "path_part":
        return f"{name}: {err['msg']}"
    if kind in ("value_error", "assertion_error"):
        message = str(ctx.get("error", err.get("msg", "")))
        return f"{name}: {message}" if loc or section else message
    return f"{name}: {err.get('msg', kind)}, not {_show(value)}"


def format_errors(cls, error: ValidationError, where: str = "", section: str = "") -> str:
    """The first error of ``error`` as one line (``(and N more)`` when there are several)."""
    errors = error.errors(include_url=False)
    first, used = errors[0], 1
    line = _describe(cls, first, section)
    if first.get("type") == "missing":  # every missing key of the same section in one sentence
        parent = tuple(first["loc"][:-1])
        keys = [str(e["loc"][-1]) for e in errors if e.get("type") == "missing" and tuple(e["loc"][:-1]) == parent]
        if len(keys) > 1:
            used = len(keys)
            line = _join(_dotted(tuple(k for k in section.split(".") if k) + parent),
                         f"{', '.join(keys[:-1])} and {keys[-1]} are required")
    line = line.replace("\n", " ")
    if len(errors) > used:
        line += f" (and {len(errors) - used} more)"
    return _join(where, line)


# ---------------------------------------------------------------------------- command lines


def _cli_form(annotation):
    """(kind, item) of a field's command-line form: kind one of bool, int, float, str, literal, list;
    None when it has none (nested specs, mappings)."""
    ann = _unwrap(annotation)
    origin = typing.get_origin(ann)
    if ann in (bool, int, float, str):
        return ann, None
    if origin is Literal:
        return "literal", typing.get_args(ann)
    if origin in (list, tuple):
        item = _unwrap(typing.get_args(ann)[0]) if typing.get_args(ann) else str
        if item in (int, float, str) or typing.get_origin(item) is Literal:
            return "list", item
    return None, None


def _csv(item):
    convert = type(typing.get_args(item)[0]) if typing.get_origin(item) is Literal else item

    def parse(text: str) -> list:
        try:
            return [convert(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {convert.__name__} values, got {text!r}")

    parse.__name__ = f"comma-separated {convert.__name__}"
    return parse


def _shown_default(info) -> str | None:
    extra = _extra(info)
    if "shown" in extra:
        return extra["shown"]
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return None
    else:
        value = info.default
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def add_arguments(parser, spec_cls: type[Spec], fields=None, exclude=(), flags: Mapping | None = None) -> list[str]:
    """Add a ``--field-name`` option per field of ``spec_cls`` (``dest`` = the field name,
    ``default=None`` so that the spec's default applies); returns the field names added.

    Types come from the annotation: int / float / str; bool as ``--x / --no-x``
    (``argparse.BooleanOptionalAction``); ``Literal`` as choices; ``list[...]`` comma-separated.
    Help: the field's description and ``(default: X)``. ``fields``: these fields only (in this
    order; one without a command-line form is an error); else every field that has one (nested
    specs and mappings are skipped). ``exclude``: fields to leave out. ``flags``: option strings
    for some fields instead of ``--field-name`` (``{"thread_count": "--threads"}`` or a list)."""
    flags = dict(flags or {})
    names = list(fields) if fields is not None else list(spec_cls.model_fields)
    added = []
    for name in names:
        if name in exclude:
            continue
        info = spec_cls.model_fields.get(name)
        if info is None:
            raise ValueError(f"{spec_cls.__name__} has no field {name!r}")
        kind, item = _cli_form(info.annotation)
        if kind is None:
            if fields is not None:
                raise TypeError(f"{spec_cls.__name__}.{name} ({info.annotation}) has no command-line form")
            continue
        option = flags.get(name) or "--" + name.replace("_", "-")
        options = [option] if isinstance(option, str) else list(option)
        text = (info.description or "").replace("%", "%%")
        shown = _shown_default(info)
        if shown is not None:
            text = f"{text} (default: {shown.replace('%', '%%')})".strip()
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": text or None}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind == "literal":
            kwargs.update(choices=list(item), type=type(item[0]))
        elif kind == "list":
            kwargs.update(type=_csv(item), metavar="A,B,...")
        else:
            kwargs["type"] = kind
        parser.add_argument(*options, **kwargs)
        added.append(name)
    return added


def from_arguments(spec_cls: type[Spec], args, base: Mapping | Spec | None = None, fields=None,
                   where: str = "") -> Spec:
    """The spec from the options that were given (not None) over ``base`` (a dict, e.g. a config
    section, or a spec); ``fields``: read only these (default: every field of the spec).
    ``args``: an ``argparse.Namespace`` or a mapping."""
    data = base.to_config(defaults=False) if isinstance(base, Spec) else copy.deepcopy(dict(base or {}))
    values = args if isinstance(args, Mapping) else vars(args)
    for name in (fields if fields is not None else spec_cls.model_fields):
        value = values.get(name)
        if value is not None:
            data[name] = value
    return spec_cls.parse(data, where=where)
