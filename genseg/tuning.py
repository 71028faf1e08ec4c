"""What a search is, without Ray: the search space a user writes, its validation, the objective
that says what "best" means, and the ranking of finished trials.

A search space maps a field to the values it may take::

    schedule: [linear, cosine]             # a list: these values (a grid axis, or a choice)
    beta_end: {low: 0.01, high: 0.03}      # a range: uniform in [low, high]
    lr: {low: 1.0e-4, high: 1.0e-2, log: true}
    timesteps: {low: 200, high: 1000, int: true}

``jobs/tune.py`` turns a :class:`SearchSpace` into Ray Tune's domains.  Every value a space can
produce is checked against the stage's config *before any trial starts* (:meth:`SearchSpace.check`),
so an unknown field or a range no setting admits is one line of error, not a failed trial later.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from genseg.errors import InputError


class SpaceError(InputError):
    """A search space that names an unknown field or holds values no trial could use."""


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def ends(self) -> list:
        return [int(self.low), int(self.high)] if self.integer else [self.low, self.high]

    def describe(self) -> str:
        kind = "int " if self.integer else ""
        return f"{kind}{'log-' if self.log else ''}uniform[{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class SearchSpace:
    """``{field: [values] | Range}`` of one search stage, in the order the user wrote them."""

    fields: dict[str, list | Range] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: dict | None, stage: str) -> "SearchSpace":
        """A space from its YAML/dict form; shape errors name the stage and field."""
        if spec is None:
            return cls({})
        if not isinstance(spec, dict):
            raise SpaceError(f"search space '{stage}' must map field names to values, got {type(spec).__name__}")
        out: dict[str, list | Range] = {}
        for name, value in spec.items():
            where = f"search space '{stage}', field '{name}'"
            if isinstance(value, (list, tuple)):
                if not value:
                    raise SpaceError(f"{where}: the list of values is empty")
                out[name] = list(value)
            elif isinstance(value, dict):
                unknown = set(value) - {"low", "high", "log", "int", "values"}
                if unknown:
                    raise SpaceError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                                     f"(a range has low, high and optionally log: true, int: true)")
                if "values" in value:
                    vals = value["values"]
                    if not isinstance(vals, (list, tuple)) or not vals:
                        raise SpaceError(f"{where}: 'values' must be a non-empty list")
                    out[name] = list(vals)
                    continue
                try:
                    low, high = float(value["low"]), float(value["high"])
                except (KeyError, TypeError, ValueError):
                    raise SpaceError(f"{where}: a range needs numbers 'low' and 'high'") from None
                if not (math.isfinite(low) and math.isfinite(high)) or low > high:
                    raise SpaceError(f"{where}: empty range [{low:g}, {high:g}] (need low <= high)")
                log, integer = bool(value.get("log", False)), bool(value.get("int", False))
                if log and low <= 0:
                    raise SpaceError(f"{where}: a log range needs low > 0, got {low:g}")
                if integer and (low != int(low) or high != int(high)):
                    raise SpaceError(f"{where}: an int range needs whole-number ends, got [{low:g}, {high:g}]")
                out[name] = Range(low, high, log, integer)
            else:
                out[name] = [value]      # a single value: fixed for every trial
        return cls(out)

    def merged(self, other: "SearchSpace") -> "SearchSpace":
        return SearchSpace({**self.fields, **other.fields})

    @property
    def size(self) -> int | None:
        """Number of grid points, or None when a range makes it continuous."""
        n = 1
        for v in self.fields.values():
            if isinstance(v, Range):
                return None
            n *= len(v)
        return n

    def check(self, allowed: set[str] | list[str], build: Callable[[dict], Any], stage: str) -> None:
        """Every field must be in ``allowed``; every value (each list item, both ends of a range)
        must give a valid setting with *some* choice of the other searched fields' extreme values
        (``build(overrides)`` raises an :class:`InputError` for an invalid one)."""
        unknown = [f for f in self.fields if f not in allowed]
        if unknown:
            raise SpaceError(f"search space '{stage}': unknown field(s) {', '.join(unknown)}; "
                             f"searchable: {', '.join(sorted(allowed))}")
        extremes = {f: (v.ends() if isinstance(v, Range) else list(v)) for f, v in self.fields.items()}
        for name, values in extremes.items():
            others = {f: _corners(v) for f, v in extremes.items() if f != name}
            combos = [dict(zip(others, c)) for c in itertools.product(*others.values())][:256] or [{}]
            for value in values:
                error = None
                for combo in combos:
                    try:
                        build({**combo, name: value})
                        error = None
                        break
                    except InputError as exc:
                        error = error or exc
                if error is not None:
                    raise SpaceError(f"search space '{stage}', field '{name}': value {value!r} cannot be used "
                                     f"({error})") from None

    def check_grid(self) -> None:
        """A grid search enumerates lists; a range has no grid points."""
        for name, v in self.fields.items():
            if isinstance(v, Range):
                raise SpaceError(f"search space field '{name}' is a range ({v.describe()}); a grid needs lists "
                                 f"of values: use --search random or --search tpe, or list the values")

    def describe(self) -> str:
        return "; ".join(f"{k} {v.describe() if isinstance(v, Range) else v}" for k, v in self.fields.items())

    def to_dict(self) -> dict:
        return {k: ({"low": v.low, "high": v.high, "log": v.log, "int": v.integer} if isinstance(v, Range) else v)
                for k, v in self.fields.items()}


def _corners(values: list) -> list:
    """The values worth trying as "the other fields" when checking one: a list's every value
    (lists are short), a range's two ends."""
    return values if len(values) <= 4 else [values[0], values[-1], *values[1:-1][:2]]


