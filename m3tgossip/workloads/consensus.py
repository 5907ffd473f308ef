"""The consensus workload: nodes average seeded random vectors whose exact mean is known.

Each node holds, for every shared component it holds in the topology, a vector drawn from a
generator seeded by (federation seed, node id, component). Any node can therefore recompute the
initial state of every other holder, and so the exact network mean, without asking anyone. The
daemons average the vectors; the distance of each node to the exact mean checks the whole stack
(transport, wire, replicas, mixing) with no training in the way. numpy only: no torch import.

The exact mean is computed when the workload is built, before the daemon listens, so no round
waits for it: every holder's vector is drawn (uniform draws in the vectors' own dtype are cheap)
and summed in float64. It is kept in the dtype of the vectors: the workload holds its vectors
and one mean, nothing else that grows with the state.

Each evaluation also records a `digest` per component: `DIGEST_DIMS` random projections of the
node's vector that every node computes alike, so a reader of the metrics (the chaos harness)
can measure how far the nodes are from one another without the vectors. The projection is
`G @ sum_b s_b x_b`: the vector cut into blocks `x_b` of `DIGEST_BLOCK` elements, a seeded
random sign `s_b` per block and one seeded Gaussian matrix `G` (`DIGEST_DIMS` x
`DIGEST_BLOCK`, entries of variance 1 / DIGEST_DIMS) for all blocks and components. It is
linear (the digest of the mean is the mean of the digests) and keeps squared norms in
expectation, like a dense random projection, but costs one pass over the state and
`DIGEST_DIMS * DIGEST_BLOCK` float64 of memory (512 KiB) whatever the state's size, plus one
sign per block.

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

from m3tgossip.consensus import squared_distance
from m3tgossip.topology import Topology

#: elements of each component's vector unless the `sizes` option says otherwise
DEFAULT_SIZE = 4096
#: random projections of the state recorded each round (`digest`), per component
DIGEST_DIMS = 16
#: elements per block of the digest (the width of its Gaussian matrix)
DIGEST_BLOCK = 4096
#: blocks the digest reads at a time: bounds its float64 scratch (512 KiB)
CHUNK_BLOCKS = 16
#: half the width of the initial values' uniform distribution (unit variance)
SQRT3 = float(np.sqrt(3.0))
#: the options this workload reads from the `[workload]` table
OPTIONS = ("size", "sizes", "dtype")
#: seed words of the digest's Gaussian matrix and of its block signs
_DIRECTIONS_KEY = 0xD16E57
_SIGNS_KEY = 0xD16E58


def initial_vector(seed: int, node_id: str, component: str, size: int, dtype: str) -> np.ndarray:
    """The seeded initial state of `component` on `node_id` (the same on every machine).

    Uniform on [-sqrt(3), sqrt(3)) (mean 0, variance 1), drawn in `dtype` itself: uniform
    draws cost a fraction of normal ones, and every node draws every holder's vector to know
    the exact mean.
    """
    key = [seed & 0xFFFFFFFF, zlib.crc32(node_id.encode()), zlib.crc32(component.encode())]
    rng = np.random.default_rng(key)
    x = rng.random(size, dtype=np.dtype(dtype).type)
    x *= 2.0 * SQRT3
    x -= SQRT3
    return x


def digest_matrix(seed: int) -> np.ndarray:
    """The digest's [DIGEST_DIMS, DIGEST_BLOCK] Gaussian matrix of the federation `seed`."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, _DIRECTIONS_KEY])
    return rng.standard_normal((DIGEST_DIMS, DIGEST_BLOCK)) / np.sqrt(DIGEST_DIMS)


def digest_signs(seed: int, component: str, size: int) -> np.ndarray:
    """The digest's random sign (+1.0 or -1.0) of every block of `component`'s vector."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(component.encode()), _SIGNS_KEY])
    blocks = -(-size // DIGEST_BLOCK)
    return rng.integers(0, 2, blocks).astype(np.float64) * 2.0 - 1.0


def fold(x: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """`sum_b signs[b] * x_b` over the DIGEST_BLOCK-element blocks of `x` (the last one
    zero-padded), in float64, reading `x` once in chunks of CHUNK_BLOCKS blocks."""
    flat = x.reshape(-1)
    full = flat.size // DIGEST_BLOCK
    out = np.zeros(DIGEST_BLOCK, dtype=np.float64)
    for start in range(0, full, CHUNK_BLOCKS):
        stop = min(full, start + CHUNK_BLOCKS)
        chunk = flat[start * DIGEST_BLOCK : stop * DIGEST_BLOCK].reshape(stop - start, -1)
        out += signs[start:stop] @ chunk
    tail = flat[full * DIGEST_BLOCK :]
    if tail.size:
        out[: tail.size] += signs[full] * tail
    return out


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
        self._matrix = digest_matrix(seed)
        self._signs = {c: digest_signs(seed, c, n) for c, n in self.sizes.items()}
        self._mean = self._exact_mean()
        self._mean_norm = float(np.sqrt(sum(float(m @ m) for m in self._mean.values())))
        #: `error_to_mean` before any mixing
        self.initial_error = self.error_to_mean()

    def _exact_mean(self) -> dict[str, np.ndarray]:
        """Component -> the mean of the initial vectors of all its holders (in the vectors'
        dtype, summed in float64)."""
        out: dict[str, np.ndarray] = {}
        for comp, size in self.sizes.items():
            holders = self.topology.holders(comp)
            acc = np.zeros(size, dtype=np.float64)
            for holder in holders:
                acc += initial_vector(self.seed, holder, comp, size, self.dtype)
            acc /= len(holders)
            out[comp] = acc.astype(self.dtype, copy=False)
        return out

    def _relative(self, sq: float) -> float:
        root = float(np.sqrt(sq))
        return root / self._mean_norm if self._mean_norm > 0 else root

    def exact_mean(self) -> dict[str, np.ndarray]:
        """Component -> the mean of the initial vectors of all its holders (in the vectors'
        dtype, averaged in float64)."""
        return self._mean

    # ------------------------------------------------------------------------- the daemon's side

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
        mean = self.exact_mean()
        sq = sum(squared_distance(x, mean[c]) for c, x in self._shared.items())
        return self._relative(sq)

    def heldout_loss(self) -> float:
        """Half the squared distance to the exact mean: the loss whose neighbour influence
        (`gossip.influence_every`) says which neighbour pulled this node towards the mean."""
        mean = self.exact_mean()
        return 0.5 * sum(squared_distance(x, mean[c]) for c, x in self._shared.items())

    def loss_gradient(self) -> tuple[float, dict[str, np.ndarray]]:
        """`heldout_loss` and its gradient, x - mean per component."""
        mean = self.exact_mean()
        grad = {c: np.subtract(x, mean[c], dtype=np.float64) for c, x in self._shared.items()}
        return self.heldout_loss(), grad

    def project(self, component: str, x: np.ndarray) -> list[float]:
        """The digest of the values `x` of `component` (see the module docstring)."""
        return (self._matrix @ fold(x, self._signs[component])).tolist()

    def evaluate(self, round_: int) -> dict[str, Any]:
        """`error_to_mean`, `initial_error` and the per-component `digest`."""
        return {
            "error_to_mean": self.error_to_mean(),
            "initial_error": self.initial_error,
            "digest": {c: self.project(c, x) for c, x in self._shared.items()},
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
