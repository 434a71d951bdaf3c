"""The machinery under the audit's typed settings (:mod:`guard.audit.settings`): the model cost
the defaults scale with, a field that carries its ``options.extra`` key and its one-line doc,
and the type checks every key goes through.

Modelled on scikit-learn's ``_parameter_constraints`` (checked when the settings are resolved,
not when the object is built) and on ``guard.training.HardenConfig`` (a frozen dataclass with
``quick()``, ``validated()`` and ``to_dict()``).
"""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["Cost", "StepSettings", "setting", "check_value"]


@dataclass(frozen=True)
class Cost:
    """What the steps' defaults are derived from (:mod:`guard.core.budget`; ``report["defaults"]``).

    Attributes:
        work_scale: the model's cost per image relative to the demo LeNet's, at most 1
            (:func:`guard.core.budget.work_scale`); every size set on the LeNet is multiplied by it.
        n_test: the number of held-out images.
        repetitions: ``AuditOptions.repetitions`` (the patch curves' random draws).
        eps: the L-inf budget of the data (0.3 on near-binary digits, 8/255 on natural images),
            or ``options.extra["eps"]`` when given.
        feature_delta: the feature adversaries' budget of the data.
        feature_deltas: the feature-adversary curves' budgets of the data.
    """

    work_scale: float = 1.0
    n_test: int = 0
    repetitions: int = 10
    eps: float = 0.3
    feature_delta: float = 0.3
    feature_deltas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)

    @classmethod
    def from_defaults(cls, defaults: Mapping[str, Any], *, n_test: int, repetitions: int) -> Cost:
        """From the audit's ``ctx.defaults`` (the same fall-backs the steps always used)."""
        return cls(
            work_scale=float(defaults.get("work_scale", 1.0)),
            n_test=int(n_test),
            repetitions=int(repetitions),
            eps=float(defaults.get("eps", 0.3)),
            feature_delta=float(defaults.get("feature_delta", 0.3)),
            feature_deltas=tuple(float(d) for d in defaults.get("feature_deltas", (0.05, 0.1, 0.2, 0.3))),
        )

    def scaled(self, reference: int, minimum: int = 1) -> int:
        """A size set on the demo LeNet, scaled to this model's cost: ``max(minimum, round(reference x work_scale))``."""
        return max(minimum, int(round(reference * float(self.work_scale))))

    @property
    def big(self) -> bool:
        """A model at least twice the LeNet's cost per image: the steps bound their batches for memory."""
        return self.work_scale < 0.5


def setting(default: Any, doc: str, key: str | None = None) -> Any:
    """A settings field: its default, its one-line doc and its ``options.extra`` key (default: prefix + name)."""
    meta = {"doc": doc, "key": key}
    if isinstance(default, (list, dict)):
        raise TypeError("settings defaults are immutable: use a tuple, or None and derive it in finalized().")
    return dataclasses.field(default=default, metadata=meta)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a dict"
    return getattr(hint, "__name__", str(hint))


def check_value(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the type hint ``hint`` (and converted: a list to a tuple, an int
    to a float where a float is wanted); TypeError naming ``key``, what was expected and what came."""
    ok, out = _convert(value, hint)
    if not ok:
        raise TypeError(f"options.extra[{key!r}] must be {_type_name(hint)}; got {type(value).__name__} ({value!r}).")
    return out


def _convert(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, None
    if origin in (typing.Union, types.UnionType):
        for h in typing.get_args(hint):
            ok, out = _convert(value, h)
            if ok:
                return True, out
        return False, None
    if origin is tuple:
        if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
            return False, None
        inner = typing.get_args(hint)[0]
        items = [_convert(v, inner) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if origin is dict:
        return isinstance(value, Mapping) and all(isinstance(k, str) for k in value), dict(value) if isinstance(
            value, Mapping
        ) else None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool), int(value) if isinstance(
            value, numbers.Integral
        ) else None
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool), float(value) if isinstance(
            value, numbers.Real
        ) else None
    if hint is str:
        return isinstance(value, str), value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return True, value
        if isinstance(value, Mapping):
            try:
                return True, hint(**value)
            except TypeError:
                return False, None
        return False, None
    return isinstance(value, hint), value


class StepSettings:
    """Base of one step's frozen settings dataclass.

    A subclass sets ``step`` (the audit step's name) and ``prefix`` (of its ``options.extra``
    keys; a field's key is ``prefix + name`` unless the field names its own) and writes
    :meth:`full` (the defaults at this model's cost: every scaling by model cost is there) and
    :meth:`quick` (the smoke-run defaults); :meth:`finalized` fills what derives from other
    fields once the caller's keys are in.
    """

    step: ClassVar[str]
    prefix: ClassVar[str] = ""

    @classmethod
    def full(cls, cost: Cost) -> StepSettings:
        return cls()

    @classmethod
    def quick(cls, cost: Cost) -> StepSettings:
        return cls.full(cost)

    @classmethod
    def keys(cls) -> dict[str, str]:
        """``options.extra`` key -> field name."""
        return {(f.metadata.get("key") or cls.prefix + f.name): f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def docs(cls) -> dict[str, str]:
        """``options.extra`` key -> its one-line doc."""
        return {(f.metadata.get("key") or cls.prefix + f.name): f.metadata["doc"] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def hints(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    def finalized(self) -> StepSettings:
        """Fields derived from other fields (None: derive) filled in; idempotent."""
        return self

    def validated(self) -> StepSettings:
        """Every field checked against its type (TypeError naming its key); values converted."""
        hints = self.hints()
        names = {v: k for k, v in self.keys().items()}
        return dataclasses.replace(
            self,
            **{
                f.name: check_value(names[f.name], getattr(self, f.name), hints[f.name])  # type: ignore[arg-type]
                for f in dataclasses.fields(self)
            },
        )  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON types, by field name."""
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, Mapping) else v)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepSettings:
        """The inverse of :meth:`to_dict` (unknown fields: ValueError; types checked)."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.step} setting(s) {unknown}; expected fields from {sorted(names)}.")
        return cls(**dict(d)).validated().finalized()  # type: ignore[call-arg]
