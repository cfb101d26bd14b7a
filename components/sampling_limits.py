"""The one table of sampling limits: each option's type and range, the work caps, the seed range.

`genpipe sample`, the pyfunc `serving.predict`, params validation (the family sampling configs use
`limited(name)` as a field validator) and `genpipe evaluate --dry-run` all check options here, so a
value is accepted or refused the same way everywhere. Every number must be finite: `guidance=inf`
or `temperature=inf` turn every pixel black or white, and NaN would silently stand for a default.

Ranges (open `(` or closed `[`), wide enough for every setting the papers use:

    guidance            [0, 50]      CFG weight w; samples saturate well before 50 (papers: 1..10)
    temperature         (0, 10]      latents times T (VAE, flow), logits / T (PixelCNN, priors)
    choice_temperature  [0, 100]     MaskGIT's 4.5, annealed to 0
    top_k               null or [0, 65536]   0 or null: off
    top_p               (0, 1]       nucleus mass; 1: off
    steps               [1, GENPIPE_MAX_STEPS]   sampler iterations (diffusion, MaskGIT)
    rho                 (0, 100]     EDM eq. 5's 7
    eta                 [0, 1]       DDIM: 0 deterministic, 1 DDPM-like
    S_churn             [0, 1000]    EDM Table 5 uses up to 80
    S_tmin              [0, 1e4];  S_tmax, sigma_min, sigma_max: null or (0, 1e4]
    S_noise             (0, 10]      EDM's 1.003..1.007
    guidance_interval   null or [lo, hi] within [0, 1e4]
    truncation          null or (0, 10]   BigGAN uses 0.04..2

Choices (`sampler`, `discretization`) and switches (`use_cache`) are typed by the family configs.

Caps, read from the environment at each check (a bad value is a one-line error):

    GENPIPE_MAX_IMAGES  1024  images per `genpipe sample` call: a 32x32 grid of tiles; a larger
                              set is the evaluate stage's job (it streams, `sample` holds the grid)
    GENPIPE_MAX_STEPS   1000  sampler steps: DDPM's full chain (T = 1000), the most any sampler
                              here needs; more only multiplies the time of a request
    GENPIPE_MAX_ROWS     512  rows per pyfunc request, checked before anything is read: one
                              request is one batch (the evaluate stage's default batch size), so
                              memory stays bounded (10^6 rows once asked for 16 GB)

Seeds lie in [0, 2**63 - 1]: the range of a pandas int64 column and of a JSON integer that every
client keeps exactly; `torch.Generator.manual_seed` accepts all of it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from pydantic import BeforeValidator

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Cap:
    """An upper bound on work that an environment variable may change."""

    env: str
    default: int
    unit: str


CAPS: dict[str, Cap] = {
    "images": Cap("GENPIPE_MAX_IMAGES", 1024, "images per call"),
    "steps": Cap("GENPIPE_MAX_STEPS", 1000, "steps"),
    "rows": Cap("GENPIPE_MAX_ROWS", 512, "rows per request"),
}


def cap(name: str) -> int:
    """The current value of cap `name` (its environment variable, else the default)."""
    spec = CAPS[name]
    text = os.environ.get(spec.env, "").strip()
    if not text:
        return spec.default
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{spec.env}={text!r} must be a positive integer (default {spec.default})")
    return int(text)


def check_cap(name: str, value: int, *, what: str | None) -> int:
    """`value` if it is within cap `name`, else a one-line error naming `what` (or the unit), the cap
    and its variable."""
    limit = cap(name)
    if value > limit:
        spec = CAPS[name]
        asked = f"{what}={value} exceeds" if what else f"{value} {spec.unit.split()[0]} exceed"
        raise ValueError(f"{asked} the cap of {limit} {spec.unit} (set {spec.env} to raise it)")
    return value


def check_seed(value: Any, *, what: str = "seed") -> int:
    """An integer seed in [0, 2**63 - 1], else a one-line error naming it and the range."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{what}={value!r} must be an integer in [0, 2**63 - 1 = {MAX_SEED}]")
    return value


