"""The replica protocol of one node: what its neighbours hold of it (the published copy, one
version per component), the deltas and full states that keep those replicas in step, and the
neighbours' replicas it builds from what arrives.

Everything sent from here is computed from the node's shared arrays after the round's release
(`m3tgossip.daemon.engine`), from the published copy, or from neighbours' messages: never from
a private value that did not pass the node's release gate.

A single-learner node with cancelling noise (`m3tgossip.privacy.cancel`) keeps one replica
chain per neighbour: neighbour j holds the published copy plus j's mask of the last round
(`masks`), so its deltas are the published change plus the change of its mask, and a full
state it is sent is masked with that same mask. What it sends is never the published copy
itself once anything was released.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from m3tgossip import protocol
from m3tgossip.consensus import add_into, estimate_noise_var
from m3tgossip.daemon.link import Link
from m3tgossip.daemon.peers import Peer
from m3tgossip.daemon.state import NodeState
from m3tgossip.log import get_logger
from m3tgossip.net import malicious_value

log = get_logger(__name__)

MsgType = protocol.MsgType


class Exchange:
    """Sends this node's components and applies its neighbours' to their replicas."""

    def __init__(self, state: NodeState, link: Link) -> None:
        self.state = state
        self.link = link
        node = state
        shared = node.shared
        g = node.config.gossip
        self.codecs = {
            c: protocol.parse_codec(str(g.compress.get(c, g.compression))) for c in shared
        }
        #: what every neighbour holds of this node (the published copy), and its version
        self.published = {c: np.zeros_like(x) for c, x in shared.items()}
        self.version = {c: 0 for c in shared}
        #: the round this node last sent (its published copy is that round's); -1 before
        self.sent_round = -1
        #: the neighbours in the order this node sends to them: spec order from the one after
        #: this node, wrapping round, so that in a round every node is some sender's first
        #: receiver instead of all senders queueing for the same neighbours
        n = len(node.topology.nodes)
        me = node.spec.index
        self.send_order = sorted(
            node.peers.values(), key=lambda p: (node.topology.node(p.id).index - me) % n
        )
        #: declared DP noise std of this node's last release per component
        self.noise_std = {c: 0.0 for c in shared}
        #: cancelling noise: per component, the mask each neighbour's replica of this node
        #: holds and that edge's std (None: every neighbour holds the published copy)
        self.cancel = node.gate.cancel if node.gate is not None else None
        self.masks: dict[str, dict[str, np.ndarray]] = {c: {} for c in shared}
        self.mask_std: dict[str, dict[str, float]] = {c: {} for c in shared}
        #: every codec is raw and nothing needs deltas (no release gate, no noise estimated
        #: from deltas, no attack): a round sends full states, which cost what raw deltas
        #: cost, and no replica outlives the mix it was received for (`drop_replicas`)
        self.full_states = (
            all(codec.name == "raw" for codec in self.codecs.values())
            and node.gate is None
            and g.noise_strength == 0
            and not node.config.faults.attack
        )
        #: on a fresh start, the shared values this node starts from and their digests: a
        #: neighbour that starts from the same values (a common checkpoint) builds its replica of
        #: this node from its own copy instead of receiving a full `state` (not kept by a node
        #: that sends full states: its neighbours get its state every round anyway)
        self.origin: dict[str, np.ndarray] = {}
        self.origin_digest: dict[str, str] = {}
        if node.resumed_from is None:
            for comp, x in shared.items():
                self.published[comp][...] = x
                if not self.full_states:
                    self.origin[comp] = x.copy()
                    self.origin_digest[comp] = protocol.values_digest(x)

    # ----------------------------------------------------------------------------- start-up

    def hello(self, peer: Peer, answer: bool = False) -> bool:
        """Send a `hello` (an answer to one with `answer`); False if the link refused it."""
        node = self.state
        body = {
            "model": node.model_id,
            "components": list(peer.components),
            "listen": self.link.transport.endpoint,
            "round": node.round,
            "answer": answer,
        }
        origin = {c: self.origin_digest[c] for c in peer.components if c in self.origin_digest}
        if origin:
            body["origin"] = origin
        if self.full_states:
            body["states"] = True
        return self.link.send(peer, MsgType.HELLO, body)

    def match_origin(self, peer: Peer, origin: dict[str, str]) -> None:
        """Components both nodes started from the same values need no first `state`: this
        node's replica of the neighbour starts at version 0 from its own copy, and the
        neighbour builds its replica of this node the same way while this node has sent nothing.
        A neighbour that sends full states every round needs neither."""
        if peer.sends_states:
            return
        for comp in peer.components:
            if comp not in self.origin_digest or origin.get(comp) != self.origin_digest[comp]:
                continue
            if comp not in peer.replicas:
                peer.replicas[comp] = self.origin[comp].copy()
                peer.versions[comp] = 0
            if self.version[comp] == 0:
                peer.need_state.discard(comp)

    def forget_origin(self) -> None:
        """Drop the copy of the starting values once every neighbour has been matched against
        it: a neighbour that comes later gets full state (its hellos find no `origin` here)."""
        self.origin.clear()
        self.origin_digest.clear()

    # ----------------------------------------------------------------------------- sending

    def send(self) -> None:
        """This round's values to every neighbour: full states (`full_states`) or deltas."""
        if self.full_states:
            self.send_states([p.id for p in self.send_order])
        else:
            self.send_round()
        self.sent_round = self.state.round

    def drop_replicas(self, every: bool = False) -> None:
        """Forget what neighbours sent once it is mixed: from those whose hello said they send
        full states every round, or from `every` neighbour (a time-varying topology)."""
        for peer in self.state.peers.values():
            if every or peer.sends_states:
                peer.replicas.clear()

    def send_round(self) -> None:
        """Delta of every shared component against the published copy; state where needed."""
        node = self.state
        if node.config.faults.attack:
            self.send_attack()
            return
        deltas: dict[str, np.ndarray] = {}
        metas: dict[str, protocol.TensorMeta] = {}
        #: cancelling noise: per component, each neighbour's change of mask this round
        moved: dict[str, dict[str, np.ndarray]] = {}
        for comp, x in node.shared.items():
            if comp in node.retired:
                continue
            delta = x - self.published[comp]  # a fresh array: safe to send without copying
            if self.cancel is not None and node.gate is not None:
                masks, self.mask_std[comp] = node.gate.edge_masks(comp)
                old = self.masks[comp]
                moved[comp] = {p: m - old[p] if p in old else m for p, m in masks.items()}
                self.masks[comp] = masks
                self.published[comp] += delta
                x[...] = self.published[comp]  # goes on from what it released
                self.version[comp] += 1
                deltas[comp] = delta
                continue
            payload, meta, decoded = self.codecs[comp].encode(
                comp, delta, self.version[comp], self.noise_std[comp]
            )
            self.published[comp] += decoded  # what the codec lost stays for later rounds
            if node.gate is not None:
                x[...] = self.published[comp]  # a private node goes on from what it released
            self.version[comp] += 1
            deltas[comp] = payload
            metas[comp] = meta
        copies: dict[str, np.ndarray] = {}  # one copy of a published value for every state
        for peer in self.send_order:
            if not peer.components or not peer.model_ok:
                continue
            live = [c for c in peer.components if c in deltas]
            state = sorted(peer.need_state & set(live))
            rest = [c for c in live if c not in peer.need_state]
            if rest:
                tensors = {c: deltas[c] for c in rest}
                meta = {c: metas[c] for c in rest if c not in moved}
                for c in rest:
                    if c in moved:  # this neighbour's chain: the published change, its mask's
                        tensors[c] = deltas[c] + moved[c][peer.id]
                        meta[c] = protocol.TensorMeta(
                            c,
                            str(tensors[c].dtype),
                            tensors[c].shape,
                            base=self.version[c] - 1,
                            noise=self.mask_std[c][peer.id],
                        )
                self.link.send(peer, MsgType.DELTA, {}, tensors=tensors, meta=meta)
            if state:
                for c in state:
                    if c not in copies and c not in moved:
                        copies[c] = self.published[c].copy()
                self.send_state(peer, state, copies)

    def send_state(
        self, peer: Peer, comps: list[str], values: dict[str, np.ndarray] | None = None
    ) -> None:
        """Full state of `comps` as the neighbours' replica has it (already public); `values`,
        if given, is a copy of the published values to send (shared by several sends). With
        cancelling noise, the published copy plus this neighbour's mask (nothing before its
        first mask once anything was released)."""
        comps = [c for c in comps if c not in self.state.retired]
        if self.cancel is not None:
            comps = [c for c in comps if self.version[c] == 0 or peer.id in self.masks[c]]
        if not comps:
            return
        fresh = values is None  # the published arrays themselves, changed in place later
        if values is None:
            values = {c: self.published[c] for c in comps}
        tensors: dict[str, np.ndarray] = {}
        noise: dict[str, float] = {}
        for c in comps:
            mask = self.masks[c].get(peer.id) if self.cancel is not None else None
            if mask is None:  # no mask: the published copy (public at version 0), a copy
                tensors[c] = values[c].copy() if fresh else values[c]
                noise[c] = self.noise_std[c]
            else:  # what this neighbour's chain holds: the published copy and its mask
                tensors[c] = self.published[c] + mask
                noise[c] = self.mask_std[c][peer.id]
        meta = {
            c: protocol.TensorMeta(
                c, str(t.dtype), t.shape, base=self.version[c] - 1, noise=noise[c]
            )
            for c, t in tensors.items()
        }
        body = {"reason": "replica reset"}
        if self.link.send(peer, MsgType.STATE, body, tensors=tensors, meta=meta):
            peer.need_state -= set(comps)

    def send_states(self, out_peers: list[str]) -> None:
        """Full state to `out_peers`: this round's out-peers of a time-varying topology (links
        change every round, so there are no replica chains to keep), or every neighbour in
        rounds of full states."""
        node = self.state
        if self.cancel is not None:  # refused at start (single_learner.check_settings)
            raise RuntimeError(f"{node.id}: full states cannot carry cancelling noise")
        for comp, x in node.shared.items():
            # a new array every round, never written to: every send of the round shares it
            # (frames are sent without copying) and it is the published copy the mix reads
            self.published[comp] = x.copy()
            self.version[comp] += 1
        self.sent_round = node.round
        for pid in out_peers:
            peer = node.peers.get(pid)
            if peer is not None and peer.model_ok and peer.components:
                self.send_state(peer, list(peer.components), self.published)

    def send_attack(self) -> None:
        """Byzantine mode: claim a malicious full state every round instead of honest deltas."""
        node = self.state
        if self.cancel is not None:  # refused at start (single_learner.check_settings)
            raise RuntimeError(f"{node.id}: an attack cannot carry cancelling noise")
        f = node.config.faults
        values: dict[str, np.ndarray] = {}
        for comp, x in node.shared.items():
            seen = {p.id: p.replicas[comp] for p in node.peers.values() if comp in p.replicas}
            values[comp] = malicious_value(f.attack, f.attack_scale, x, seen)
            self.version[comp] += 1
        self.sent_round = node.round
        for peer in node.peers.values():
            if not peer.components or not peer.model_ok:
                continue
            tensors = {c: values[c] for c in peer.components}
            meta = {
                c: protocol.TensorMeta(c, str(t.dtype), t.shape, base=self.version[c] - 1)
                for c, t in tensors.items()
            }
            body = {"reason": "replica reset"}
            self.link.send(peer, MsgType.STATE, body, tensors=tensors, meta=meta)

    def retire(self, comp: str, epsilon: float) -> None:
        """The privacy budget of `comp` is spent: keep training it here, never send it again."""
        node = self.state
        node.retired.add(comp)
        log.warning(
            "%s: privacy budget of %s spent (epsilon %.3g); it is no longer shared",
            node.id,
            comp,
            epsilon,
        )
        for peer in node.peers.values():
            if comp in peer.components:
                body = {"components": [comp], "reason": "privacy budget spent"}
                self.link.send(peer, MsgType.RETIRE, body)

    # ----------------------------------------------------------------------------- receiving

    def tensors(self, peer: Peer, msg: protocol.Message) -> list[tuple[str, np.ndarray]]:
        """The tensors of a `delta` or `state` this node can take from `peer`: components
        both share, in the shape of this node's; the others are logged and left out."""
        node = self.state
        out = []
        for name, tensor in msg.tensors.items():
            if name not in peer.components:
                log.warning(
                    "%s: ignored %s from %s: component not shared between us",
                    node.id,
                    name,
                    peer.id,
                )
                continue
            own = node.shared[name]
            if tensor.shape != own.shape:
                log.warning(
                    "%s: ignored %s from %s: shape %s, expected %s",
                    node.id,
                    name,
                    peer.id,
                    tensor.shape,
                    own.shape,
                )
                continue
            out.append((name, tensor))
        return out

    def apply(self, peer: Peer, msg: protocol.Message) -> list[str]:
        """Apply a `delta` or `state` to `peer`'s replicas; the components whose replica
        changed (each is then `fresh`). A delta for a replica version this node does not hold
        asks the neighbour for its state."""
        node = self.state
        gaps: list[str] = []
        changed: list[str] = []
        for name, tensor in self.tensors(peer, msg):
            own = node.shared[name]
            base = msg.meta[name].base
            peer.noise[name] = msg.meta[name].noise
            if msg.type is MsgType.DELTA and node.config.gossip.noise_strength > 0:
                estimates = peer.noise_estimates.setdefault(name, deque(maxlen=8))
                estimates.append(estimate_noise_var([tensor]))
            if msg.type is MsgType.STATE:
                # the received values themselves (read-only, no copy) until a delta changes them
                peer.replicas[name] = np.asarray(tensor, dtype=own.dtype)
                peer.versions[name] = base + 1
            elif peer.versions.get(name) == base and name in peer.replicas:
                replica = peer.replicas[name]
                if not replica.flags.writeable:
                    replica = peer.replicas[name] = replica.copy()
                add_into(replica, tensor)
                peer.versions[name] = base + 1
            else:
                gaps.append(name)
                peer.replicas.pop(name, None)
                peer.versions.pop(name, None)
                continue
            changed.append(name)
            peer.heard[name] = msg.round
            peer.fresh.add(name)
        if gaps:
            self.ask_resync(
                peer, f"delta for a replica version this node does not have ({', '.join(gaps)})"
            )
        return changed

    def ask_resync(self, peer: Peer, reason: str) -> None:
        node = self.state
        if peer.resync_asked == node.round:
            return
        peer.resync_asked = node.round
        comps = [c for c in peer.components if c not in peer.replicas]
        if comps:
            self.link.send(peer, MsgType.RESYNC, {"components": comps, "reason": reason})
