"""What every settings dataclass shares (`Settings`: a round trip through plain dicts, as reports are
written and read) and `RunSettings`, where and how a run loads its model and writes its outputs."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from lunar_lens.core.errors import LunarError

S = typing.TypeVar("S", bound="Settings")


class Settings:
    """A mixin for settings dataclasses: `to_dict` gives JSON-ready values (nested settings as dicts),
    `from_dict` builds the settings back from them, refusing a key it does not know."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[S], values: Mapping) -> S:
        known = {field.name for field in fields(cls)}
        unknown = next((key for key in values if key not in known), None)
        if unknown is not None:
            raise LunarError(f"unknown {cls.__name__} setting {unknown!r}: use only {', '.join(sorted(known))}")
        kinds = typing.get_type_hints(cls)
        return cls(**{name: _value_of(kinds[name], value) for name, value in values.items()})


def _value_of(kind: object, value: object) -> object:
    """`value` as `kind` holds it: nested settings from their dict, tuples from JSON lists."""
    if isinstance(kind, type) and issubclass(kind, Settings) and isinstance(value, Mapping):
        return kind.from_dict(value)
    if typing.get_origin(kind) is tuple and isinstance(value, list):
        return tuple(value)
    return value


@dataclass
class RunSettings(Settings):
    """Where the model runs and how outputs are written: `device`, `dtype` and `device_map` as
    `lunar_lens.model.load_model` takes them, `force` replaces an earlier lunar-lens output, `progress`
    shows bars and a line per stage (`lunar_lens.core.progress`)."""

    device: str = "cpu"
    dtype: str = "float32"
    device_map: str | dict | None = None
    force: bool = False
    progress: bool = True

    def load_options(self) -> dict:
        """The keyword arguments of `load_model` these settings give."""
        return {"device": self.device, "dtype": self.dtype, "device_map": self.device_map, "progress": self.progress}
