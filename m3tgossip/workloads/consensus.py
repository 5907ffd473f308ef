"""The consensus workload: nodes average seeded random vectors whose exact mean is known.

Each node holds, for every shared component it holds in the topology, a vector drawn from a
generator seeded by (federation seed, node id, component). Any node can therefore recompute the
initial state of every other holder, and so the exact network mean, without asking anyone. The
daemons average the vectors; the distance of each node to the exact mean checks the whole stack
(transport, wire, replicas, mixing) with no training in the way. numpy only: no torch import.

Each evaluation also records a `digest` per component: the projections of the node's vector on
`DIGEST_DIMS` random directions that every node draws alike, so a reader of the metrics (the
chaos harness) can measure how far the nodes are from one another without the vectors. The
directions are kept dense: `DIGEST_DIMS` float64 values per element of the state, that is
128 bytes per element (16 times a float64 state, 32 times a float32 one), and evaluating costs
`DIGEST_DIMS` dot products over the state.

Options (`[workload]` table of the node config):

    size    elements of every component's vector (4096)
    sizes   {component = elements}, overriding `size` per component
    dtype   "float64" (default) or "float32", the dtype of the vectors the daemons mix
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

import numpy as np

from m3tgossip.topology import Topology

#: elements of each component's vector unless the `sizes` option says otherwise
DEFAULT_SIZE = 4096
#: random projections of the state recorded each round (`digest`), per component
DIGEST_DIMS = 16
#: the options this workload reads from the `[workload]` table
OPTIONS = ("size", "sizes", "dtype")


def initial_vector(seed: int, node_id: str, component: str, size: int, dtype: str) -> np.ndarray:
    """The seeded initial state of `component` on `node_id` (the same on every machine).

    Drawn in float64 and then cast to `dtype`, so a float32 federation starts from the rounded
    float64 draws.
    """
    key = [seed & 0xFFFFFFFF, zlib.crc32(node_id.encode()), zlib.crc32(component.encode())]
    rng = np.random.default_rng(key)
    return rng.standard_normal(size, dtype=np.float64).astype(dtype, copy=False)


class ConsensusWorkload:
    """Average-consensus on seeded vectors; reports its relative error to the exact mean.

    `topology` is the federation's, `node_id` this node's entry in it, `seed` the federation seed
    and `options` the `[workload]` table (`OPTIONS`); an unknown option, a dtype other than
    float32 or float64, or a size below 1 raises ValueError.
    """

    name = "consensus"
    #: the vectors are not learned from anyone's records: no differential privacy applies
    private_data = False

    def __init__(
        self, topology: Topology, node_id: str, seed: int = 0, options: dict[str, Any] | None = None
    ) -> None:
        options = dict(options or {})
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise ValueError(
                f"workload options: unknown {sorted(unknown)}; known: {', '.join(OPTIONS)}"
            )
        size = int(options.get("size", DEFAULT_SIZE))
        sizes = {str(k): int(v) for k, v in dict(options.get("sizes", {})).items()}
        #: dtype of the shared vectors, "float32" or "float64"
        self.dtype = str(options.get("dtype", "float64"))
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"workload option dtype: float32 or float64, got {self.dtype!r}")
        if size < 1 or any(v < 1 for v in sizes.values()):
            raise ValueError("workload option size/sizes: sizes must be >= 1")
        self.topology = topology
        self.node_id = node_id
        self.seed = seed
        #: component -> elements, for the shared components this node holds
        self.sizes: dict[str, int] = {
            c: sizes.get(c, size) for c in topology.node(node_id).shared_components
        }
        # what every node of the federation must agree on (not which components it holds)
        self._layout = f"{size}|" + ",".join(f"{c}:{n}" for c, n in sorted(sizes.items()))
        self._shared: dict[str, np.ndarray] = {
            c: initial_vector(seed, node_id, c, n, self.dtype) for c, n in self.sizes.items()
        }
        self._mean = self._exact_mean()
        self._mean_norm = float(np.sqrt(sum(float(m @ m) for m in self._mean.values())))
        #: `error_to_mean` before any mixing
        self.initial_error = self.error_to_mean()
        # Fixed random directions, the same on every node: projections of the state onto them
        # let a reader compare nodes' states (consensus among nodes) without the states.
        # Dense [DIGEST_DIMS, n] float64 per component (see the module docstring for the cost).
        self._directions: dict[str, np.ndarray] = {
            c: np.random.default_rng(
                [seed & 0xFFFFFFFF, zlib.crc32(c.encode()), 0xD16E57]
            ).standard_normal((DIGEST_DIMS, n))
            / np.sqrt(DIGEST_DIMS)
            for c, n in self.sizes.items()
        }

    def _exact_mean(self) -> dict[str, np.ndarray]:
        """Component -> the float64 mean of the initial vectors of all its holders."""
        out: dict[str, np.ndarray] = {}
        for comp, size in self.sizes.items():
            holders = self.topology.holders(comp)
            acc = np.zeros(size, dtype=np.float64)
            for holder in holders:
                acc += initial_vector(self.seed, holder, comp, size, self.dtype)
            out[comp] = acc / len(holders)
        return out

    def model_id(self) -> str:
        """Seed, dtype and size layout: what every node of the federation must agree on."""
        digest = hashlib.sha256(
            f"consensus|{self.seed}|{self.dtype}|{self._layout}".encode()
        ).hexdigest()
        return f"consensus-{digest[:16]}"

    def shared(self) -> dict[str, np.ndarray]:
        """The vectors the daemon mixes in place (the same arrays on every call)."""
        return self._shared

    def local_step(self, round_: int) -> dict[str, Any]:
        """Nothing to do between mixes: no local training, no metrics."""
        return {}

    def after_mix(self, round_: int) -> None:
        """Nothing to do: the mixed arrays are the state."""

    def error_to_mean(self) -> float:
        """Relative distance ||x - mean|| / ||mean|| over all of this node's components."""
        sq = 0.0
        for comp, x in self._shared.items():
            d = x - self._mean[comp]
            sq += float(d @ d)
        return float(np.sqrt(sq) / self._mean_norm) if self._mean_norm > 0 else float(np.sqrt(sq))

    def evaluate(self, round_: int) -> dict[str, Any]:
        """`error_to_mean`, `initial_error` and the per-component `digest` (every round)."""
        return {
            "error_to_mean": self.error_to_mean(),
            "initial_error": self.initial_error,
            "digest": {c: (self._directions[c] @ x).tolist() for c, x in self._shared.items()},
        }

    def state(self) -> dict[str, np.ndarray]:
        """The shared vectors as `shared/<component>`; nothing else changes over a run."""
        return {f"shared/{c}": x for c, x in self._shared.items()}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Copy `shared/<component>` of `state()` output into the vectors, checking shapes."""
        for comp, x in self._shared.items():
            saved = arrays.get(f"shared/{comp}")
            if saved is None or saved.shape != x.shape:
                raise ValueError(f"checkpoint has no matching state for component {comp}")
            x[...] = saved
