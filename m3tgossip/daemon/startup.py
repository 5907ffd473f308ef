"""Bringing a node up: its release gate from the privacy profile, its transport (security
decided before any socket is bound), and the hello handshake with its neighbours."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from m3tgossip import protocol
from m3tgossip.daemon.config import NodeConfig
from m3tgossip.daemon.exchange import Exchange
from m3tgossip.daemon.link import Link, TransportLike
from m3tgossip.daemon.peers import Peer
from m3tgossip.daemon.rounds import POLL_SLICE_MS
from m3tgossip.daemon.single_learner import STD_KEY, cancel_gate
from m3tgossip.daemon.state import NodeState
from m3tgossip.errors import ConfigError
from m3tgossip.log import get_logger
from m3tgossip.net import FaultyTransport, Transport, for_node
from m3tgossip.privacy import ReleaseGate, profile_for, training_noise
from m3tgossip.topology import Topology
from m3tgossip.workloads import Workload

log = get_logger(__name__)

#: seconds between HELLO retries to a neighbour whose link took the last one unanswered (its
#: answer may have been refused by its own link, still connecting to this node)
HELLO_RETRY_S = 0.02
#: the longest that retry interval grows to (it doubles with every unanswered hello)
HELLO_RETRY_MAX_S = 0.25
#: seconds between HELLO tries to a neighbour whose link refused the last one (its connection
#: is not up yet: a DEALER with ZMQ_IMMEDIATE refuses until its handshake completed), when the
#: transport does not say when a link comes up; one that does (`link_state`) gets the hello as
#: soon as the link is up, and a try every HELLO_RETRY_MAX_S all the same
HELLO_REFUSED_RETRY_S = 0.01
#: seconds between HELLO tries of a node a stage adds while no neighbour has it in its graph
JOIN_RETRY_S = 1.0


class JoinTimeout(RuntimeError):
    """A node a stage adds heard from no neighbour within `gossip.join_wait_s`."""


def make_gate(
    config: NodeConfig, topology: Topology, workload: Workload, shared: dict[str, np.ndarray]
) -> ReleaseGate | None:
    """The release gate of a node whose workload learns from private records under a profile
    that is not `open`; None otherwise. A workload that trains with DP-SGD
    (`private_training_plan()` not None) is given its calibrated noise
    (`use_private_training`) and the gate charges its steps instead of noising releases.
    `[privacy] profile` in the node config overrides the spec's profile (e.g. "open" for a run
    on synthetic data); the other keys of that table are the `custom` profile's. A node whose
    spec entry says `single_learner` gets the gate of `m3tgossip.daemon.single_learner`
    (cancelling noise, whatever the workload and profile; none for "local") and no DP-SGD."""
    spec = topology.node(config.id)
    table = {k: v for k, v in config.privacy.items() if k not in ("profile", STD_KEY)}
    name = str(config.privacy.get("profile", spec.privacy))
    try:
        profile = profile_for(name, table or None)
    except ValueError as exc:
        raise ConfigError(config.topology, f'node "{config.id}" privacy', str(exc)) from exc
    if spec.single_learner is not None:
        return cancel_gate(config, topology, profile, shared)
    if STD_KEY in config.privacy:
        raise ConfigError(
            config.topology,
            f'node "{config.id}" privacy.{STD_KEY}',
            'only for a node with single_learner = "cancel" in the topology',
        )
    if not getattr(workload, "private_data", False) or profile.is_open:
        return None
    rounds = config.rounds or None
    training = None
    plan_of = getattr(workload, "private_training_plan", None)
    plan = plan_of() if plan_of is not None else None
    if plan is not None:  # the workload trains with DP-SGD: calibrate its noise, hand it over
        try:
            training = training_noise(profile, plan, rounds, workload.trained_components())
        except ValueError as exc:
            raise ConfigError(config.topology, f'node "{config.id}" privacy', str(exc)) from exc
        try:
            workload.use_private_training(training)
        except ValueError as exc:  # a workload setting that DP-SGD cannot honour
            raise ConfigError(config.topology, f'node "{config.id}" workload', str(exc)) from exc
        if plan.sampling_rate >= 1.0:
            log.warning(
                "%s: every learner is in every DP-SGD step (too few learners for the batch "
                "size): no amplification by sampling, noise multiplier %.1f; a node that holds "
                "one learner protects that learner only with noise this large",
                config.id,
                training.noise_multiplier,
            )
        log.info(
            "%s: DP-SGD at noise multiplier %.3f, sampling rate %.3f, %d steps a round "
            "(epsilon %g at delta %g for %s rounds)",
            config.id,
            training.noise_multiplier,
            plan.sampling_rate,
            plan.steps_per_round,
            profile.epsilon,
            profile.delta,
            rounds or "unplanned",
        )
    return ReleaseGate(
        profile,
        spec.modalities,
        {c: x.size for c, x in shared.items()},
        rounds_planned=rounds,
        training=training,
    )


def open_transport(config: NodeConfig, topology: Topology, peers: dict[str, Peer]) -> TransportLike:
    """Bind the node's ZeroMQ transport (CURVE unless refused), with fault injection if asked."""
    spec = topology.node(config.id)
    bind = config.bind
    if not bind:
        if spec.port is None:
            raise ConfigError(
                str(topology.source),
                f'node "{config.id}"',
                "has no port in the topology; pass --bind",
            )
        bind = spec.endpoint
    neighbours = {p.id: p.endpoint for p in peers.values() if p.endpoint}
    # decided (and refused) before any socket is bound
    secure = for_node(
        config.id,
        topology,
        bind,
        neighbours,
        key_dir=config.key_dir,
        status_keys=config.status_keys,
        insecure=config.insecure,
    )
    transport: TransportLike = Transport(config.id, bind, neighbours, config.transport, secure)
    if config.faults.active:
        log.warning("%s: injecting faults %s", config.id, config.faults)
        transport = FaultyTransport(transport, config.faults)
    if config.faults.attack:
        log.warning("%s: running as a Byzantine node (attack %r)", config.id, config.faults.attack)
    if config.faults.slowed:
        log.warning(
            "%s: local steps slowed down %gx plus %g s (faults.slowdown, a measurement aid)",
            config.id,
            config.faults.slowdown,
            config.faults.slowdown_s,
        )
    return transport


