"""`DataConfig`: how many built-in records each node generates and how skewed their labels are."""

from __future__ import annotations

from dataclasses import dataclass

#: records per node = DataConfig.records x this factor of the node's role
ROLE_SCALE = {"institution": 2.0, "instructor": 1.0, "student": 0.1}


@dataclass(frozen=True)
class DataConfig:
    """How much built-in data each node generates and how skewed it is."""

    #: records per node (train + test), scaled by role: institution x2, instructor x1, student x0.1
    records: int = 240
    #: fraction of a node's records held out for evaluation
    test_fraction: float = 0.3
    #: Dirichlet concentration of the non-IID label skew across nodes (smaller = more skewed)
    alpha: float = 0.5
    #: federation seed
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.records, int) or isinstance(self.records, bool) or self.records < 4:
            raise ValueError(f"records: must be an integer >= 4, got {self.records!r}")
        if not (isinstance(self.test_fraction, (int, float)) and 0 < self.test_fraction < 1):
            raise ValueError(f"test_fraction: must be between 0 and 1, got {self.test_fraction!r}")
        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < float("inf")):
            raise ValueError(f"alpha: must be a positive number, got {self.alpha!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed: must be an integer, got {self.seed!r}")
