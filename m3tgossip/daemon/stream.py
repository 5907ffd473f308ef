"""The streaming mix: the round's weighted sum of the neighbours' full states, added up as each
state arrives, so that a node holds its own state, one sum per component and the message being
read, instead of one replica per neighbour until the mix.

It serves the `mean` mixer (the CHOCO step, linear in the replicas) with a weight row known
before the round: the node's Metropolis-Hastings row, or this round's row of a time-varying
topology. Renormalising the row over the neighbours heard keeps every heard neighbour's weight
(what the others would have had goes to the node itself, which has no term in the step), so
each state's term is known the moment it arrives. The mix (`MixStep`) then takes one step from
the sum and the sum of the weights in it. The first state of a round is kept as it arrived (a
view of the message, no copy) and the sum made when a second one comes, so a round with one
neighbour heard (a time-varying one-peer round) needs no sum and is mixed as before.

Only full states whose replica would be dropped after the mix anyway are summed: those of a
neighbour whose hello said it sends full states every round, and every state of a time-varying
round. Deltas, and the states of neighbours whose replicas outlive the mix, are applied to the
replicas as before and join the sum at the mix. Nothing is summed with noise-aware weights
(they change with what arrives), with another mixer (clipping and the trimmed mean need every
replica at once) or on a Byzantine node (its attack reads the replicas).

A state is summed only for the round being mixed, and only once this node has sent that round,
so that the published copy it is measured against (the distance the mix reports) is the one the
mix steps from. One that comes earlier (while the node starts up, say), like one for a later
round, waits in the early-message queue until the node collects its round (`RoundCollector`);
one that still finds the round unsent there (an overlapped round right after a restart) is kept
as a replica, as before. One for a round already mixed is late and is dropped (kept as a
replica, it would never be mixed). The first state of a neighbour for a
round counts and a second one for the same round (a resent state, of the same values) is
ignored. A neighbour that restarts after its state was summed stays in the round's sum.
"""

from __future__ import annotations

import numpy as np

from m3tgossip import protocol
from m3tgossip.consensus import ChocoMixer, Mixer, axpy_into, squared_distance
from m3tgossip.daemon.exchange import Exchange
from m3tgossip.daemon.influence import NeighbourInfluence
from m3tgossip.daemon.peers import Peer
from m3tgossip.daemon.state import NodeState
from m3tgossip.topology import node_weights

Row = dict[str, float]


