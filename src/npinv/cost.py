"""What an operation cost: wall-clock seconds and exact UNet calls and rows.

:class:`Meter` is the one place that reads the model's UNet counter; every result of the library
carries a :class:`Cost`, so no front end diffs the counter itself.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any


@dataclasses.dataclass(frozen=True)
class Cost:
    seconds: float = 0.0
    unet_calls: int = 0
    unet_rows: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.seconds + other.seconds, self.unet_calls + other.unet_calls, self.unet_rows + other.unet_rows)

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.seconds - other.seconds, self.unet_calls - other.unet_calls, self.unet_rows - other.unet_rows)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Costed:
    """Results that carry a ``cost`` expose its parts by name too."""

    cost: Cost

    @property
    def seconds(self) -> float:
        return self.cost.seconds

    @property
    def unet_calls(self) -> int:
        return self.cost.unet_calls

    @property
    def unet_rows(self) -> int:
        return self.cost.unet_rows


class Meter:
    """Started at construction; :attr:`cost` is what the model did since then."""

    def __init__(self, model: Any) -> None:
        self.counter = model.counter
        self.start = time.perf_counter()
        self.calls0, self.rows0 = self.counter.calls, self.counter.rows

    @property
    def cost(self) -> Cost:
        return Cost(time.perf_counter() - self.start, self.counter.calls - self.calls0, self.counter.rows - self.rows0)
