"""The mix phase: each shared component moves towards the replicas heard this round, with the
node's mixer and its mixing row (Metropolis-Hastings, noise-aware, or this round's row of a
time-varying topology), renormalised over the neighbours actually heard. Full states that were
summed as they arrived (`m3tgossip.daemon.stream`) are mixed from their sum, with the replicas
heard added to it; a component with nothing summed is mixed by the mixer from the replicas.
On a loose link (a straggler at either end, `RoundCollector.loose`) the neighbour's replica is
mixed if it took a new value since it was last mixed, whatever round that value is from, and
then not again until it changes.

A node that a stage of the spec adds (`add_nodes`) joins at that stage's round with its
starting values: in the mix of that round its neighbours hear what it sent but leave it out
(its weight goes to themselves, as for a neighbour not heard), and it takes the weighted mean
of its neighbours' values, by its Metropolis-Hastings row over those heard, as its own for
each component they hold, so it starts from the federation's current shared state."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from m3tgossip.consensus import (
    ChocoMixer,
    effective_noise_var,
    noise_aware_weights,
    renormalise,
    squared_distance,
)
from m3tgossip.daemon.exchange import Exchange
from m3tgossip.daemon.rounds import RoundCollector
from m3tgossip.daemon.state import NodeState
from m3tgossip.topology import node_weights


class MixStep:
    """Mixes the round being collected into the node's shared arrays."""

    def __init__(
        self, state: NodeState, exchange: Exchange, rounds: RoundCollector, mixer: Any
    ) -> None:
        self.state = state
        self.exchange = exchange
        self.rounds = rounds
        self.mixer = mixer
        node = state
        self.weights = {c: node_weights(node.topology, node.id, c) for c in node.shared}
        #: per component mixed in the last round: the largest distance to a heard replica,
        #: relative to the norm of this node's published value
        self.distances: dict[str, float] = {}
        #: per neighbour on a loose link in the last mix: the newest round of its values that
        #: the mix took (None: nothing new of it was mixed)
        self.loose: dict[str, int | None] = {}

    def mix(self) -> tuple[list[str], float]:
        """Mix over the replicas heard this round; returns (heard ids, consensus distance)."""
        node = self.state
        mixing = node.mixing_round
        row_of_round = self.rounds.row
        heard_any: set[str] = set()
        dist_sq = 0.0
        norm_sq = 0.0
        self.distances = {}
        sums = self.rounds.sums
        loose = {p.id for p in node.peers.values() if p.components and self.rounds.loose(p)}
        #: neighbours joining in this round: their starting values are heard, not mixed
        entering = {p.id for p in node.peers.values() if p.joins_round == mixing}
        joining = node.join_round == mixing
        self.loose = dict.fromkeys(sorted(loose))
        for comp, x in node.shared.items():
            if comp in node.retired:
                continue
            summed = sums.summed(comp) - entering
            held = {
                p.id
                for p in node.peers.values()
                if comp in p.replicas
                and p.id not in summed
                and p.id not in entering
                and (comp in p.fresh if p.id in loose else p.heard.get(comp) == mixing)
            }
            for pid in held:
                peer = node.peers[pid]
                peer.fresh.discard(comp)  # mixed: a loose link takes it again once it changes
                if pid in loose:
                    self.loose[pid] = max(self.loose[pid] or -1, peer.heard.get(comp, -1))
            heard = held | summed
            heard_any |= heard
            mine = self.exchange.published[comp]
            replicas = {pid: node.peers[pid].replicas[comp] for pid in held}
            comp_sq = sums.distance_sq(comp)
            for r in replicas.values():
                comp_sq = max(comp_sq, squared_distance(r, mine))
            dist_sq = max(dist_sq, comp_sq)
            mine_sq = float(mine @ mine)
            norm_sq += mine_sq
            if heard:
                self.distances[comp] = math.sqrt(comp_sq / mine_sq if mine_sq > 0 else comp_sq)
            row = row_of_round if row_of_round is not None else self.noise_aware(comp)
            weights = renormalise(row, node.id, heard)
            if joining and replicas:
                adopt_into(x, replicas, weights)
                continue
            if isinstance(self.mixer, ChocoMixer):  # linear: each replica has its own term
                coefficient = self.mixer.coefficient
                for pid, r in replicas.items():
                    if pid in weights:
                        sums.influence.add(pid, comp, coefficient(weights[pid]), r, mine)
            if not sums.mix_into(comp, x, mine, replicas, weights):
                self.mixer.mix_into(x, mine, replicas, weights, node.id)
        sums.close()
        distance = math.sqrt(dist_sq / norm_sq) if norm_sq > 0 else math.sqrt(dist_sq)
        return sorted(heard_any), distance

    def noise_aware(self, comp: str) -> dict[str, float]:
        """The Metropolis-Hastings row of `comp`, shrunk on edges to noisy neighbours."""
        node = self.state
        strength = node.config.gossip.noise_strength
        row = self.weights[comp]
        if strength <= 0:
            return row
        var = {}
        for j in row:
            if j == node.id:
                continue
            peer = node.peers[j]
            estimates = peer.noise_estimates.get(comp)
            estimated = float(np.median(estimates)) if estimates else 0.0
            var[j] = effective_noise_var(peer.noise.get(comp, 0.0) ** 2, estimated)
        own_var = self.exchange.noise_std[comp] ** 2
        return noise_aware_weights(row, node.id, var, own_var, strength)


def adopt_into(x: np.ndarray, replicas: dict[str, np.ndarray], weights: dict[str, float]) -> None:
    """`x` becomes the mean of `replicas` weighted by their entries in `weights` (a joining
    node's first mix: its own starting values have no part in it)."""
    total = sum(weights[j] for j in replicas)
    x[...] = 0.0
    for j in sorted(replicas):
        x += (weights[j] / total) * replicas[j]