class RoundSums:
    """Per shared component, the weighted sum of the states heard for the round being mixed."""

    def __init__(self, state: NodeState, exchange: Exchange, mixer: Mixer) -> None:
        self.state = state
        self.exchange = exchange
        node = state
        g = node.config.gossip
        self.mixer = mixer if isinstance(mixer, ChocoMixer) else None
        #: states are summed as they arrive (see the module docstring); False: all are kept
        self.enabled = (
            self.mixer is not None and g.noise_strength == 0 and not node.config.faults.attack
        )
        #: the static rows (a time-varying round passes its own)
        self.weights = {c: node_weights(node.topology, node.id, c) for c in node.shared}
        #: each neighbour's first-order effect on the node's held-out loss (`daemon.influence`)
        self.influence = NeighbourInfluence()
        #: the round being summed, and the last round mixed (-1: none)
        self.round = -1
        self.closed = -1
        #: per component: the sum (kept from round to round, the size of the component), the
        #: first state while it is the only one, the weight of every neighbour in the sum,
        #: every neighbour heard, the largest squared distance from a state heard to this
        #: node's published copy
        self.totals: dict[str, np.ndarray] = {}
        self.first: dict[str, np.ndarray] = {}
        self.terms: dict[str, Row] = {}
        self.heard: dict[str, set[str]] = {}
        self.dist_sq: dict[str, float] = {}

    def _summable(self, peer: Peer, msg: protocol.Message, time_varying: bool) -> bool:
        """A full state that no replica needs to outlive."""
        if not self.enabled or msg.type is not protocol.MsgType.STATE:
            return False
        if self.state.join_round == self.state.mixing_round:
            return False  # a joining node's first mix reads every neighbour's replica
        return peer.sends_states or time_varying

    def early(self, peer: Peer, msg: protocol.Message, time_varying: bool) -> bool:
        """A state to sum for the round being mixed that came before this node sent that
        round: it waits with the early messages until the node collects the round."""
        mixing = self.state.mixing_round
        return (
            self._summable(peer, msg, time_varying)
            and msg.round == mixing != self.exchange.sent_round
            and mixing != self.closed
        )

    def takes(self, peer: Peer, msg: protocol.Message, time_varying: bool) -> bool:
        """The message is summed (`add`) instead of applied to `peer`'s replicas: a full state
        that no replica needs to outlive, for the round being summed or a round already mixed."""
        if not self._summable(peer, msg, time_varying):
            return False
        mixing = self.state.mixing_round
        return (
            msg.round < mixing
            or msg.round == self.closed
            or msg.round == mixing == self.exchange.sent_round
        )

    def add(self, peer: Peer, msg: protocol.Message, row: Row | None) -> bool:
        """Add a full state from `peer` to the sums with its weight in `row` (None: the static
        row); True if it was for the round being mixed, False if late (dropped)."""
        node = self.state
        if msg.round != node.mixing_round or msg.round == self.closed:
            return False
        if msg.round != self.round:
            self._reset()
            self.round = msg.round
        taken = False
        for name, tensor in self.exchange.tensors(peer, msg):
            taken = True
            peer.noise[name] = msg.meta[name].noise
            peer.versions[name] = msg.meta[name].base + 1
            peer.heard[name] = msg.round
            peer.replicas.pop(name, None)  # a state replaces the replica (this one is summed)
            heard = self.heard.setdefault(name, set())
            if peer.id in heard:
                continue  # resent: its values are summed already
            heard.add(peer.id)
            value = np.asarray(tensor, dtype=node.shared[name].dtype)
            dist = squared_distance(value, self.exchange.published[name])
            self.dist_sq[name] = max(self.dist_sq.get(name, 0.0), dist)
            weights = self.weights[name] if row is None else row
            if peer.joins_round == msg.round:
                continue  # a node's values of the round it joins at: heard, not mixed
            if peer.id in weights and peer.id != node.id:
                self._add_term(name, peer.id, weights[peer.id], value)
                assert self.mixer is not None
                coefficient = self.mixer.coefficient(weights[peer.id])
                self.influence.add(peer.id, name, coefficient, value, self.exchange.published[name])
        return taken

    def _add_term(self, comp: str, pid: str, weight: float, value: np.ndarray) -> None:
        assert self.mixer is not None
        terms = self.terms.setdefault(comp, {})
        if not terms:
            self.first[comp] = value
            terms[pid] = weight
            return
        total = self.totals.get(comp)
        if total is None:
            own = self.state.shared[comp]
            total = self.totals[comp] = np.empty(own.shape, own.dtype)
        first = self.first.pop(comp, None)
        if first is not None:
            (first_id,) = terms
            coefficient = self.mixer.coefficient(terms[first_id])
            np.multiply(first, coefficient, out=total, casting="same_kind")
        axpy_into(total, self.mixer.coefficient(weight), value)
        terms[pid] = weight

    def summed(self, comp: str) -> set[str]:
        """The neighbours whose state of `comp` is in the sum of the round being mixed."""
        if self.round != self.state.mixing_round:
            return set()
        return self.heard.get(comp, set())

    def distance_sq(self, comp: str) -> float:
        """The largest squared distance from a summed state of `comp` to the published copy."""
        return self.dist_sq.get(comp, 0.0) if self.summed(comp) else 0.0

    def mix_into(
        self,
        comp: str,
        x: np.ndarray,
        published: np.ndarray,
        replicas: dict[str, np.ndarray],
        weights: Row,
    ) -> bool:
        """Mix `comp` from the round's sum, the held `replicas` heard this round added to it;
        `weights` is the round's row renormalised over every neighbour heard. False (and `x`
        untouched) if the sum holds nothing of `comp`: then the mixer mixes the replicas."""
        if not self.summed(comp) or not self.terms.get(comp):
            return False
        assert self.mixer is not None
        terms = self.terms[comp]
        first = self.first.get(comp)
        if first is not None:  # one state summed: the mixer mixes it with the replicas
            (first_id,) = terms
            heard = {**replicas, first_id: first}
            self.mixer.mix_into(x, published, heard, weights, self.state.id)
            return True
        for pid in sorted(replicas):
            if pid in weights and pid != self.state.id:
                self._add_term(comp, pid, weights[pid], replicas[pid])
        weight_sum = sum(weights[j] for j in sorted(terms))
        self.mixer.mix_sum_into(x, published, self.totals[comp], weight_sum)
        return True

    def close(self) -> None:
        """The round being mixed is mixed: what comes for it later is late."""
        self.closed = self.state.mixing_round
        self._reset()

    def _reset(self) -> None:
        self.round = -1
        self.first.clear()
        self.terms.clear()
        self.heard.clear()
        self.dist_sq.clear()