def handshake(
    state: NodeState, link: Link, exchange: Exchange, poll: Callable[[int], None]
) -> None:
    """Say hello until every neighbour answered or the grace period ran out, then join the
    neighbours' round if this node is behind them.

    A fresh node that a stage of the spec adds (`add_nodes`) starts at that stage's round,
    before its neighbours get there: they take it into their graph only at that round. It
    waits up to `gossip.join_wait_s` for the first of them that was there before the stage to
    answer (trying every JOIN_RETRY_S) and stops with an error if none does; the grace period
    counts from then.

    An answer proves both directions of the link work: a DEALER refuses what it is given
    before its connection is up, so rounds start only once messages can arrive. A refused
    hello is tried again when its link comes up, one the link took after HELLO_RETRY_S
    (doubling up to HELLO_RETRY_MAX_S), so a node whose neighbours are all up is through in a
    few round trips.
    """
    g = state.config.gossip
    deadline = time.monotonic() + g.startup_grace_s
    #: a node a stage adds, before any neighbour answered: waiting for its stage to begin
    joining = state.join_round is not None and state.resumed_from is None and bool(state.peers)
    join_deadline = time.monotonic() + g.join_wait_s
    peers = list(state.peers.values())
    next_hello = {p.id: 0.0 for p in peers}
    wait_answer = {p.id: HELLO_RETRY_S for p in peers}
    refused: set[str] = set()
    #: what the transport knows of its links ("up" once a link's handshake is done)
    links = getattr(link.transport, "link_state", None)
    retry_refused = HELLO_REFUSED_RETRY_S if links is None else HELLO_RETRY_MAX_S
    next_beat = 0.0
    while state.stop_reason is None and time.monotonic() < deadline:
        missing = [p for p in peers if not p.answered and p.model_ok]
        if not missing:
            break
        now = time.monotonic()
        if joining:
            # a neighbour there before the stage answers once it reached the stage's round (a
            # node joining with this one answers at once: it says nothing of the others)
            if any(p.answered for p in peers if p.joins_round != state.join_round):
                joining = False
                deadline = now + g.startup_grace_s  # the others are reaching the stage too
            elif now >= join_deadline:
                raise JoinTimeout(
                    f"{state.id}: joins at round {state.join_round}, but no neighbour "
                    f"({', '.join(p.id for p in peers)}) answered within "
                    f"gossip.join_wait_s = {g.join_wait_s:g} s"
                )
            else:
                deadline = now + g.startup_grace_s
        for peer in missing:
            came_up = peer.id in refused and links is not None and links.get(peer.id) == "up"
            if now >= next_hello[peer.id] or came_up:
                took = exchange.hello(peer)
                pause = wait_answer[peer.id] if took else retry_refused
                next_hello[peer.id] = now + (max(pause, JOIN_RETRY_S) if joining else pause)
                if took:
                    wait_answer[peer.id] = min(HELLO_RETRY_MAX_S, 2 * wait_answer[peer.id])
                    refused.discard(peer.id)
                else:
                    refused.add(peer.id)
        if now >= next_beat:
            # neighbours already in their first round keep waiting for a node still
            # starting, instead of giving it up as silent
            for peer in peers:
                if peer.answered:
                    link.send(peer, protocol.MsgType.HEARTBEAT, {"round": state.round})
            next_beat = now + g.heartbeat_s
        wait_s = min(next_hello[p.id] for p in missing) - time.monotonic()
        poll(max(1, min(POLL_SLICE_MS, int(wait_s * 1000))))
    silent = [p.id for p in peers if not p.answered]
    if silent:
        log.warning("%s: starting without hello from %s", state.id, ", ".join(silent))
    else:
        exchange.forget_origin()  # every neighbour compared its starting values with ours
    # A node that restarts behind its neighbours joins them at their round; so does a
    # fresh node that starts well after them (a late joiner). A fresh node only a few
    # rounds behind runs those rounds: its neighbours are waiting for its messages.
    ahead = max((p.round for p in peers if p.model_ok), default=-1)
    lag = 0 if state.resumed_from is not None else g.late_join_rounds
    if ahead > state.round + lag:
        log.info(
            "%s: neighbours are at round %d; joining there (was %d)", state.id, ahead, state.round
        )
        state.round = ahead
