"""Cancelling noise of a single-learner node: per-edge masks that sum to zero in the mix.

This module owns the masks a node with `single_learner = "cancel"` (topology spec) adds to
what it sends; it sees weights and arrays, never sockets or messages. The release gate
(`m3tgossip.privacy.gate`) draws one set of masks per component and round when the round's
value is released; the exchange adds the mask of each edge to what it sends on that edge.

Why. A node that holds one learner (a student's laptop) protects that learner with
per-learner DP-SGD only at sampling rate 1 and noise large enough to ruin its model. Instead,
every neighbour j of the node gets the node's value plus a mask n_j of its own, drawn afresh
every round, with

    sum_j w_j n_j = 0         (j over the node's neighbours that hold the component)

where w_j is the Metropolis-Hastings weight of edge (node, j) in the component's holder
subgraph: the weight j gives this node when it mixes (the spec's weights are symmetric, so
the node computes it from the spec). The mean mixer (CHOCO step) moves neighbour j by
`gamma * w_j * (replica - own)`, so the masks move the network's sum by
`gamma * sum_j w_j n_j = 0`: the network mean is the one without masks, up to float rounding,
while every single message is masked. The node mixes with its own unmasked value.

How they are drawn. For each edge a standard normal g_j from that edge's stream; the vector g
is projected onto the plane w . n = 0 and scaled by s, n = s (g - w (w . g) / (w . w)), so
n_j is Gaussian with std s sqrt(1 - w_j^2 / |w|^2); s is chosen so that the smallest of these
is the configured `std`, and each message declares its own edge's std (wire `noise` field).
With equal weights every edge gets `std`. A component needs two or more neighbours holding
it (with one, the only zero-sum mask is zero, and that neighbour would see the raw value): the
topology loader keeps the others local on a cancelling node (`m3tgossip.topology.load`).

Seeds. Each edge's stream is seeded with a keyed hash (BLAKE2b) of the node's secret, the
edge and the component. The secret is 32 bytes of operating-system entropy drawn when the
node starts and never written or sent: nothing public (federation seed, spec, keys) derives
it, and no neighbour knows any mask. A mask a neighbour could compute would be one it could
subtract, so the two ends of an edge do not agree on a seed (that is what pairwise-cancelling
schemes need, whose masks the neighbour of that edge can strip); the links' CURVE encryption
is what keeps each neighbour to its own message.

What it protects against, and what it does not. An honest-but-curious neighbour (one that
follows the protocol and only looks at what it gets) sees in each round the node's value plus
Gaussian noise of the declared std, independent of everything else it sees that round. It
does NOT protect against:
- neighbours that pool their messages: all of them together know sum_j w_j (x + n_j) =
  (sum_j w_j) x, the exact value; two of a node's three neighbours remove much of the noise;
- one neighbour over many rounds: the value changes slowly, fresh masks average out, so
  m messages of a nearly constant value reveal it to about std / sqrt(m);
- a neighbour that shares another neighbour with the node (a triangle, as a student, a
  classmate and their instructor): the other neighbour mixes its own mask of the round
  into its state and sends that state on in the next round, and by the zero sum that mask
  is correlated with this neighbour's, so later messages tell it part of its own mask;
- anyone who reads the links (plaintext `--insecure` links: all messages of a round together
  are the exact value);
- what the node's value reveals once mixed: neighbours' values and the network mean carry
  the learner's contribution unmasked (that is what the cancellation means).
It is not differential privacy: the node claims no epsilon (`ReleaseGate.node_epsilon` is
inf, its metrics say `"mechanism": "cancelling-noise"`, `"dp": false`, `"node_epsilon": null`).

When the cancellation holds: the node and every neighbour of it mix with the `mean` mixer,
static Metropolis-Hastings weights (no noise-aware weights), `gamma = 1` and a raw codec, in
the lockstep schedule, and every neighbour mixes every message of the round (a neighbour not
heard in a round, a lost message or a replica reset leaves that edge's term out of that
round's sum). The daemon refuses the settings where it cannot hold (`m3tgossip.daemon.startup`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping

import numpy as np

#: per-element std of the masks when the node config does not say (`[privacy] cancel_noise`)
DEFAULT_STD = 0.01
#: what the masks protect against, as the node's metrics say it
PROTECTS = "one message from one honest-but-curious neighbour; not colluding neighbours"


class CancellingNoise:
    """The per-edge masks of one node: `rows[c]` maps each neighbour holding component c to
    the weight w_j of that edge (Metropolis-Hastings, from the spec); `std` the smallest
    per-element std any edge gets. `secret` None draws 32 bytes of operating-system entropy
    (deployments); bytes make the masks reproducible (tests only).
    ValueError for a component with fewer than two neighbours or a non-positive std."""

    def __init__(
        self,
        node_id: str,
        rows: Mapping[str, Mapping[str, float]],
        std: float = DEFAULT_STD,
        secret: bytes | None = None,
    ) -> None:
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not std > 0:
            raise ValueError(f"cancel_noise: a positive number, got {std!r}")
        if not math.isfinite(std):
            raise ValueError(f"cancel_noise: a finite number, got {std!r}")
        self.node_id = node_id
        self.std = float(std)
        key = os.urandom(32) if secret is None else bytes(secret)
        #: per component: the neighbours in order, their weights, and the per-edge std
        self.peers: dict[str, tuple[str, ...]] = {}
        self.weights: dict[str, np.ndarray] = {}
        self.edge_std: dict[str, dict[str, float]] = {}
        self._scale: dict[str, float] = {}
        self._streams: dict[tuple[str, str], np.random.Generator] = {}
        #: per (component, neighbour): the 32-byte seed of that edge's stream (kept in memory)
        self.seeds: dict[tuple[str, str], bytes] = {}
        for comp, row in sorted(rows.items()):
            peers = tuple(sorted(row))
            if len(peers) < 2:
                raise ValueError(
                    f'component "{comp}" has {len(peers)} neighbour(s) holding it; cancelling '
                    "noise needs at least two (with one, the only zero-sum mask is zero)"
                )
            w = np.array([float(row[p]) for p in peers])
            if not np.all(w > 0):
                raise ValueError(f'component "{comp}": edge weights must be positive, got {w}')
            share = w**2 / float(w @ w)
            scale = self.std / math.sqrt(1.0 - float(share.max()))
            self.peers[comp] = peers
            self.weights[comp] = w
            self._scale[comp] = scale
            self.edge_std[comp] = {
                p: scale * math.sqrt(1.0 - float(s)) for p, s in zip(peers, share, strict=True)
            }
            for p in peers:
                label = f"{node_id}\x00{p}\x00{comp}".encode()
                seed = hashlib.blake2b(label, key=key, digest_size=32).digest()
                self.seeds[(comp, p)] = seed
                self._streams[(comp, p)] = np.random.default_rng(
                    np.random.SeedSequence(int.from_bytes(seed, "big"))
                )

    def draw(self, component: str, size: int, dtype: np.dtype) -> dict[str, np.ndarray]:
        """This round's masks of `component`, one flat array of `size` per neighbour, with
        sum_j w_j n_j = 0 (in float64; cast to `dtype`, the arrays' own float type)."""
        peers = self.peers[component]
        w = self.weights[component]
        g = np.stack([self._streams[(component, p)].standard_normal(size) for p in peers])
        g -= np.outer(w / float(w @ w), w @ g)
        g *= self._scale[component]
        return {p: g[i].astype(dtype, copy=False) for i, p in enumerate(peers)}
