"""Base class of every config section: unknown keys are errors, assignments are validated, and
every range a pair of fields bounds must be non-empty."""

from pydantic import BaseModel, ConfigDict, model_validator


def range_pairs(names) -> list[tuple[str, str]]:
    """(low, high) field pairs by name: min_x / max_x and x_min / x_max."""
    names = set(names)
    pairs = [(n, "max_" + n[4:]) for n in names if n.startswith("min_")]
    pairs += [(n, n[:-4] + "_max") for n in names if n.endswith("_min")]
    return sorted((low, high) for low, high in pairs if high in names)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="after")
    def _ranges_not_empty(self):
        for low, high in range_pairs(type(self).model_fields):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"{low}={lo} is above {high}={hi}: the range is empty")
        return self
