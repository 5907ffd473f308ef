"""The built-in federation: each node's own multi-modal records, from its topology entry alone.

A node calls `node_data(node, config)` and gets its own train and test records, generated from
its topology entry and the federation seed: no node needs another node's data and no server
hands data out. The node's institution (`institutions`) sets the population, its learners
(`learners`, with the node's label skew) carry the latent profile, and each modality is
rendered from that profile with its own noise (`text`, `clickstream`, `tabular`, `signals`,
`handwriting`), so the modalities carry the signal the tasks need.

Modalities a node does not collect are absent (zeros, `present` False) for all its records;
within the modalities it collects, text and signal are missing for some records (no reflection
written, wearable not worn), never all modalities of a record. Tasks a node does not serve
have label -1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from m3tgossip.edu.data.clickstream import sessions
from m3tgossip.edu.data.config import ROLE_SCALE, DataConfig
from m3tgossip.edu.data.draws import entropy
from m3tgossip.edu.data.handwriting import handwritten_answers
from m3tgossip.edu.data.institutions import Institution, institution_profile
from m3tgossip.edu.data.learners import draw_learners, node_share, skewed_learners
from m3tgossip.edu.data.records import EduData
from m3tgossip.edu.data.schema import MODALITIES, TASKS
from m3tgossip.edu.data.signals import signal_windows
from m3tgossip.edu.data.tabular import tabular_features
from m3tgossip.edu.data.text import reflections

#: unseen learners per institution that every node is also tested on (`unseen_data`)
UNSEEN_RECORDS = 300
#: records of learners like the node's own that it never trained on (`nonmember_data`)
NONMEMBER_RECORDS = 500

if TYPE_CHECKING:
    from m3tgossip.topology import Topology


class NodeLike(Protocol):
    """What the generator reads of a topology node (`m3tgossip.topology.spec.NodeSpec` fits)."""

    @property
    def id(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def institution(self) -> str | None: ...
    @property
    def modalities(self) -> tuple[str, ...]: ...
    @property
    def tasks(self) -> tuple[str, ...]: ...


def node_records(node: NodeLike, config: DataConfig) -> int:
    """How many records (train + test) the node generates: `config.records` scaled by role."""
    if node.role not in ROLE_SCALE:
        raise ValueError(f'node "{node.id}": unknown role {node.role!r}')
    return max(4, round(config.records * ROLE_SCALE[node.role]))


def _presence(
    node: NodeLike, inst: Institution, rng: np.random.Generator, n: int
) -> dict[str, np.ndarray]:
    """Modality -> which of the n records have it: what the node collects, less the missing
    reflections and recordings, and never no modality at all in a record."""
    collected = set(node.modalities)
    present = {m: np.full(n, m in collected) for m in MODALITIES}
    present["text"] &= rng.random(n) >= inst.text_missing
    present["signal"] &= rng.random(n) >= inst.signal_missing
    nothing = ~np.any([present[m] for m in MODALITIES], axis=0)
    for m in ("text", "signal"):
        present[m] |= nothing & (m in collected)
    return present


def node_data(node: NodeLike, config: DataConfig) -> tuple[EduData, EduData]:
    """The node's own (train, test) records, from its topology entry and the federation seed."""
    _check_node(node)
    n = node_records(node, config)
    n_test = min(max(1, round(n * config.test_fraction)), n - 1)
    inst = institution_profile(node.institution or node.id, config.seed)
    rng = np.random.default_rng(np.random.SeedSequence(entropy(config.seed, "node", node.id)))
    people = skewed_learners(inst, config, rng, n)
    is_test = np.zeros(n, bool)
    is_test[rng.permutation(n)[:n_test]] = True
    data = _render(node, inst, people, is_test, rng)
    return data.subset(~is_test), data.subset(is_test)


