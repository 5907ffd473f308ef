"""The node daemon: one loop that works locally, exchanges with neighbours, mixes, checkpoints.

A round (sync mode) is: local work (`Workload.local_step`), one message to every neighbour with
the delta of each shared component against the replica the neighbours hold (CHOCO-style; a
`state` message instead where a neighbour lost its replica), collection of the neighbours'
messages for the same round until all expected ones arrived or the deadline passed (never
forever), mixing over the replicas with Metropolis-Hastings weights re-normalised over the
neighbours heard from, a checkpoint, and one JSON line of metrics.

Messages that arrive early (a neighbour already in the next round) wait in a bounded queue and
are applied when this node reaches that round, so both ends of an edge always mix the same pair
of replica versions and the network mean is preserved exactly. A malformed message is logged
with its reason and dropped; nothing a peer sends can raise out of the loop.

Push-sum mode runs asynchronous ticks instead: each tick a node keeps a share of its (value,
weight) pair and pushes equal shares to its neighbours, absorbing whatever has arrived.

This one thread owns the sockets. Signals only set a flag that the loop checks between polls.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from m3tgossip import protocol
from m3tgossip.consensus import (
    PushSum,
    add_into,
    choco_mix_into,
    clipped_mix_into,
    effective_noise_var,
    estimate_noise_var,
    noise_aware_weights,
    renormalise,
    trimmed_mean_into,
)
from m3tgossip.daemon import checkpoint
from m3tgossip.daemon.config import NodeConfig
from m3tgossip.daemon.metrics import MetricsWriter
from m3tgossip.errors import ConfigError, ProtocolError
from m3tgossip.log import get_logger
from m3tgossip.net import FaultyTransport, Transport, malicious_value
from m3tgossip.net import for_node as node_security
from m3tgossip.privacy import DeltaPrivatizer, profile_for
from m3tgossip.protocol import parse_codec
from m3tgossip.topology import Topology, load_topology, node_weights, round_plan
from m3tgossip.workloads import make_workload
from m3tgossip.workloads.base import Workload

log = get_logger(__name__)

#: early messages buffered per neighbour before the oldest are dropped (and a resync asked)
MAX_PENDING = 64
#: seconds between HELLO retries while waiting for neighbours at start-up
HELLO_RETRY_S = 0.25
#: longest single poll, so signals and heartbeats are noticed promptly
POLL_SLICE_MS = 50


@dataclass
class Peer:
    """What this node knows about one neighbour."""

    id: str
    endpoint: str
    components: tuple[str, ...]
    session: str | None = None
    #: it answered one of our hellos: our link to it works (and its link to us)
    answered: bool = False
    last_seq: int = -1
    model_ok: bool = True
    left: bool = False
    missed: int = 0
    last_heard: float = 0.0
    round: int = -1
    replicas: dict[str, np.ndarray] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    heard: dict[str, int] = field(default_factory=dict)
    pending: list[protocol.Message] = field(default_factory=list)
    need_state: set[str] = field(default_factory=set)
    resync_asked: int = -1
    bytes_in: int = 0
    bytes_out: int = 0
    dropped_out: int = 0
    #: per component: declared DP noise std of its last delta, recent estimates of its variance
    noise: dict[str, float] = field(default_factory=dict)
    noise_estimates: dict[str, deque] = field(default_factory=dict)
    #: push-sum running sums: everything ever sent to it, and the last totals received from
    #: it (whose value parts live in `replicas`); a lost push is made good by the next one
    push_sent: dict[str, np.ndarray] = field(default_factory=dict)
    push_sent_w: dict[str, float] = field(default_factory=dict)
    push_recv_w: dict[str, float] = field(default_factory=dict)

    def reset(self, session: str | None) -> None:
        """A new incarnation of the neighbour: forget its replicas, send it full state."""
        self.session = session
        self.last_seq = -1
        self.replicas.clear()
        self.versions.clear()
        self.heard.clear()
        self.pending.clear()
        self.need_state = set(self.components)
        self.left = False
        self.missed = 0
        self.push_sent.clear()
        self.push_sent_w.clear()
        self.push_recv_w.clear()


class Node:
    """One daemon. `run()` blocks until the rounds are done or a signal arrives."""

    def __init__(
        self,
        config: NodeConfig,
        topology: Topology | None = None,
        workload: Workload | None = None,
    ) -> None:
        self.config = config
        self.topology = topology or load_topology(config.topology)
        self.spec = self.topology.node(config.id)
        self.id = config.id
        self.session = protocol.new_session()
        self.seq = 0
        self.round = 0
        self.started = time.time()
        self.stop_reason: str | None = None
        self.workload: Workload = workload or make_workload(
            config.workload,
            topology=self.topology,
            node_id=self.id,
            seed=config.seed,
            options=config.workload_options,
        )
        self.model_id = self.workload.model_id()
        self.shared = self.workload.shared()
        held = set(self.shared)
        self.peers: dict[str, Peer] = {}
        for nid in self.topology.neighbours(self.id):
            spec = self.topology.node(nid)
            common = tuple(sorted(held & set(spec.shared_components)))
            self.peers[nid] = Peer(nid, spec.endpoint if spec.port else "", common)
        self.weights = {c: node_weights(self.topology, self.id, c) for c in self.shared}
        self.out_replica = {c: np.zeros_like(x) for c, x in self.shared.items()}
        self.out_version = {c: 0 for c in self.shared}
        self.ps: dict[str, PushSum] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.rejected = 0
        self.resumed_from: int | None = None
        #: arrival delays (s) of neighbours' round messages after this node's round started
        self.latencies: deque[float] = deque(maxlen=64)
        #: rounds this session has completed
        self.rounds_done = 0
        #: differential privacy of outgoing updates (None: open profile or nothing private)
        self.privatizer: DeltaPrivatizer | None = None
        # `[privacy] profile` overrides the spec's profile for this node (e.g. "open" for a
        # run on synthetic data); the other keys are the `custom` profile's table
        table = {k: v for k, v in config.privacy.items() if k != "profile"}
        profile_name = str(config.privacy.get("profile", self.spec.privacy))
        try:
            profile = profile_for(profile_name, table or None)
        except ValueError as exc:
            raise ConfigError(config.topology, f'node "{self.id}" privacy', str(exc)) from exc
        if getattr(self.workload, "private_data", False) and not profile.is_open:
            self.privatizer = DeltaPrivatizer(
                profile,
                self.spec.modalities,
                {c: x.size for c, x in self.shared.items()},
                rounds_planned=config.rounds or None,
            )
        self.noise_std: dict[str, float] = {c: 0.0 for c in self.shared}
        g = config.gossip
        self.codecs = {c: parse_codec(str(g.compress.get(c, g.compression))) for c in self.shared}
        #: components whose privacy budget is spent: trained on, never sent again
        self.retired: set[str] = set()
        self.round_started = time.monotonic()
        self.isolated: set[str] = set()
        self._collecting = False
        #: time-varying topology: this round's mixing row (self and in-peers)
        self.dynamic = self.topology.dynamics != "static"
        self._row: dict[str, float] = {}
        #: rounds between sending a round and mixing it: 1 with `gossip.overlap` (the previous
        #: round is mixed after this round's training), else 0
        self.lag = 1 if (g.overlap and g.mode == "sync" and not self.dynamic) else 0
        if g.overlap and not self.lag:
            log.warning(
                "%s: gossip.overlap applies to sync mode on static topologies; ignored", self.id
            )
        self._resume()
        self.checkpoints = checkpoint.Writer(self.config.state_path)
        for peer in self.peers.values():
            peer.need_state = set(peer.components)
        #: on a fresh start, the shared values this node starts from and their digests: a
        #: neighbour that starts from the same values (a common checkpoint) builds its replica of
        #: this node from its own copy instead of receiving a full `state`
        self.origin: dict[str, np.ndarray] = {}
        self.origin_digest: dict[str, str] = {}
        if self.resumed_from is None:
            for comp, x in self.shared.items():
                self.origin[comp] = x.copy()
                self.origin_digest[comp] = protocol.values_digest(x)
                self.out_replica[comp][...] = x

    # ----------------------------------------------------------------------------- start-up

    def _resume(self) -> None:
        if self.config.fresh:
            return
        found = checkpoint.load(self.config.state_path)
        if found is None:
            return
        arrays, meta = found
        if meta.get("model_id") != self.model_id:
            raise RuntimeError(
                f"{self.config.state_path}/{checkpoint.FILENAME}: checkpoint is for model "
                f"{meta.get('model_id')!r}, this node runs {self.model_id!r}; "
                "use --fresh to start over"
            )
        self.workload.load_state(arrays)
        self.round = int(meta["round"])
        if self.privatizer is not None and meta.get("privacy"):
            self.privatizer.load(meta["privacy"])
        self.retired = set(meta.get("retired", []))
        self.resumed_from = self.round
        log.info("%s: resumed from checkpoint at round %d", self.id, self.round)

    def _bind_endpoint(self) -> str:
        if self.config.bind:
            return self.config.bind
        if self.spec.port is None:
            raise RuntimeError(f"node {self.id} has no port in {self.topology.source}; pass --bind")
        return self.spec.endpoint

    def _install_signals(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            self.stop_reason = signal.Signals(signum).name

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # ----------------------------------------------------------------------------- messaging

    def _message(
        self, type_: protocol.MsgType, body: dict[str, Any], **kw: Any
    ) -> protocol.Message:
        self.seq += 1
        return protocol.Message(
            type=type_,
            sender=self.id,
            session=self.session,
            seq=self.seq,
            round=self.round,
            body=body,
            **kw,
        )

    def _send(self, peer: Peer, msg: protocol.Message) -> bool:
        frames = protocol.encode(msg)
        ok = self.transport.send(peer.id, frames)
        if ok:
            n = protocol.frames_nbytes(frames)
            peer.bytes_out += n
            self.bytes_out += n
        else:
            peer.dropped_out += 1
        return ok

    def _hello(self, peer: Peer, answer: bool = False) -> None:
        body = {
            "model": self.model_id,
            "components": list(peer.components),
            "listen": self.transport.endpoint,
            "round": self.round,
            "answer": answer,
        }
        origin = {c: self.origin_digest[c] for c in peer.components if c in self.origin_digest}
        if origin:
            body["origin"] = origin
        self._send(peer, self._message(protocol.MsgType.HELLO, body))

    def _poll(self, timeout_ms: int) -> None:
        for routing_id, frames, user in self.transport.poll(timeout_ms):
            self._handle(routing_id, frames, user)

    def _handle(self, routing_id: bytes, frames: list[Any], user: str | None = None) -> None:
        """Decode, authenticate against the routing id and the link's key (`user`, the node id
        ZAP gave the connection; None on plaintext), check session and sequence, dispatch."""
        who = routing_id.decode("utf-8", "replace")[:64]
        try:
            msg = protocol.decode(frames)
        except ProtocolError as exc:
            self.rejected += 1
            log.warning("%s: dropped message from %r: %s", self.id, who, exc)
            return
        if msg.type is protocol.MsgType.STATUS_REQUEST:
            self._reply_status(routing_id)
            return
        if msg.sender != who:
            self.rejected += 1
            log.warning(
                "%s: dropped %s: header says sender %r, link is %r",
                self.id,
                msg.type.value,
                msg.sender,
                who,
            )
            return
        if user is not None and msg.sender != user:
            self.rejected += 1
            log.warning(
                "%s: dropped %s: header says sender %r, link authenticated the key of %r",
                self.id,
                msg.type.value,
                msg.sender,
                user,
            )
            return
        peer = self.peers.get(msg.sender)
        if peer is None:
            self.rejected += 1
            log.warning(
                "%s: dropped %s from %r: not a neighbour in the topology",
                self.id,
                msg.type.value,
                who,
            )
            return
        size = protocol.frames_nbytes(frames)
        peer.bytes_in += size
        self.bytes_in += size
        if msg.session != peer.session:
            if peer.session is not None:
                log.info("%s: %s restarted (new session %s)", self.id, peer.id, msg.session[:8])
            peer.reset(msg.session)
            # A new incarnation needs our session and round; a hello gets its answer below.
            if msg.type is not protocol.MsgType.HELLO:
                self._hello(peer)
        elif msg.seq <= peer.last_seq:
            self.rejected += 1
            log.warning(
                "%s: dropped %s from %s: sequence %d not after %d (replay or duplicate)",
                self.id,
                msg.type.value,
                peer.id,
                msg.seq,
                peer.last_seq,
            )
            return
        peer.last_seq = msg.seq
        peer.last_heard = time.monotonic()
        peer.missed = 0
        handler = self._handlers.get(msg.type)
        if handler is None:
            log.warning(
                "%s: dropped %s from %s: not expected by a node", self.id, msg.type.value, peer.id
            )
            return
        handler(self, peer, msg)

    def _on_hello(self, peer: Peer, msg: protocol.Message) -> None:
        """A neighbour (re)started or answers ours: check its model, note its round, answer."""
        if msg.body["model"] != self.model_id:
            if peer.model_ok:
                log.error(
                    "%s: rejecting neighbour %s: it runs model %r, this node runs %r",
                    self.id,
                    peer.id,
                    msg.body["model"],
                    self.model_id,
                )
            peer.model_ok = False
            if not msg.body.get("answer", False):
                # the neighbour learns this node's model from the answer and stops too, even
                # if its own hellos to this node were lost
                self._hello(peer, answer=True)
            return
        peer.model_ok = True
        peer.round = max(peer.round, msg.round)
        self._match_origin(peer, msg.body.get("origin", {}))
        if msg.body.get("answer", False):
            peer.answered = True
        else:
            self._hello(peer, answer=True)

    def _match_origin(self, peer: Peer, origin: dict[str, str]) -> None:
        """Components both nodes started from the same values need no first `state`: this
        node's replica of the neighbour starts at version 0 from its own copy, and the
        neighbour builds its replica of this node the same way while this node has sent nothing."""
        for comp in peer.components:
            if comp not in self.origin_digest or origin.get(comp) != self.origin_digest[comp]:
                continue
            if comp not in peer.replicas:
                peer.replicas[comp] = self.origin[comp].copy()
                peer.versions[comp] = 0
            if self.out_version[comp] == 0:
                peer.need_state.discard(comp)

    def _on_update(self, peer: Peer, msg: protocol.Message) -> None:
        """`delta` or `state` for round `msg.round`: apply now, or hold until we get there."""
        peer.round = max(peer.round, msg.round)
        if not peer.model_ok:
            return
        if msg.round > self.mixing_round:
            if len(peer.pending) >= MAX_PENDING:
                peer.pending.pop(0)
                peer.replicas.clear()
                peer.versions.clear()
                self._ask_resync(peer, "early-message queue overflow")
            peer.pending.append(msg)
            return
        self._apply(peer, msg)

    def _apply(self, peer: Peer, msg: protocol.Message) -> None:
        gaps: list[str] = []
        # one arrival delay per neighbour and round, none from this session's first round: its
        # arrivals measure how far apart the daemons came up, not the network
        timed = (
            self.rounds_done > 0
            and msg.round == self.mixing_round
            and not any(peer.heard.get(c) == msg.round for c in peer.components)
        )
        for name, tensor in msg.tensors.items():
            if name not in peer.components:
                log.warning(
                    "%s: ignored %s from %s: component not shared between us",
                    self.id,
                    name,
                    peer.id,
                )
                continue
            own = self.shared[name]
            if tensor.shape != own.shape:
                log.warning(
                    "%s: ignored %s from %s: shape %s, expected %s",
                    self.id,
                    name,
                    peer.id,
                    tensor.shape,
                    own.shape,
                )
                continue
            base = msg.meta[name].base
            peer.noise[name] = msg.meta[name].noise
            if msg.type is protocol.MsgType.DELTA and self.config.gossip.noise_strength > 0:
                peer.noise_estimates.setdefault(name, deque(maxlen=8)).append(
                    estimate_noise_var([tensor])
                )
            if msg.type is protocol.MsgType.STATE:
                peer.replicas[name] = np.array(tensor, dtype=own.dtype)
                peer.versions[name] = base + 1
            elif peer.versions.get(name) == base and name in peer.replicas:
                add_into(peer.replicas[name], tensor)
                peer.versions[name] = base + 1
            else:
                gaps.append(name)
                peer.replicas.pop(name, None)
                peer.versions.pop(name, None)
                continue
            if timed:
                self.latencies.append(time.monotonic() - self.round_started)
                timed = False
            peer.heard[name] = msg.round
        if gaps:
            self._ask_resync(
                peer, f"delta for a replica version this node does not have ({', '.join(gaps)})"
            )

    def _ask_resync(self, peer: Peer, reason: str) -> None:
        if peer.resync_asked == self.round:
            return
        peer.resync_asked = self.round
        comps = [c for c in peer.components if c not in peer.replicas]
        if comps:
            self._send(
                peer,
                self._message(protocol.MsgType.RESYNC, {"components": comps, "reason": reason}),
            )

    def _on_resync(self, peer: Peer, msg: protocol.Message) -> None:
        """The neighbour lost our replica of some components: send them as full state, at once
        while this node is collecting a round (its replica is then this round's), else next."""
        peer.need_state |= set(msg.body["components"]) & set(peer.components)
        if self._collecting and peer.need_state:
            self._send_state(peer, sorted(peer.need_state))

    def _on_heartbeat(self, peer: Peer, msg: protocol.Message) -> None:
        peer.round = max(peer.round, msg.round)

    def _on_leave(self, peer: Peer, msg: protocol.Message) -> None:
        """The neighbour stops: stop waiting for it and forget its replicas until it returns."""
        log.info("%s: neighbour %s left (%s)", self.id, peer.id, msg.body["reason"])
        peer.reset(None)
        peer.left = True

    def _on_retire(self, peer: Peer, msg: protocol.Message) -> None:
        """The neighbour stops sharing some components (privacy budget spent): stop expecting
        them from it and mix them without it from now on."""
        gone = set(msg.body["components"])
        log.info(
            "%s: %s no longer shares %s (%s)",
            self.id,
            peer.id,
            ", ".join(sorted(gone)),
            msg.body["reason"],
        )
        peer.components = tuple(c for c in peer.components if c not in gone)
        for comp in gone:
            peer.replicas.pop(comp, None)
            peer.versions.pop(comp, None)

    def _on_push(self, peer: Peer, msg: protocol.Message) -> None:
        """Push-sum running sums: absorb what they grew by since the last one from this peer."""
        weights = msg.body.get("weights", {})
        for name, total in msg.tensors.items():
            if (
                name not in self.ps
                or name not in peer.components
                or total.shape != self.shared[name].shape
            ):
                continue
            total_w = float(weights.get(name, 0.0))
            seen = peer.replicas.get(name)
            seen_w = peer.push_recv_w.get(name, 0.0)
            if total_w < seen_w:
                continue  # an older total (cannot happen on one link; ignore it if it does)
            self.ps[name].absorb(total - seen if seen is not None else total, total_w - seen_w)
            peer.replicas[name] = np.array(total, dtype=np.float64)
            peer.push_recv_w[name] = total_w
            peer.heard[name] = msg.round

    _handlers = {
        protocol.MsgType.HELLO: _on_hello,
        protocol.MsgType.DELTA: _on_update,
        protocol.MsgType.STATE: _on_update,
        protocol.MsgType.RESYNC: _on_resync,
        protocol.MsgType.HEARTBEAT: _on_heartbeat,
        protocol.MsgType.LEAVE: _on_leave,
        protocol.MsgType.PUSH: _on_push,
        protocol.MsgType.RETIRE: _on_retire,
    }

    def _reply_status(self, routing_id: bytes) -> None:
        msg = self._message(protocol.MsgType.STATUS, {"state": self.status()})
        self.transport.reply(routing_id, protocol.encode(msg))

    def status(self) -> dict[str, Any]:
        """What `m3tgossip status` prints: a JSON-able summary of this node."""
        now = time.monotonic()
        return {
            "node": self.id,
            "session": self.session,
            "pid": os.getpid(),
            "endpoint": self.transport.endpoint,
            "workload": self.workload.name,
            "model": self.model_id,
            "mode": self.config.gossip.mode,
            "round": self.round,
            "rounds": self.config.rounds,
            "uptime_s": round(time.time() - self.started, 3),
            "resumed_from": self.resumed_from,
            "components": {c: int(x.size) for c, x in self.shared.items()},
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "rejected": self.rejected,
            "neighbours": {
                p.id: {
                    "session": p.session,
                    "round": p.round,
                    "left": p.left,
                    "model_ok": p.model_ok,
                    "missed_rounds": p.missed,
                    "heard_s_ago": round(now - p.last_heard, 3) if p.last_heard else None,
                    "bytes_in": p.bytes_in,
                    "bytes_out": p.bytes_out,
                }
                for p in self.peers.values()
            },
        }

    # ----------------------------------------------------------------------------- the loop

    def run(self) -> int:
        """Bind, announce READY, run rounds, shut down cleanly. Returns the exit code."""
        self._install_signals()
        bind = self._bind_endpoint()
        neighbours = {p.id: p.endpoint for p in self.peers.values() if p.endpoint}
        # decided (and refused) before any socket is bound
        secure = node_security(self.config, self.topology, bind, neighbours)
        self.transport = Transport(self.id, bind, neighbours, self.config.transport, secure)
        if self.config.faults.active:
            log.warning("%s: injecting faults %s", self.id, self.config.faults)
            self.transport = FaultyTransport(self.transport, self.config.faults)
        if self.config.faults.attack:
            log.warning(
                "%s: running as a Byzantine node (attack %r)", self.id, self.config.faults.attack
            )
        self.metrics = MetricsWriter(self.config.metrics_path)
        ready = {
            "node": self.id,
            "endpoint": self.transport.endpoint,
            "session": self.session,
            "pid": os.getpid(),
            "round": self.round,
            "workload": self.workload.name,
        }
        print("READY " + json.dumps(ready, separators=(",", ":")), flush=True)
        if self.config.gossip.mode == "push-sum":
            # ready before the first hello: a neighbour may push while this node starts up
            self.ps = {c: PushSum(x.astype(np.float64)) for c, x in self.shared.items()}
        try:
            if self.config.gossip.mode != "local":
                self._startup()
            if self.config.gossip.mode == "push-sum":
                self._run_push_sum()
            else:
                self._run_sync()
        finally:
            self._shutdown()
        return 0

    def _done(self) -> bool:
        return self.stop_reason is not None or (0 < self.config.rounds <= self.round)

    def _startup(self) -> None:
        """Say hello until every neighbour answered or the grace period ran out.

        An answer proves both directions of the link work: a DEALER drops what it is given
        before its connection is up, so rounds start only once messages can arrive.
        """
        deadline = time.monotonic() + self.config.gossip.startup_grace_s
        next_hello = 0.0
        while self.stop_reason is None and time.monotonic() < deadline:
            missing = [p for p in self.peers.values() if not p.answered and p.model_ok]
            if not missing:
                break
            if time.monotonic() >= next_hello:
                for peer in missing:
                    self._hello(peer)
                # neighbours already in their first round keep waiting for a node still
                # starting, instead of giving it up as silent
                for peer in self.peers.values():
                    if peer.answered:
                        self._send(
                            peer, self._message(protocol.MsgType.HEARTBEAT, {"round": self.round})
                        )
                next_hello = time.monotonic() + HELLO_RETRY_S
            self._poll(POLL_SLICE_MS)
        silent = [p.id for p in self.peers.values() if not p.answered]
        if silent:
            log.warning("%s: starting without hello from %s", self.id, ", ".join(silent))
        # A node that restarts behind its neighbours joins them at their round; so does a
        # fresh node that starts well after them (a late joiner). A fresh node only a few
        # rounds behind runs those rounds: its neighbours are waiting for its messages.
        ahead = max((p.round for p in self.peers.values() if p.model_ok), default=-1)
        lag = 0 if self.resumed_from is not None else self.config.gossip.late_join_rounds
        if ahead > self.round + lag:
            log.info(
                "%s: neighbours are at round %d; joining there (was %d)", self.id, ahead, self.round
            )
            self.round = ahead

    def _run_sync(self) -> None:
        """Rounds of: local training, send, wait for the round, mix (evaluate, checkpoint).

        With `lag` 1 (`gossip.overlap`): local training, wait for the previous round (its
        messages arrived during training), mix it, send this round.
        """
        g = self.config.gossip
        exchange = g.mode != "local"
        while not self._done():
            t0 = time.perf_counter()
            before = None
            if self.privatizer is not None and exchange:
                before = {c: x.copy() for c, x in self.shared.items() if c not in self.retired}
            local = self.workload.local_step(self.round)
            t1 = time.perf_counter()
            heard: list[str] = []
            distance = float("nan")
            if not exchange:
                if self.stop_reason is not None:
                    break
                self.workload.after_mix(self.round)
                t_send = t_wait = t_mix = 0.0
            elif self.lag:
                closed = (
                    self._collect(self.deadline())
                    if self.mixing_round >= 0
                    else self.stop_reason is None
                )
                t2 = time.perf_counter()
                if not closed:
                    break
                heard, distance = self._mix_overlapped(before)
                t3 = time.perf_counter()
                self._send_round(before)
                t_wait, t_mix, t_send = t2 - t1, t3 - t2, time.perf_counter() - t3
            else:
                self._send_round(before)
                t2 = time.perf_counter()
                closed = self._collect(self.deadline())
                t3 = time.perf_counter()
                if not closed:
                    break  # stopping: abandon the round, keep local progress
                heard, distance = self._mix()
                self.workload.after_mix(self.round)
                t_send, t_wait, t_mix = t2 - t1, t3 - t2, time.perf_counter() - t3
            t4 = time.perf_counter()
            evaluation = self.workload.evaluate(self.round)
            self.round += 1
            self.rounds_done += 1
            if self.round % g.checkpoint_every == 0 or self._done():
                self._checkpoint()
            t5 = time.perf_counter()
            timings = {
                "local": t1 - t0,
                "send": t_send,
                "wait": t_wait,
                "mix": t_mix,
                "eval_checkpoint": t5 - t4,
                "total": t5 - t0,
            }
            self._record(local, evaluation, heard, distance, timings)
        # the last round sent is mixed too, so a finished run ends as a lockstep run does
        if (
            self.lag
            and exchange
            and self.stop_reason is None
            and self.mixing_round >= 0
            and self._collect(self.deadline())
        ):
            self._mix_overlapped(None)

    def _mix_overlapped(self, before: dict[str, np.ndarray] | None) -> tuple[list[str], float]:
        """Mix the previous round after this round's training. `before` (the values before the
        training, for differential privacy) moves with the mix, so `x - before` stays the
        local update alone."""
        pre = {c: self.shared[c].copy() for c in before} if before is not None else None
        heard, distance = self._mix()
        if before is not None and pre is not None:
            for c in before:
                before[c] += self.shared[c] - pre[c]
        self.workload.after_mix(self.round)
        return heard, distance

    def _send_round(self, before: dict[str, np.ndarray] | None = None) -> None:
        """Delta of every shared component against the neighbours' replica; state where needed."""
        self.round_started = time.monotonic()
        if self.config.faults.attack:
            self._send_attack()
            return
        if self.dynamic:
            self._send_dynamic()
            return
        deltas: dict[str, np.ndarray] = {}
        metas: dict[str, protocol.TensorMeta] = {}
        for comp, x in self.shared.items():
            if comp in self.retired:
                continue
            if before is not None and comp in before:
                if not self.privatizer.can_share(comp):
                    self._retire(comp)
                    continue
                # Only the local update is private; the rest of the change since the last
                # release came from mixing neighbours' (already noised) replicas.
                released, std = self.privatizer.privatize(comp, x - before[comp])
                delta = before[comp] - self.out_replica[comp]
                delta += released
                self.noise_std[comp] = std
            else:
                delta = x - self.out_replica[comp]  # a fresh array: safe to send without copying
            payload, meta, decoded = self.codecs[comp].encode(
                comp, delta, self.out_version[comp], self.noise_std[comp]
            )
            self.out_replica[comp] += decoded  # what the codec lost stays for later rounds
            if before is not None and comp in before:
                x[...] = self.out_replica[comp]  # the node goes on from what it released
            self.out_version[comp] += 1
            deltas[comp] = payload
            metas[comp] = meta
        for peer in self.peers.values():
            if not peer.components or not peer.model_ok:
                continue
            live = [c for c in peer.components if c in deltas]
            state = sorted(peer.need_state & set(live))
            rest = [c for c in live if c not in peer.need_state]
            if rest:
                meta = {c: metas[c] for c in rest}
                msg = self._message(
                    protocol.MsgType.DELTA, {}, tensors={c: deltas[c] for c in rest}, meta=meta
                )
                self._send(peer, msg)
            if state:
                self._send_state(peer, state)

    def _send_state(self, peer: Peer, comps: list[str]) -> None:
        """Full state of `comps` as the neighbours' replica has it (already public)."""
        comps = [c for c in comps if c not in self.retired]
        if not comps:
            return
        tensors = {c: self.out_replica[c].copy() for c in comps}
        meta = {
            c: protocol.TensorMeta(
                c, str(t.dtype), t.shape, base=self.out_version[c] - 1, noise=self.noise_std[c]
            )
            for c, t in tensors.items()
        }
        msg = self._message(
            protocol.MsgType.STATE, {"reason": "replica reset"}, tensors=tensors, meta=meta
        )
        if self._send(peer, msg):
            peer.need_state -= set(comps)

    def _send_dynamic(self) -> None:
        """Time-varying topology: full state to this round's out-peers (links change every
        round, so there are no replica chains to keep)."""
        out, self._row = round_plan(self.topology, self.id, self.round, self.config.seed)
        for comp, x in self.shared.items():
            self.out_replica[comp][...] = x
            self.out_version[comp] += 1
        for pid in out:
            peer = self.peers.get(pid)
            if peer is not None and peer.model_ok and peer.components:
                self._send_state(peer, list(peer.components))

    def _retire(self, comp: str) -> None:
        """The privacy budget of `comp` is spent: keep training it here, never send it again."""
        self.retired.add(comp)
        log.warning(
            "%s: privacy budget of %s spent (epsilon %.3g); it is no longer shared",
            self.id,
            comp,
            self.privatizer.spent(comp) if self.privatizer else float("nan"),
        )
        for peer in self.peers.values():
            if comp in peer.components:
                body = {"components": [comp], "reason": "privacy budget spent"}
                self._send(peer, self._message(protocol.MsgType.RETIRE, body))

    def _send_attack(self) -> None:
        """Byzantine mode: claim a malicious full state every round instead of honest deltas."""
        f = self.config.faults
        values: dict[str, np.ndarray] = {}
        for comp, x in self.shared.items():
            seen = {p.id: p.replicas[comp] for p in self.peers.values() if comp in p.replicas}
            values[comp] = malicious_value(f.attack, f.attack_scale, x, seen)
            self.out_version[comp] += 1
        for peer in self.peers.values():
            if not peer.components or not peer.model_ok:
                continue
            tensors = {c: values[c] for c in peer.components}
            meta = {
                c: protocol.TensorMeta(c, str(t.dtype), t.shape, base=self.out_version[c] - 1)
                for c, t in tensors.items()
            }
            self._send(
                peer,
                self._message(
                    protocol.MsgType.STATE, {"reason": "replica reset"}, tensors=tensors, meta=meta
                ),
            )

    def deadline(self) -> float:
        """This round's deadline: median + k * MAD of recent arrival delays, within bounds."""
        g = self.config.gossip
        if len(self.latencies) < 8:
            return g.round_deadline_s
        lat = np.fromiter(self.latencies, dtype=np.float64)
        med = float(np.median(lat))
        mad = float(np.median(np.abs(lat - med)))
        return min(g.round_deadline_s, max(g.deadline_min_s, med + g.deadline_k * mad))

    def _expected(self) -> list[Peer]:
        return [
            p
            for p in self.peers.values()
            if p.components
            and p.model_ok
            and not p.left
            and p.missed < self.config.gossip.suspect_after
            and (not self.dynamic or p.id in self._row)
        ]

    @property
    def mixing_round(self) -> int:
        """The round whose messages this node collects and mixes now."""
        return self.round - self.lag

    def _round_heard(self, peer: Peer) -> bool:
        return all(peer.heard.get(c) == self.mixing_round for c in peer.components)

    def _collect(self, deadline_s: float) -> bool:
        """Wait for this round's messages. False if a stop signal arrived meanwhile."""
        g = self.config.gossip
        for peer in self.peers.values():
            due = [m for m in peer.pending if m.round <= self.mixing_round]
            if due:
                peer.pending = [m for m in peer.pending if m.round > self.mixing_round]
                for msg in due:
                    self._apply(peer, msg)
        start = time.monotonic()
        soft = start + deadline_s
        hard = start + deadline_s * g.max_wait_factor
        next_beat = start
        self._collecting = True
        try:
            while True:
                if self.stop_reason is not None:
                    return False
                expected = self._expected()
                # A neighbour already past this round will not send it any more (a message
                # of a link arrives in order, and a node at round R has sent every round before
                # R): what is missing from it was lost.
                waiting = [
                    p for p in expected if not self._round_heard(p) and p.round <= self.mixing_round
                ]
                if not waiting:
                    break
                now = time.monotonic()
                if now >= hard:
                    break
                if now >= soft:
                    heard_fraction = 1.0 - len(waiting) / max(1, len(expected))
                    alive = [p for p in waiting if now - p.last_heard < g.silence_s]
                    if not alive and heard_fraction >= g.quorum:
                        break
                if now >= next_beat:
                    for peer in self.peers.values():
                        self._send(
                            peer, self._message(protocol.MsgType.HEARTBEAT, {"round": self.round})
                        )
                    next_beat = now + g.heartbeat_s
                self._poll(min(POLL_SLICE_MS, max(1, int((hard - now) * 1000))))
        finally:
            self._collecting = False
        for peer in self.peers.values():
            if self.dynamic and peer.id not in self._row:
                continue
            if peer.components and not self._round_heard(peer):
                peer.missed += 1
                if peer.missed == g.suspect_after and not peer.left:
                    log.warning(
                        "%s: %s missed %d rounds; not waiting for it until it is heard again",
                        self.id,
                        peer.id,
                        peer.missed,
                    )
        self._check_isolation()
        self._poll(0)
        return True

    def _check_isolation(self) -> None:
        """Warn when no live neighbour is left for a component: its consensus is cut off here."""
        if self.dynamic:
            return  # a time-varying topology links other peers every round
        alive = {p.id for p in self._expected()}
        for comp in self.shared:
            holders = [p.id for p in self.peers.values() if comp in p.components]
            cut = bool(holders) and not (alive & set(holders))
            if cut and comp not in self.isolated:
                log.warning(
                    "%s: no live neighbour holds %s: this node's part of its holder graph is disconnected",
                    self.id,
                    comp,
                )
                self.isolated.add(comp)
            elif not cut:
                self.isolated.discard(comp)

    def _mix(self) -> tuple[list[str], float]:
        """CHOCO mixing over replicas heard this round; returns (heard ids, consensus distance)."""
        heard_any: set[str] = set()
        dist_sq = 0.0
        norm_sq = 0.0
        for comp, x in self.shared.items():
            if comp in self.retired:
                continue
            heard = {
                p.id
                for p in self.peers.values()
                if comp in p.replicas and p.heard.get(comp) == self.mixing_round
            }
            heard_any |= heard
            mine = self.out_replica[comp]
            replicas = {pid: self.peers[pid].replicas[comp] for pid in heard}
            for r in replicas.values():
                d = r - mine
                dist_sq = max(dist_sq, float(d @ d))
            norm_sq += float(mine @ mine)
            row = self._row if self.dynamic else self._noise_aware(comp)
            weights = renormalise(row, self.id, heard)
            aggregator = self.config.gossip.aggregator
            if aggregator == "mean" or not replicas:
                choco_mix_into(x, mine, replicas, weights, gamma=self.config.gossip.gamma)
            elif aggregator == "clip":
                clipped_mix_into(x, self.id, replicas, weights)
            else:
                trimmed_mean_into(x, replicas, self.config.gossip.trim)
        distance = math.sqrt(dist_sq / norm_sq) if norm_sq > 0 else math.sqrt(dist_sq)
        return sorted(heard_any), distance

    def _noise_aware(self, comp: str) -> dict[str, float]:
        """The Metropolis-Hastings row of `comp`, shrunk on edges to noisy neighbours."""
        strength = self.config.gossip.noise_strength
        row = self.weights[comp]
        if strength <= 0:
            return row
        var = {}
        for j in row:
            if j == self.id:
                continue
            peer = self.peers[j]
            estimates = peer.noise_estimates.get(comp)
            estimated = float(np.median(estimates)) if estimates else 0.0
            var[j] = effective_noise_var(peer.noise.get(comp, 0.0) ** 2, estimated)
        return noise_aware_weights(row, self.id, var, self.noise_std[comp] ** 2, strength)

    def _checkpoint(self, wait: bool = False) -> None:
        """Checkpoint this node: in the background (the next checkpoint waits for it), or now
        and durably with `wait` (shutdown)."""
        meta = {
            "node": self.id,
            "round": self.round,
            "model_id": self.model_id,
            "session": self.session,
            "time": time.time(),
            "privacy": self.privatizer.state() if self.privatizer else None,
            "retired": sorted(self.retired),
        }
        self.checkpoints.submit(self.workload.state(), meta)
        if wait:
            self.checkpoints.flush()

    def _record(
        self,
        local: dict[str, Any],
        evaluation: dict[str, Any],
        heard: list[str],
        distance: float,
        timings: dict[str, float],
    ) -> None:
        record = {
            "round": self.round - 1,
            "node": self.id,
            "session": self.session,
            "time": time.time(),
            "consensus_distance": distance,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "heard": heard,
            "neighbours": len([p for p in self.peers.values() if p.components]),
            "deadline_s": self.deadline(),
            **(
                {
                    "privacy": {
                        "node_epsilon": self.privatizer.node_epsilon(),
                        "epsilon": {c: self.privatizer.spent(c) for c in self.shared},
                        "retired": sorted(self.retired),
                    }
                }
                if self.privatizer
                else {}
            ),
            **({"isolated": sorted(self.isolated)} if self.isolated else {}),
            **(
                {"faults": self.transport.stats()}
                if isinstance(self.transport, FaultyTransport)
                else {}
            ),
            "timings": timings,
            **({"train": local} if local else {}),
            **evaluation,
        }
        self.metrics.write(record)

    def _run_push_sum(self) -> None:
        """Asynchronous push-sum ticks: keep a share, push equal shares, absorb what came in.

        What goes on the wire is the running sum of all shares ever pushed to that neighbour
        (Hadjicostis-Vaidya robust push-sum), so a lost or refused push loses no mass: the next
        one carries it, and the estimates converge to the exact mean over lossy links.
        """
        g = self.config.gossip
        while not self._done():
            t0 = time.perf_counter()
            before = {c: x.copy() for c, x in self.shared.items()}
            local = self.workload.local_step(self.round)
            for comp, x in self.shared.items():
                ps = self.ps[comp]
                ps.absorb((x - before[comp]) * ps.w, 0.0)  # local progress moves the estimate
            t1 = time.perf_counter()
            live = [p for p in self.peers.values() if p.components and p.model_ok and not p.left]
            outgoing: dict[str, tuple[np.ndarray, float]] = {}
            for comp, ps in self.ps.items():
                outgoing[comp] = ps.split(sum(comp in p.components for p in live))
            for peer in live:
                for c in peer.components:
                    share, share_w = outgoing[c]
                    if c in peer.push_sent:
                        peer.push_sent[c] += share
                    else:
                        peer.push_sent[c] = share.copy()
                    peer.push_sent_w[c] = peer.push_sent_w.get(c, 0.0) + share_w
                tensors = {c: peer.push_sent[c].copy() for c in peer.components}
                body = {"weights": {c: peer.push_sent_w[c] for c in peer.components}}
                self._send(peer, self._message(protocol.MsgType.PUSH, body, tensors=tensors))
            t2 = time.perf_counter()
            end = time.monotonic() + g.push_interval_s
            while self.stop_reason is None and time.monotonic() < end:
                self._poll(max(1, int((end - time.monotonic()) * 1000)))
            t3 = time.perf_counter()
            for comp, x in self.shared.items():
                x[...] = self.ps[comp].estimate()
            self.workload.after_mix(self.round)
            t4 = time.perf_counter()
            evaluation = self.workload.evaluate(self.round)
            self.round += 1
            if self.round % g.checkpoint_every == 0 or self._done():
                self._checkpoint()
            t5 = time.perf_counter()
            heard = sorted(p.id for p in self.peers.values() if self.round - 1 in p.heard.values())
            timings = {
                "local": t1 - t0,
                "send": t2 - t1,
                "wait": t3 - t2,
                "mix": t4 - t3,
                "eval_checkpoint": t5 - t4,
                "total": t5 - t0,
            }
            self._record(local, evaluation, heard, float("nan"), timings)

    def _shutdown(self) -> None:
        """Checkpoint, tell neighbours we leave, close sockets (bounded by linger)."""
        reason = self.stop_reason or "finished"
        try:
            self._checkpoint(wait=True)
        except OSError as exc:
            log.error("%s: final checkpoint failed: %s", self.id, exc)
        for peer in self.peers.values():
            self._send(peer, self._message(protocol.MsgType.LEAVE, {"reason": reason}))
        self.metrics.close()
        self.transport.close(int(self.config.gossip.leave_timeout_s * 1000))
        log.info("%s: stopped at round %d (%s)", self.id, self.round, reason)


def run_node(config: NodeConfig) -> int:
    """Entry point of `m3tgossip node`."""
    node = Node(config)
    return node.run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: m3tgossip node --topology FILE --id NODE")
