"""Single-learner nodes in the daemon: the release gate of a node whose topology entry says
`single_learner`, and the settings under which its cancelling noise cancels.

`single_learner = "cancel"`: the node trains without DP-SGD and sends each neighbour its value
plus a per-edge mask; the masks sum to zero with the neighbours' mixing weights
(`m3tgossip.privacy.cancel`). `single_learner = "local"`: the node shares no component (the
spec says so, so its neighbours do not mix with it) and, releasing nothing, trains without
DP-SGD.

The cancellation is exact only if the masks are mixed as they were drawn: the node and every
neighbour of it mix with the `mean` mixer over static Metropolis-Hastings weights (no
noise-aware weights) at `gamma = 1`, in lockstep rounds, and the node sends raw values.
`check_settings` refuses, with an error naming the node and the setting, a single-learner
node whose own settings break that (push-sum, overlapped or time-varying schedules, a lossy
codec, the clip or trimmed mixer, noise-aware weights, an attack) and a node with a
cancelling neighbour whose mixing would not cancel its masks.
"""

from __future__ import annotations

import numpy as np

from m3tgossip.daemon.config import NodeConfig
from m3tgossip.errors import ConfigError
from m3tgossip.log import get_logger
from m3tgossip.privacy import CancellingNoise, PrivacyProfile, ReleaseGate
from m3tgossip.privacy.cancel import DEFAULT_STD
from m3tgossip.topology import Topology, node_weights

log = get_logger(__name__)

#: the node config key of the masks' std (`[privacy] cancel_noise`)
STD_KEY = "cancel_noise"


def _refuse(config: NodeConfig, setting: str, why: str) -> ConfigError:
    return ConfigError(config.topology, f'node "{config.id}" {setting}', why)


def cancel_gate(
    config: NodeConfig,
    topology: Topology,
    profile: PrivacyProfile,
    shared: dict[str, np.ndarray],
) -> ReleaseGate | None:
    """The release gate of a single-learner node: cancelling noise for `cancel`, None for
    `local` (it releases nothing). ConfigError for a component it cannot mask."""
    spec = topology.node(config.id)
    if spec.single_learner == "local":
        if shared:
            raise _refuse(
                config,
                "single_learner",
                f'"local" keeps every component on the node, but the workload shares '
                f"{', '.join(sorted(shared))}",
            )
        if STD_KEY in config.privacy:
            raise _refuse(config, f"privacy.{STD_KEY}", 'only for single_learner = "cancel"')
        log.info("%s: single_learner = local: no component leaves this node", config.id)
        return None
    std = config.privacy.get(STD_KEY, DEFAULT_STD)
    rows = {}
    for comp in shared:
        row = node_weights(topology, config.id, comp)
        rows[comp] = {j: w for j, w in row.items() if j != config.id}
    try:
        cancel = CancellingNoise(config.id, rows, std)
    except ValueError as exc:
        raise _refuse(config, 'single_learner = "cancel"', str(exc)) from exc
    log.warning(
        "%s: single_learner = cancel: no differential privacy (profile %s's epsilon is not "
        "claimed); every message carries per-edge noise of std >= %g that cancels in the "
        "network mean: it hides one message from one honest-but-curious neighbour, not from "
        "neighbours that pool their messages",
        config.id,
        profile.name,
        cancel.std,
    )
    if config.insecure:
        log.warning(
            "%s: plaintext links: whoever reads all of a round's messages of this node can "
            "remove its cancelling noise",
            config.id,
        )
    return ReleaseGate(
        profile, spec.modalities, {c: x.size for c, x in shared.items()}, cancel=cancel
    )


def check_settings(
    config: NodeConfig, topology: Topology, shared: dict[str, np.ndarray], time_varying: bool
) -> None:
    """Refuse settings under which cancelling noise would not cancel (see the module)."""
    g = config.gossip
    spec = topology.node(config.id)
    if spec.single_learner == "cancel":
        setting = 'single_learner = "cancel"'
        bad = [
            (g.mode == "push-sum", 'gossip.mode = "push-sum"', "push-sum shares are not mixed"),
            (g.overlap, "gossip.overlap = true", "only the lockstep schedule is supported"),
            (time_varying, "[dynamics]", "the weights change every round"),
            (g.aggregator != "mean", f'gossip.aggregator = "{g.aggregator}"', "not linear"),
            (g.noise_strength > 0, "gossip.noise_strength", "the weights are no longer the spec's"),
            (bool(config.faults.attack), "faults.attack", "an attacker sends no masks"),
            (
                g.straggler_after > 0,
                f"gossip.straggler_after = {g.straggler_after}",
                "a loose link mixes out of step",
            ),
        ]
        codecs = {str(g.compress.get(c, g.compression)) for c in shared}
        bad.append((codecs != {"raw"} and bool(shared), "a lossy codec", "masks must go raw"))
        for broken, other, why in bad:
            if broken:
                raise _refuse(
                    config,
                    setting,
                    f"cannot cancel its noise with {other} ({why}); "
                    "use lockstep rounds, the mean mixer, raw values",
                )
    cancelling = sorted(
        j
        for j in topology.neighbours(config.id)
        if topology.node(j).single_learner == "cancel"
        and set(topology.node(j).shared_components) & set(shared)
    )
    if not cancelling:
        return
    mine = [
        (g.aggregator != "mean", f'gossip.aggregator = "{g.aggregator}"'),
        (g.noise_strength > 0, f"gossip.noise_strength = {g.noise_strength}"),
        (g.gamma != 1.0, f"gossip.gamma = {g.gamma}"),
        (g.mode == "push-sum", 'gossip.mode = "push-sum"'),
        (g.overlap, "gossip.overlap = true"),
        (g.straggler_after > 0, f"gossip.straggler_after = {g.straggler_after}"),
    ]
    for broken, setting in mine:
        if broken:
            raise _refuse(
                config,
                setting,
                f'neighbour {cancelling[0]} has single_learner = "cancel", whose noise cancels '
                "only if its neighbours mix it in lockstep with the mean mixer, the spec's "
                "weights and gamma = 1",
            )