@dataclass(frozen=True)
class Limit:
    """An option's type and range; `hi` may name a cap (read at each check)."""

    kind: type  # int, float, or tuple (a [lo, hi] pair of floats)
    lo: float
    hi: float | str
    lo_open: bool = False
    hi_open: bool = False
    nullable: bool = False

    def bounds(self) -> tuple[float, float]:
        return self.lo, float(cap(self.hi)) if isinstance(self.hi, str) else self.hi

    def rule(self) -> str:
        lo, hi = self.bounds()
        interval = f"{'(' if self.lo_open else '['}{lo:g}, {hi:g}{')' if self.hi_open else ']'}"
        if isinstance(self.hi, str):
            interval += f" ({CAPS[self.hi].env} raises the cap)"
        what = {int: "an integer", float: "a finite number", tuple: "[lo, hi] of finite numbers"}
        text = f"{what[self.kind]} in {interval}"
        return f"must be null or {text}" if self.nullable else f"must be {text}"

    def inside(self, x: float) -> bool:
        try:
            x = float(x)  # an int beyond 1e308 overflows: out of range
        except OverflowError:
            return False
        lo, hi = self.bounds()
        above = x > lo if self.lo_open else x >= lo
        below = x < hi if self.hi_open else x <= hi
        return math.isfinite(x) and above and below


LIMITS: dict[str, Limit] = {
    "guidance": Limit(float, 0, 50),
    "temperature": Limit(float, 0, 10, lo_open=True),
    "choice_temperature": Limit(float, 0, 100),
    "top_k": Limit(int, 0, 65536, nullable=True),
    "top_p": Limit(float, 0, 1, lo_open=True),
    "steps": Limit(int, 1, "steps"),
    "rho": Limit(float, 0, 100, lo_open=True),
    "eta": Limit(float, 0, 1),
    "S_churn": Limit(float, 0, 1000),
    "S_tmin": Limit(float, 0, 1e4),
    "S_tmax": Limit(float, 0, 1e4, lo_open=True, nullable=True),
    "S_noise": Limit(float, 0, 10, lo_open=True),
    "sigma_min": Limit(float, 0, 1e4, lo_open=True, nullable=True),
    "sigma_max": Limit(float, 0, 1e4, lo_open=True, nullable=True),
    "guidance_interval": Limit(tuple, 0, 1e4, nullable=True),
    "truncation": Limit(float, 0, 10, lo_open=True, nullable=True),
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_number, value))


def _valid(limit: Limit, value: Any) -> tuple[bool, Any]:
    """(True, the value as its kind), or (False, None) when it breaks the limit."""
    if limit.kind is int:
        if _number(value) and limit.inside(value) and float(value).is_integer():
            return True, int(value)
    elif limit.kind is float:
        if _number(value) and limit.inside(value):
            return True, float(value)
    elif _pair(value) and all(map(limit.inside, value)):  # both ends within the range
        return True, (float(value[0]), float(value[1]))
    return False, None


def violation(name: str, value: Any) -> tuple[str | None, Any]:
    """(None, value as its kind) when option `name` accepts `value`, else (the rule, None)."""
    limit = LIMITS[name]
    if value is None and limit.nullable:
        return None, None
    ok, converted = _valid(limit, value)
    return (None, converted) if ok else (limit.rule(), None)


def check_option(name: str, value: Any) -> Any:
    """`value` (as the option's kind) if option `name` accepts it; a one-line `name=value: rule` error.

    Options without a limit here (choices, switches) pass unchanged: their family config types them.
    """
    if name not in LIMITS:
        return value
    rule, converted = violation(name, value)
    if rule is not None:
        raise ValueError(f"{name}={value!r}: {rule}")
    return converted


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Every option through `check_option`, in order."""
    return {name: check_option(name, value) for name, value in options.items()}


def limited(name: str) -> BeforeValidator:
    """A pydantic field validator applying option `name`'s limit before the field's own type (one rule)."""
    LIMITS[name]  # a typo in a config fails at import

    def validate(value: Any) -> Any:
        rule, converted = violation(name, value)
        if rule is not None:
            raise ValueError(rule)
        return converted

    return BeforeValidator(validate)