def unseen_data(node: NodeLike, config: DataConfig, n: int = UNSEEN_RECORDS) -> EduData:
    """n records of learners the node never saw, drawn from its institution's population.

    They follow the institution's own label proportions (no node skew) and the node's
    modalities and tasks, and every node of one institution gets the same learners: the test
    of how well a node's model serves its institution's next cohort, which neither the node
    nor any neighbour trained on. Handwritten answers use the held-out digit images.
    """
    _check_node(node)
    name = node.institution or node.id
    inst = institution_profile(name, config.seed)
    rng = np.random.default_rng(np.random.SeedSequence(entropy(config.seed, "unseen", name)))
    people = draw_learners(inst, rng, n)
    # presence and rendering follow the node's modalities, from the node's own stream
    node_rng = np.random.default_rng(
        np.random.SeedSequence(entropy(config.seed, "unseen-node", node.id))
    )
    return _render(node, inst, people, np.ones(n, bool), node_rng)


def nonmember_data(node: NodeLike, config: DataConfig, n: int = NONMEMBER_RECORDS) -> EduData:
    """n records drawn as the node's own training records are, of learners it never saw.

    The non-members of a membership-inference attack on the node: the same label skew (the
    node's own Dirichlet draw), modalities, tasks and missingness as its training records, and
    handwritten answers from the same pool of digit images, so that whatever tells a member
    from one of these is the training, not a shift of distribution. The node's held-out test
    records are not that: they draw their digits from images that no training record uses.
    New learners come from a stream of their own, so neither `node_data` nor `unseen_data`
    changes.
    """
    _check_node(node)
    inst = institution_profile(node.institution or node.id, config.seed)
    own = np.random.default_rng(np.random.SeedSequence(entropy(config.seed, "node", node.id)))
    share = node_share(inst, config, own)  # the first draw of the node's stream: its skew
    rng = np.random.default_rng(np.random.SeedSequence(entropy(config.seed, "nonmember", node.id)))
    people = skewed_learners(inst, config, rng, n, share=share)
    return _render(node, inst, people, np.zeros(n, bool), rng)


def _check_node(node: NodeLike) -> None:
    unknown = [m for m in node.modalities if m not in MODALITIES]
    unknown += [t for t in node.tasks if t not in TASKS]
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise ValueError(f'node "{node.id}": the built-in education data has no {names}')


def _render(
    node: NodeLike,
    inst: Institution,
    people: dict[str, np.ndarray],
    is_test: np.ndarray,
    rng: np.random.Generator,
) -> EduData:
    """The records of `people` in the node's modalities, with labels of the node's tasks."""
    n = len(is_test)
    present = _presence(node, inst, rng, n)
    clickstream, next_response = sessions(inst, people, rng)
    image, handwriting = handwritten_answers(inst, people, is_test, rng)
    text = [
        t if p else "" for t, p in zip(reflections(inst, people, rng), present["text"], strict=True)
    ]
    arrays = {
        "image": image,
        "signal": signal_windows(people, rng),
        "clickstream": clickstream,
        "tabular": tabular_features(inst, people, rng),
    }
    for m, array in arrays.items():
        array[~present[m]] = 0
    labels = {
        "at_risk": people["at_risk"],
        "engagement": people["engagement_level"],
        "stress": people["stress_label"],
        "handwriting": handwriting,
        "next_response": next_response,
    }
    return EduData(
        text=text,
        **arrays,
        present=present,
        labels={t: labels[t] if t in node.tasks else np.full(n, -1, np.int64) for t in TASKS},
        groups={
            "gender": people["gender"],
            "first_generation": np.where(people["first_generation"], "yes", "no").astype("<U16"),
            "language": people["language"],
            "disability": np.where(people["disability"], "yes", "no").astype("<U16"),
        },
    )


def pooled_data(topology: Topology, config: DataConfig) -> tuple[EduData, EduData]:
    """Every node's (train, test) records concatenated: for the centralized reference only."""
    parts = [node_data(node, config) for node in topology.nodes]
    return EduData.concat([p[0] for p in parts]), EduData.concat([p[1] for p in parts])
