"""Private training: the subsampled-Gaussian accountant against a reference implementation and
closed forms, the calibration of DP-SGD noise to one budget per learner per node, the gate's
charging of DP-SGD rounds, and per-learner clipping, sampling and noise in the trainer."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from fakes import FakeNetwork, node_config, run_nodes
from tiny import TINY

from m3tgossip.daemon.metrics import read_metrics
from m3tgossip.daemon.node import Node
from m3tgossip.edu.data import DataConfig, node_data
from m3tgossip.edu.dpsgd import LearnerSGD
from m3tgossip.edu.model import build_node_model
from m3tgossip.edu.model.components import component_of
from m3tgossip.edu.train import Trainer
from m3tgossip.edu.workload import EduWorkload
from m3tgossip.errors import ConfigError
from m3tgossip.privacy import (
    DEFAULT_ORDERS,
    PROFILES,
    PrivacyBudgetExhausted,
    RDPAccountant,
    ReleaseGate,
    TrainingNoise,
    TrainingPlan,
    calibrate_noise_multiplier,
    gaussian_rdp,
    rdp_to_epsilon,
    sampled_gaussian_rdp,
    training_noise,
)
from m3tgossip.privacy.audit import binomial_tail, guess, lower_bound
from m3tgossip.topology import parse_topology

# --- the subsampled Gaussian ------------------------------------------------------------------


@pytest.mark.parametrize("z", [0.7, 2.0, 9.0])
def test_full_sampling_is_the_plain_gaussian(z):
    assert np.array_equal(sampled_gaussian_rdp(1.0, z), gaussian_rdp(z))
    assert not np.any(sampled_gaussian_rdp(0.0, z))


@pytest.mark.parametrize("q, z", [(0.01, 1.0), (0.1, 0.8), (0.38, 7.8), (0.9, 3.0)])
def test_order_two_matches_its_closed_form(q, z):
    # A_2 = (1-q)^2 + 2q(1-q) + q^2 e^{1/z^2}: RDP(2) = log(1 + q^2 (e^{1/z^2} - 1))
    rdp = sampled_gaussian_rdp(q, z, (2.0, 3.0))
    assert rdp[0] == pytest.approx(math.log1p(q * q * math.expm1(1 / z**2)), rel=1e-10)
    # A_3 = sum_k C(3,k) (1-q)^{3-k} q^k e^{(k^2-k)/(2 z^2)}
    a3 = sum(
        math.comb(3, k) * (1 - q) ** (3 - k) * q**k * math.exp((k * k - k) / (2 * z * z))
        for k in range(4)
    )
    assert rdp[1] == pytest.approx(math.log(a3) / 2, rel=1e-10)
    # subsampling never costs more than the plain Gaussian, and subsampling less costs more
    full = gaussian_rdp(z)
    sub = sampled_gaussian_rdp(q, z)
    assert np.all(np.isfinite(sub)) and np.all(sub <= full)
    ints = tuple(float(a) for a in range(2, 40))
    assert np.all(sampled_gaussian_rdp(q / 2, z, ints) <= sampled_gaussian_rdp(q, z, ints))


CASES = [
    (0.38, 7.8, 150, 1e-6),
    (0.095, 2.18, 150, 1e-6),
    (0.1, 1.0, 1000, 1e-5),
    (0.01, 0.8, 10000, 1e-5),
    (0.5, 5.0, 30, 1e-6),
    (0.2, 8.0, 150, 1e-6),
    (0.9, 0.6, 10, 1e-5),
]


@pytest.mark.parametrize("q, z, steps, delta", CASES)
def test_accountant_agrees_with_dp_accounting(q, z, steps, delta):
    dp_accounting = pytest.importorskip("dp_accounting", reason="needs the test extra")
    from dp_accounting.rdp import RdpAccountant

    ref = RdpAccountant(list(DEFAULT_ORDERS))
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    ref.compose(event, steps)
    ours = RDPAccountant()
    ours.step(z, steps, sampling_rate=q)
    assert ours.epsilon(delta) == pytest.approx(ref.get_epsilon(delta), rel=0.01)
    # a Gaussian is the special case q = 1
    plain = RdpAccountant(list(DEFAULT_ORDERS))
    plain.compose(dp_accounting.GaussianDpEvent(z), steps)
    acc = RDPAccountant()
    acc.step(z, steps)
    assert acc.epsilon(delta) == pytest.approx(plain.get_epsilon(delta), rel=0.01)


@pytest.mark.parametrize("eps, delta, q", [(3.0, 1e-6, 0.38), (8.0, 1e-5, 0.1), (0.6, 1e-6, 0.2)])
def test_subsampled_calibration_hits_the_target(eps, delta, q):
    z = calibrate_noise_multiplier(eps, delta, 150, sampling_rate=q)
    acc = RDPAccountant()
    acc.step(z, 150, sampling_rate=q)
    assert acc.epsilon(delta) <= eps * (1 + 1e-9)
    assert acc.epsilon(delta) == pytest.approx(eps, rel=1e-3)
    # amplification: far less noise than without subsampling
    assert z < calibrate_noise_multiplier(eps, delta, 150)


# --- DP-SGD noise for one budget per learner per node ------------------------------------------

COMPONENTS = ["backbone", "encoder.image", "encoder.tabular", "encoder.text", "head.at_risk"]


@pytest.mark.parametrize("name", ["gdpr", "ferpa"])
def test_training_noise_spends_the_node_budget_over_the_planned_run(name):
    prof = PROFILES[name]
    plan = TrainingPlan(sampling_rate=0.2, steps_per_round=5)
    noise = training_noise(prof, plan, 30, COMPONENTS)
    acc = RDPAccountant()
    acc.step(noise.noise_multiplier, 150, sampling_rate=0.2)
    assert acc.epsilon(prof.delta) <= prof.epsilon * (1 + 1e-9)
    assert acc.epsilon(prof.delta) == pytest.approx(prof.epsilon, rel=1e-3)
    for comp in COMPONENTS:
        z = noise.multiplier(comp)
        assert z >= noise.noise_multiplier
        if not comp.startswith("encoder."):
            assert z == noise.noise_multiplier
            continue
        factor = prof.modality_factor[comp.split(".")[1]]
        own = RDPAccountant()
        own.step(z, 150, sampling_rate=0.2)
        if factor < 1:  # a strict modality's encoder spends its share on its own
            assert own.epsilon(prof.delta) == pytest.approx(prof.epsilon * factor, rel=1e-3)
        else:
            assert z == noise.noise_multiplier
    assert noise.multiplier("encoder.image") > noise.multiplier("encoder.text")


def test_training_noise_without_a_planned_end_and_for_open():
    prof = PROFILES["gdpr"]
    noise = training_noise(prof, TrainingPlan(0.5, 3), None, ["encoder.image", "fusion"])
    assert noise.noise_multiplier == prof.sgd_noise_multiplier
    assert noise.multiplier("encoder.image") == pytest.approx(
        prof.sgd_noise_multiplier / prof.modality_factor["image"]
    )
    with pytest.raises(ValueError, match="open"):
        training_noise(PROFILES["open"], TrainingPlan(0.5, 3), 10, ["fusion"])
    with pytest.raises(ValueError, match="sampling_rate"):
        TrainingPlan(1.5, 3)
    with pytest.raises(ValueError, match="steps_per_round"):
        TrainingPlan(0.5, 0)


def _gate(rounds=10, q=0.3, k=4, profile="ferpa"):
    prof = PROFILES[profile]
    comps = {"encoder.signal": 8, "fusion": 4, "head.stress": 3}
    noise = training_noise(prof, TrainingPlan(q, k), rounds, comps)
    return ReleaseGate(prof, ("signal", "tabular"), comps, rounds, seed=0, training=noise), comps


def test_gate_charges_dp_sgd_rounds_and_adds_no_noise():
    rounds = 10
    gate, comps = _gate(rounds)
    prof = gate.profile
    assert all(spec.trained and spec.noise_std == 0.0 for spec in gate.components.values())
    with pytest.raises(PrivacyBudgetExhausted):  # nothing is let out before the round's charge
        gate.privatize("fusion", np.ones(4))
    for _ in range(rounds):
        assert gate.begin_round()
        for comp, n in comps.items():
            update = np.arange(n, dtype=np.float32) * 100.0  # far above any clip: untouched
            out, std = gate.privatize(comp, update.copy())
            assert std == 0.0 and np.array_equal(out, update)
            with pytest.raises(PrivacyBudgetExhausted, match="already"):
                gate.privatize(comp, update.copy())
        assert gate.node_epsilon() <= prof.epsilon * (1 + 1e-9)
    assert gate.node_epsilon() == pytest.approx(prof.epsilon, rel=1e-3)
    assert gate.spent("encoder.signal") == pytest.approx(
        prof.epsilon * prof.modality_factor["signal"], rel=1e-3
    )
    assert gate.spent("fusion") == pytest.approx(gate.node_epsilon())
    # spent: the next round is refused and nothing of it is charged
    before = gate.state()
    assert not gate.begin_round() and not gate.can_share("fusion")
    assert gate.state() == before
    assert gate.report()["fusion"]["exhausted"] is True
    assert all(gate.charged(c) == rounds for c in comps) and gate.released == rounds * len(comps)
    # the accounting survives a restart
    again, _ = _gate(rounds)
    again.load(before)
    assert again.node_epsilon() == pytest.approx(gate.node_epsilon())
    assert again.releases("fusion") == rounds and not again.begin_round()


def test_gate_without_a_planned_end_stops_at_the_budget():
    prof = PROFILES["gdpr"]
    comps = {"fusion": 4}
    noise = training_noise(prof, TrainingPlan(0.2, 5), None, comps)
    gate = ReleaseGate(prof, ("tabular",), comps, None, seed=0, training=noise)
    rounds = 0
    while gate.begin_round():
        gate.privatize("fusion", np.zeros(4))
        rounds += 1
    independent = RDPAccountant()
    allowed = 0
    while True:
        independent.step(prof.sgd_noise_multiplier, 5, sampling_rate=0.2)
        if independent.epsilon(prof.delta) > prof.epsilon:
            break
        allowed += 1
    assert rounds == allowed > 0
    assert gate.node_epsilon() <= prof.epsilon


# --- per-learner DP-SGD in the trainer --------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    id: str = "n0"
    role: str = "institution"
    institution: str | None = "uni-a"
    modalities: tuple[str, ...] = ("tabular", "clickstream", "image")
    tasks: tuple[str, ...] = ("at_risk", "engagement", "handwriting")
    compute: str = "full"
    local: tuple[str, ...] = ()


def _trainer(records=40, learners_per=1):
    train, test = node_data(Spec(), DataConfig(records=records))
    if learners_per > 1:  # several records per learner
        train = replace(train, learner=np.arange(len(train)) // learners_per)
    model = build_node_model(Spec(), checkpoint=None, config=TINY)
    return Trainer(model, train, test)


def _noise(z=1.0, clip=0.5, q=0.5, extra=None):
    return TrainingNoise(clip, z, q, 2, dict(extra or {}))


def test_learners_are_clipped_as_one_unit():
    tr = _trainer(learners_per=3)
    sgd = LearnerSGD(
        tr.model.net, tr.train_batch, tr.train_labels, tr.weights, tr.learners, tr.pool, _noise()
    )
    idx = sgd.sample()
    assert len(idx)
    sums, _ = sgd.clipped_sum(idx)
    # reference: one ordinary backward per learner of the summed loss of its records
    expected = [torch.zeros_like(p) for p in sgd.params]
    learners = tr.learners[idx]
    for lid in np.unique(learners):
        recs = torch.from_numpy(idx[learners == lid])
        logits = tr.model(tr.train_batch.take(recs))
        loss = torch.zeros(())
        for t in tr.model.tasks:
            y = tr.train_labels[t][recs]
            known = y >= 0
            if bool(known.any()):
                ce = torch.nn.functional.cross_entropy(logits[t][known], y[known], reduction="sum")
                loss = loss + tr.weights[t] * ce
        grads = torch.autograd.grad(loss, sgd.params, allow_unused=True)
        grads = [
            torch.zeros_like(p) if g is None else g for g, p in zip(grads, sgd.params, strict=True)
        ]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        scale = min(1.0, 0.5 / float(norm))
        for e, g in zip(expected, grads, strict=True):
            e += scale * g
    for s, e in zip(sums, expected, strict=True):
        torch.testing.assert_close(s, e, rtol=1e-4, atol=1e-6)
    total = torch.sqrt(sum(s.pow(2).sum() for s in sums))
    assert float(total) <= 0.5 * len(np.unique(learners)) + 1e-5


def test_poisson_sampling_takes_whole_learners():
    tr = _trainer(learners_per=2)
    sgd = LearnerSGD(
        tr.model.net,
        tr.train_batch,
        tr.train_labels,
        tr.weights,
        tr.learners,
        tr.pool,
        _noise(q=0.3),
        seed=4,
    )
    sizes = []
    for _ in range(200):
        idx = sgd.sample()
        ids, counts = np.unique(tr.learners[idx], return_counts=True)
        per_learner = {i: np.sum(tr.learners[tr.pool] == i) for i in ids}
        assert all(counts[k] == per_learner[i] for k, i in enumerate(ids))
        sizes.append(len(ids))
    assert np.mean(sizes) == pytest.approx(0.3 * sgd.n_learners, rel=0.15)
    full = LearnerSGD(
        tr.model.net,
        tr.train_batch,
        tr.train_labels,
        tr.weights,
        tr.learners,
        tr.pool,
        _noise(q=1.0),
    )
    assert sorted(full.sample()) == sorted(tr.pool)


def test_noise_per_component_and_the_optimiser_step():
    tr = _trainer()
    extra = {"encoder.image": 4.0}
    noise = _noise(z=1.5, clip=2.0, q=0.5, extra=extra)
    sgd = LearnerSGD(
        tr.model.net,
        tr.train_batch,
        tr.train_labels,
        tr.weights,
        tr.learners,
        tr.pool,
        noise,
        seed=0,
    )
    sgd.sample = lambda: np.zeros(0, dtype=np.int64)  # an empty sample: pure noise
    seen: dict[str, list[torch.Tensor]] = {}

    class Capture(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            for name, p in sgd.named:
                seen.setdefault(component_of(name), []).append(p.grad.reshape(-1).clone())

    sgd.step(Capture(sgd.params))
    expected = 0.5 * sgd.n_learners
    for comp, grads in seen.items():
        g = torch.cat(grads)
        want = noise.multiplier(comp) * 2.0 / expected
        if g.numel() > 500:
            assert float(g.std()) == pytest.approx(want, rel=0.15), comp
    assert "encoder.image" in seen and sgd.steps == 1


def test_private_trainer_learns_and_reports_losses():
    tr = _trainer(records=80)
    tr.use_private(_noise(z=0.5, clip=1.0, q=0.5), seed=0)
    first = tr.train_steps(2)
    assert set(first) <= set(tr.model.tasks) and first
    before = [p.detach().clone() for p in tr.params]
    tr.train_steps(3)
    assert tr.step == 5 and tr.private is not None and tr.private.steps == 5
    assert any(not torch.equal(b, p) for b, p in zip(before, tr.params, strict=True))
    for p in tr.params:
        assert torch.isfinite(p).all()


def test_a_node_with_private_training_gets_its_plan():
    tr = _trainer(records=80)
    q = tr.private_sampling_rate()
    assert q == pytest.approx(min(1.0, tr.batch_size / len(tr.pool)))
    assert rdp_to_epsilon(np.zeros(3), (2.0, 3.0, 4.0), 1e-5) == 0.0


# --- the one-run canary audit's statistics ------------------------------------------------------


@pytest.mark.parametrize("r, p, v", [(10, 0.5, 7), (40, 0.73, 30), (25, 0.9, 25), (5, 0.2, 0)])
def test_binomial_tail_is_the_sum(r, p, v):
    exact = sum(math.comb(r, k) * p**k * (1 - p) ** (r - k) for k in range(v, r + 1))
    assert binomial_tail(r, p, v) == pytest.approx(exact, rel=1e-10)


def test_audit_lower_bound_closed_form_and_edges():
    # 20 of 20 right: p^20 = beta at the bound, eps = log(p / (1 - p))
    p = 0.05 ** (1 / 20)
    assert lower_bound(20, 20, 0.05) == pytest.approx(math.log(p / (1 - p)), rel=1e-6)
    assert lower_bound(10, 20) == 0.0  # a coin does as well
    assert lower_bound(15, 20) < lower_bound(18, 20) < lower_bound(20, 20)
    # the delta slack only lowers it
    assert lower_bound(20, 20, 0.05, canaries=200, delta=1e-5) < lower_bound(20, 20)
    with pytest.raises(ValueError):
        lower_bound(21, 20)


def test_guesses_count_the_right_ones():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, False, True, False, False, True])
    # "in" for 5 and 4 (one right), "out" for 1 and 0 (one right)
    assert guess(scores, included, 2, 2) == (2, 4)
    assert guess(scores, included, 1, 0) == (1, 1)


# --- the edu workload under a private profile, in the daemon ----------------------------------

PAIR = {
    "name": "edu-pair",
    "edges": [["a", "b"]],
    "defaults": {
        "role": "student",
        "institution": "uni-a",
        "modalities": ["clickstream", "tabular"],
        "tasks": ["at_risk"],
    },
    "nodes": [{"id": "a", "privacy": "gdpr"}, {"id": "b", "privacy": "ferpa"}],
}


def test_edu_nodes_train_with_dp_sgd_and_report_their_node_epsilon(tmp_path):
    topo = parse_topology(PAIR, str(tmp_path / "pair.toml"))
    net = FakeNetwork()
    nodes = []
    for nid in ("a", "b"):
        w = EduWorkload(topo, nid, 0, {"records": 40, "local_steps": 2, "eval_every": 1})
        cfg = node_config(topo, nid, tmp_path, rounds=2)
        nodes.append(Node(cfg, topology=topo, workload=w, transport=net.transport(nid)))
    run_nodes(nodes)
    for node in nodes:
        gate, trainer = node.gate, node.workload.trainer
        assert gate is not None and gate.training is not None
        assert trainer.private is not None and trainer.private.steps == 4
        assert trainer.private.noise is gate.training
        records = read_metrics(node.config.metrics_path)
        priv = records[-1]["privacy"]
        assert priv["mechanism"] == "dp-sgd" and priv["budget"] == gate.profile.epsilon
        assert priv["node_epsilon"] == pytest.approx(gate.profile.epsilon, rel=1e-3)
        assert priv["node_epsilon"] <= gate.profile.epsilon * (1 + 1e-9)
        assert records[-1]["mean_acc"] is not None
        assert all(m.round < 2 for m in net.sent_by(node.id) if m.tensors)


def test_a_fairness_option_under_a_dp_profile_stops_the_node_with_a_message(tmp_path):
    topo = parse_topology(PAIR, str(tmp_path / "pair.toml"))
    w = EduWorkload(topo, "a", 0, {"records": 40, "fairness": "balanced"})
    cfg = node_config(topo, "a", tmp_path, rounds=2)
    with pytest.raises(ConfigError, match=r'node "a" workload.*cannot run under differential'):
        Node(cfg, topology=topo, workload=w, transport=FakeNetwork().transport("a")).run()
