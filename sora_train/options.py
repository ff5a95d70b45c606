"""Option fields typed with `Literal[...]`, under OmegaConf.

A config dataclass declares each option as a `Literal` type; `check_options` rejects a value
outside it with one line that lists the choices, generated from the annotation (never a copied
list). OmegaConf 2.3 cannot type a field as a Literal, so it is given a derived schema
(`omegaconf_schema`): the same dataclasses with each Literal replaced by the type of its values.
OmegaConf still rejects unknown keys and values of the wrong type at composition, and values stay
plain str and int. `from_schema` and `to_schema` convert between the two.
"""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import field, fields, is_dataclass, make_dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints


class OptionError(ValueError):
    """A Literal-typed field holds a value outside its options."""


def check_options(section: object, section_name: str) -> None:
    """Each Literal-typed field of the dataclass `section` holds one of its options (raises
    OptionError: `{section_name}.{field} must be a, b or c, got 'x'`)."""
    hints = _type_hints(type(section))
    for f in fields(section):
        options = literal_options(hints[f.name])
        value = getattr(section, f.name)
        if options is not None and not any(type(value) is type(o) and value == o for o in options):
            raise OptionError(f"{section_name}.{f.name} must be {_spoken_list(options)}, got {value!r}")


def _spoken_list(options: tuple) -> str:
    """`a, b or c`."""
    words = [str(option) for option in options]
    return f"{', '.join(words[:-1])} or {words[-1]}" if len(words) > 1 else words[0]


def literal_options(annotation: Any) -> tuple | None:
    """The values a `Literal[...]` annotation allows (with None for `Literal[...] | None`); None when
    `annotation` is not an option type."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    members = get_args(annotation) if get_origin(annotation) in (typing.Union, types.UnionType) else ()
    literals = [m for m in members if get_origin(m) is Literal]
    if literals and len(members) == 2 and type(None) in members:
        return (*get_args(literals[0]), None)
    return None


@functools.cache
def _type_hints(config_class: type) -> dict[str, Any]:
    """The resolved field annotations of a config dataclass (cached; they never change)."""
    return get_type_hints(config_class)


@functools.cache
def omegaconf_schema(config_class: type) -> type:
    """The dataclass OmegaConf types `config_class` by: the same name, fields and defaults, with each
    Literal replaced by the type of its values (OmegaConf 2.3 takes no Literal annotation)."""
    hints = _type_hints(config_class)
    specs = []
    for f in fields(config_class):
        factory = f.default_factory
        if is_dataclass(factory):
            factory = omegaconf_schema(factory)
        specs.append(
            (f.name, _omegaconf_type(hints[f.name]), field(default=f.default, default_factory=factory))
        )
    schema = make_dataclass(config_class.__name__, specs)
    schema.__module__, schema.__doc__ = config_class.__module__, config_class.__doc__
    return schema


def _omegaconf_type(annotation: Any) -> Any:
    """`annotation` with each Literal replaced by the one type of its values and each config
    dataclass by its `omegaconf_schema`, inside lists, dicts and unions too."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        (value_type,) = {type(value) for value in args}  # an option list holds values of one type
        return value_type
    if is_dataclass(annotation):
        return omegaconf_schema(annotation)
    if origin is None or not args:
        return annotation
    plain = tuple(_omegaconf_type(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[plain]  # noqa: UP007 (a union built from a tuple of types)
    return origin[plain]


def from_schema(config_class: type, schema_object: Any) -> Any:
    """The `config_class` instance holding the values of its schema's instance `schema_object`."""
    hints = _type_hints(config_class)
    values = {}
    for f in fields(config_class):
        value = getattr(schema_object, f.name)
        if is_dataclass(hints[f.name]):
            value = from_schema(hints[f.name], value)
        values[f.name] = _yaml_boolean_option(value, literal_options(hints[f.name]))
    return config_class(**values)


def _yaml_boolean_option(value: Any, options: tuple | None) -> Any:
    """The option "true" or "false" for the "True" or "False" OmegaConf makes of a YAML boolean
    (`parallel.overlap_comm=true` on the command line) given to a string option; else `value`."""
    if options and value in ("True", "False") and value.lower() in options:
        return value.lower()
    return value


def to_schema(config: Any) -> Any:
    """The instance of `omegaconf_schema(type(config))` holding the values of the dataclass `config`."""
    values = {
        f.name: to_schema(value) if is_dataclass(value := getattr(config, f.name)) else value
        for f in fields(config)
    }
    return omegaconf_schema(type(config))(**values)


def dataclass_from_dict(config_class: type, values: dict[str, Any]) -> Any:
    """The `config_class` instance holding `values` (e.g. a config read back from JSON), with nested
    config dataclasses built from their dicts; fields absent from `values` keep their defaults, and
    a key the class does not have is an error (raises OptionError)."""
    hints = _type_hints(config_class)
    names = {f.name for f in fields(config_class)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise OptionError(f"{config_class.__name__} has no field {unknown[0]!r}")
    built = {}
    for name, value in values.items():
        nested = hints[name]
        built[name] = (
            dataclass_from_dict(nested, value) if is_dataclass(nested) and isinstance(value, dict) else value
        )
    return config_class(**built)
