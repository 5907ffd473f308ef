"""The contract between the node daemon and what it trains.

The daemon owns sockets, rounds, mixing and checkpoints; a workload owns the model (or the plain
vectors of the consensus workload). They meet in flat numpy arrays: one 1-D array per shared
component that this node holds. The daemon mixes these arrays in place, then calls `after_mix`
so the workload can write them back into its model.

A workload may also train privately, with per-learner DP-SGD, through three optional methods:
`private_training_plan()` returns a `m3tgossip.privacy.TrainingPlan` (sampling rate, steps per
round) or None, `trained_components()` names every component it trains (shared or local), and
`use_private_training(noise)` takes the `m3tgossip.privacy.TrainingNoise` the daemon calibrated
from the node's profile. Its releases are then post-processing: the daemon's gate charges the
round's steps and adds no noise of its own.

For `gossip.influence_every` (which neighbours help), a workload offers `loss_gradient()`,
its held-out loss and that loss's gradient per shared component at the current values (or
None), and `heldout_loss()`, the same loss at whatever values `shared()` holds; both are
computed on the node and never sent (`m3tgossip.daemon.influence`).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Workload(Protocol):
    """What a node trains or averages, as the daemon sees it: flat shared arrays and hooks.

    Implementations take `(topology, node_id, seed, options)` (see `make_workload`); a bad
    option raises ValueError naming it.
    """

    #: name written into metrics and summaries
    name: str
    #: True if `shared()` is learned from the node's own records (then the node's privacy
    #: profile clips and noises what it sends)
    private_data: bool

    def model_id(self) -> str:
        """Identity of the base model and component layout; peers with another id are rejected."""

    def shared(self) -> dict[str, np.ndarray]:
        """The node's shared state: component name -> flat, C-contiguous 1-D array.

        The daemon mixes these arrays in place; the same array objects are returned every call.
        Only components this node holds with policy `shared` appear here.
        """

    def local_step(self, round_: int) -> dict[str, Any]:
        """Local work for one round (training steps); returns metrics to record for the round."""

    def after_mix(self, round_: int) -> None:
        """Called after the daemon changed the arrays of `shared()`; sync them into the model."""

    def evaluate(self, round_: int) -> dict[str, Any]:
        """Metrics to record this round (may be empty on rounds that do not evaluate)."""

    def state(self) -> dict[str, np.ndarray]:
        """Everything needed to resume, as arrays: shared and local parameters, optimiser state."""

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore from `state()` output (after a restart)."""