def load_space_file(path: str | Path) -> dict:
    """A YAML file ``{stage: {field: spec}}`` (stages: schedule, sampling, seg)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SpaceError(f"search space file {p} does not exist")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise SpaceError(f"search space file {p} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise SpaceError(f"search space file {p} must map stage names (schedule, sampling, seg) to fields")
    unknown = set(doc) - {"schedule", "sampling", "seg"}
    if unknown:
        raise SpaceError(f"search space file {p}: unknown stage(s) {', '.join(sorted(unknown))}; "
                         f"stages: schedule, sampling, seg")
    return doc


# ------------------------------------------------------------------ the objective

@dataclass(frozen=True)
class Objective:
    """What "best" means for a generative model, from ``eval gen``'s metrics.

    Minimise the Frechet distance (segmenter features) subject to the conditioned samples keeping
    the segmenter's mIoU at no less than ``min_fraction`` of its mIoU on the real images (the
    ceiling).  A setting that falls short pays ``penalty`` FD units per unit of the missing
    fraction, so among infeasible settings the closer one ranks first and a feasible one with a
    higher FD can still win.  Unconditional models (no mIoU) are ranked by FD alone.
    """

    min_fraction: float = 0.9
    penalty: float = 100.0

    def __post_init__(self):
        if not 0 <= self.min_fraction <= 1:
            raise InputError(f"--min-fraction must be in [0, 1], got {self.min_fraction}")

    def shortfall(self, metrics: dict) -> float:
        frac = metrics.get("seg_miou_fraction_of_ceiling")
        if frac is None or not math.isfinite(frac):
            return 0.0
        return max(0.0, self.min_fraction - frac)

    def feasible(self, metrics: dict) -> bool:
        return self.shortfall(metrics) == 0.0

    def value(self, metrics: dict) -> float:
        fd = metrics.get("fd")
        if fd is None or not math.isfinite(fd):
            return float("inf")
        return float(fd) + self.penalty * self.shortfall(metrics)

    def describe(self) -> str:
        return (f"minimise FD (segmenter features) subject to segmenter mIoU on the conditioned samples >= "
                f"{100 * self.min_fraction:g} % of its mIoU on the real images; a shortfall costs "
                f"{self.penalty:g} FD per unit of the fraction (objective = FD + {self.penalty:g} x "
                f"max(0, {self.min_fraction:g} - mIoU fraction))")


# ------------------------------------------------------------------ results

@dataclass
class TrialRow:
    trial_id: str
    params: dict
    metrics: dict
    status: str                 # finished | early-stopped | error
    epochs: int | None = None   # training trials: epochs done
    mlflow_run_id: str | None = None
    checkpoint: str | None = None


def rank(rows: list[TrialRow], metric: str, higher_is_better: bool) -> list[TrialRow]:
    """Trials best first: those with a finite ``metric`` by it, then the rest (errors, NaN) in order."""
    def key(r: TrialRow):
        v = r.metrics.get(metric)
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        return (0 if ok else 1, (-v if higher_is_better else v) if ok else 0.0)

    return sorted(rows, key=key)


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.4g}"
    return str(v)


def format_table(rows: list[TrialRow], param_names: list[str], metric_names: list[str]) -> str:
    """A plain-text table, one trial per line, in the order given."""
    head = ["trial", *param_names, *metric_names, "status"]
    body = [[r.trial_id, *[_fmt(r.params.get(p, "")) for p in param_names],
             *[_fmt(r.metrics.get(m, "")) for m in metric_names],
             r.status + ("" if r.epochs is None else f" ({r.epochs} ep)")] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])
