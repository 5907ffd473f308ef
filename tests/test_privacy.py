"""Privacy: profiles, per-modality sensitivity, the RDP accountant, the release gate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from m3tgossip.privacy import (
    DEFAULT_ORDERS,
    MODALITY_ORDER,
    PROFILES,
    PrivacyBudgetExhausted,
    RDPAccountant,
    ReleaseGate,
    calibrate_noise_multiplier,
    component_modality,
    gaussian_rdp,
    profile_for,
    rdp_to_epsilon,
)
from m3tgossip.topology import MODALITIES, PRIVACY_PROFILES


def _eps_closed_form(z: float, releases: int, delta: float) -> float:
    """Independent closed form: min over the grid of the CKS / Balle et al. conversion of
    the Gaussian mechanism's RDP `releases * alpha / (2 z^2)`."""
    best = math.inf
    for a in DEFAULT_ORDERS:
        rdp = releases * a / (2.0 * z * z)
        eps = rdp + math.log((a - 1.0) / a) - (math.log(delta) + math.log(a)) / (a - 1.0)
        best = min(best, eps)
    return max(0.0, best)


def _eps_classic(z: float, releases: int, delta: float) -> float:
    return min(releases * a / (2 * z * z) + math.log(1 / delta) / (a - 1) for a in DEFAULT_ORDERS)


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _exact_gaussian_delta(z: float, eps: float) -> float:
    """Exact delta(eps) of the Gaussian mechanism with std/sensitivity z (Balle & Wang 2018)."""
    return _phi(1 / (2 * z) - eps * z) - math.exp(eps) * _phi(-1 / (2 * z) - eps * z)


# --- profiles ------------------------------------------------------------------------------


def test_profiles_cover_the_topology_names_and_modalities():
    assert set(MODALITY_ORDER) == set(MODALITIES)
    for name in PRIVACY_PROFILES:
        if name == "custom":
            assert profile_for(name, {}).name == "custom"
        else:
            assert profile_for(name) is PROFILES[name]


@pytest.mark.parametrize("name", ["ferpa", "gdpr"])
def test_biometric_modalities_are_strictest(name):
    f = PROFILES[name].modality_factor
    assert max(f["signal"], f["image"]) < f["text"] < min(f["clickstream"], f["tabular"]) + 1e-12
    assert f["text"] < max(f["clickstream"], f["tabular"])


def test_gdpr_is_stricter_than_ferpa_for_every_modality():
    g, f = PROFILES["gdpr"], PROFILES["ferpa"]
    assert g.delta < f.delta
    for m in MODALITY_ORDER:
        assert g.epsilon * g.modality_factor[m] < f.epsilon * f.modality_factor[m]


def test_open_profile_has_no_budget():
    p = PROFILES["open"]
    assert p.is_open and p.epsilon == math.inf and p.noise_multiplier == 0.0


def test_custom_profile_overrides_its_base():
    p = profile_for(
        "custom",
        {"base": "gdpr", "epsilon": 5.0, "clip": 0.5, "modality_factor": {"text": 0.3}},
    )
    assert (p.name, p.epsilon, p.delta, p.clip) == ("custom", 5.0, 1e-6, 0.5)
    assert p.modality_factor["text"] == 0.3
    assert p.modality_factor["signal"] == PROFILES["gdpr"].modality_factor["signal"]
    assert profile_for("custom", {}).epsilon == PROFILES["ferpa"].epsilon


@pytest.mark.parametrize(
    "table, key",
    [
        ({"epsilon": -1.0}, "epsilon"),
        ({"epsilon": "8"}, "epsilon"),
        ({"epsilon": math.inf}, "epsilon"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.5}, "delta"),
        ({"clip": 0.0}, "clip"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"modality_factor": {"signal": 1.5}}, "modality_factor.signal"),
        ({"modality_factor": {"audio": 0.5}}, "modality_factor.audio"),
        ({"modality_factor": 0.5}, "modality_factor"),
        ({"base": "open"}, "base"),
        ({"epsilonn": 1.0}, "epsilonn"),
    ],
)
def test_bad_custom_values_name_the_key(table, key):
    with pytest.raises(ValueError, match=rf"privacy\.{key}"):
        profile_for("custom", table)


def test_profile_name_errors():
    with pytest.raises(ValueError, match="unknown profile"):
        profile_for("hipaa")
    with pytest.raises(ValueError, match="needs a privacy table"):
        profile_for("custom")
    with pytest.raises(ValueError, match='only "custom"'):
        profile_for("gdpr", {"epsilon": 1.0})


@pytest.mark.parametrize(
    "component, modalities, expected",
    [
        ("encoder.text", ("text", "signal"), "text"),
        ("encoder.signal", ("text", "signal"), "signal"),
        ("encoder.tabular", ("tabular",), "tabular"),
        ("fusion", ("clickstream", "tabular"), "clickstream"),  # gdpr: 0.75 < 1.0
        ("backbone", ("clickstream", "text"), "text"),
        ("head.stress", ("tabular", "signal", "text"), "signal"),
        ("prompt.handwriting", ("image", "text"), "image"),
        ("encoder.audio", ("tabular",), "signal"),  # unknown encoder: strictest of all
        ("something.else", ("text", "image"), "image"),
    ],
)
def test_component_takes_the_strictest_modality_it_touches(component, modalities, expected):
    assert component_modality(component, modalities, PROFILES["gdpr"]) == expected


def test_tie_break_follows_the_modality_order():
    # ferpa: signal and image share factor 0.5; signal comes first
    assert component_modality("fusion", ("image", "signal"), PROFILES["ferpa"]) == "signal"
    ferpa = PROFILES["ferpa"]
    assert component_modality("fusion", ("tabular", "clickstream"), ferpa) == "clickstream"


# --- accountant ----------------------------------------------------------------------------


@pytest.mark.parametrize("z", [0.5, 1.0, 3.0, 20.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-6])
def test_single_release_matches_the_closed_form(z, delta):
    acc = RDPAccountant()
    acc.step(z)
    assert acc.epsilon(delta) == pytest.approx(_eps_closed_form(z, 1, delta), rel=1e-12)
    assert np.allclose(acc.rdp, [a / (2 * z * z) for a in DEFAULT_ORDERS])


@pytest.mark.parametrize("z, releases", [(1.0, 10), (5.0, 100), (50.0, 400)])
def test_conversion_is_sound_and_tighter_than_the_classic_one(z, releases):
    delta = 1e-5
    acc = RDPAccountant()
    acc.step(z, releases)
    eps = acc.epsilon(delta)
    assert eps <= _eps_classic(z, releases, delta)
    # T Gaussian releases are one Gaussian release of z / sqrt(T): the exact delta at the
    # accountant's epsilon must not exceed the target (the accountant is an upper bound)
    assert _exact_gaussian_delta(z / math.sqrt(releases), eps) <= delta
    # and not absurdly loose: at 0.8 eps the exact delta is already above target
    assert _exact_gaussian_delta(z / math.sqrt(releases), 0.8 * eps) > delta


@pytest.mark.parametrize("z, releases", [(1.0, 4), (7.0, 50), (40.0, 300)])
def test_composition_equals_one_release_of_scaled_noise(z, releases):
    many, one = RDPAccountant(), RDPAccountant()
    for _ in range(releases):
        many.step(z)
    one.step(z / math.sqrt(releases))
    assert np.allclose(many.rdp, one.rdp, rtol=1e-12)
    assert many.epsilon(1e-5) == pytest.approx(one.epsilon(1e-5), rel=1e-12)
    assert many.releases == releases


def test_epsilon_is_monotone_in_releases_and_noise():
    eps_t = [_acc(3.0, t).epsilon(1e-5) for t in range(1, 60)]
    assert all(a < b for a, b in zip(eps_t, eps_t[1:], strict=False))
    eps_z = [_acc(z, 20).epsilon(1e-5) for z in np.geomspace(0.5, 100, 40)]
    assert all(a > b for a, b in zip(eps_z, eps_z[1:], strict=False))


def _acc(z: float, releases: int) -> RDPAccountant:
    acc = RDPAccountant()
    acc.step(z, releases)
    return acc


def test_no_release_costs_nothing_and_epsilon_after_does_not_spend():
    acc = RDPAccountant()
    assert acc.epsilon(1e-5) == 0.0
    assert acc.epsilon_after(2.0, 1e-5, 3) == pytest.approx(_eps_closed_form(2.0, 3, 1e-5))
    assert acc.releases == 0 and acc.epsilon(1e-5) == 0.0


@pytest.mark.parametrize(
    "eps, delta, releases", [(8.0, 1e-5, 100), (0.6, 1e-6, 100), (3.0, 1e-6, 1), (50.0, 1e-5, 10)]
)
def test_calibration_hits_the_target(eps, delta, releases):
    z = calibrate_noise_multiplier(eps, delta, releases)
    spent = _eps_closed_form(z, releases, delta)
    assert spent <= eps * (1 + 1e-9)
    assert spent == pytest.approx(eps, rel=1e-3)


def test_calibration_rejects_what_the_grid_cannot_certify():
    with pytest.raises(ValueError, match="too small"):
        calibrate_noise_multiplier(1e-4, 1e-5, 10)
    with pytest.raises(ValueError):
        calibrate_noise_multiplier(1.0, 1e-5, 0)


def test_rdp_helpers_validate():
    with pytest.raises(ValueError):
        gaussian_rdp(0.0)
    with pytest.raises(ValueError):
        rdp_to_epsilon(np.ones(len(DEFAULT_ORDERS)), DEFAULT_ORDERS, 0.0)


# --- release gate -------------------------------------------------------------------------

COMPONENTS = {"encoder.signal": 64, "encoder.tabular": 32, "fusion": 16, "head.stress": 8}
MODS = ("signal", "tabular")


def test_privatize_clips_and_adds_the_seeded_noise():
    p = ReleaseGate(PROFILES["ferpa"], MODS, COMPONENTS, seed=7)
    spec = p.components["encoder.tabular"]
    assert spec.clip == 1.0 and spec.noise_multiplier == 17.0 and spec.noise_std == 17.0
    big = np.arange(32, dtype=np.float64) + 1.0  # norm far above the clip
    small = np.full(32, 0.01)  # norm 0.057: left as it is
    ref = np.random.default_rng(7)
    out_big, std = p.privatize("encoder.tabular", big.copy())
    expected = big / np.linalg.norm(big) + 17.0 * ref.standard_normal(32)
    assert std == 17.0 and np.allclose(out_big, expected)
    out_small, _ = p.privatize("encoder.tabular", small.copy())
    assert np.allclose(out_small, small + 17.0 * ref.standard_normal(32))
    assert p.releases("encoder.tabular") == 2
    assert p.charged("encoder.tabular") == 2 and p.charged("fusion") == 0 and p.released == 2


def test_privatize_in_place_or_into_out():
    p = ReleaseGate(PROFILES["gdpr"], MODS, COMPONENTS, seed=1)
    d = np.ones(32, dtype=np.float32)
    res, _ = p.privatize("encoder.tabular", d)
    assert res is d and res.dtype == np.float32
    d = np.ones((4, 8))
    out = np.empty((4, 8))
    res, _ = p.privatize("encoder.tabular", d, out=out)
    assert res is out and np.all(d == 1.0)


def test_noise_std_is_measured():
    p = ReleaseGate(PROFILES["ferpa"], ("tabular",), {"encoder.tabular": 200_000}, seed=3)
    d, std = p.privatize("encoder.tabular", np.zeros(200_000))
    assert float(d.std()) == pytest.approx(std, rel=0.01)


def test_stricter_modalities_get_more_noise():
    p = ReleaseGate(PROFILES["gdpr"], MODS, COMPONENTS, rounds_planned=100)
    sig = {c: s.noise_multiplier for c, s in p.components.items()}
    assert sig["encoder.signal"] > sig["encoder.tabular"]
    # components trained on all modalities take the strictest one's noise
    assert sig["fusion"] == sig["head.stress"] == sig["encoder.signal"]
    # the multipliers split one node budget by the modality factors: z_c^2 f_c is the same
    f = PROFILES["gdpr"].modality_factor
    assert sig["encoder.signal"] ** 2 * f["signal"] == pytest.approx(
        sig["encoder.tabular"] ** 2 * f["tabular"]
    )
    q = ReleaseGate(PROFILES["gdpr"], ("clickstream", "tabular"), {"fusion": 4}, 100)
    assert q.components["fusion"].modality == "clickstream"


@pytest.mark.parametrize("name", ["ferpa", "gdpr"])
@pytest.mark.parametrize("neighbouring, sensitivity", [("replace", 2.0), ("add-remove", 1.0)])
def test_calibrated_run_spends_exactly_the_node_budget(name, neighbouring, sensitivity):
    rounds = 30
    prof = PROFILES[name]
    p = ReleaseGate(prof, MODS, COMPONENTS, rounds, seed=0, neighbouring=neighbouring)
    rng = np.random.default_rng(5)
    for _ in range(rounds):
        assert p.begin_round()
        for c, n in COMPONENTS.items():
            assert p.can_share(c)
            p.privatize(c, rng.standard_normal(n))
    # one budget for the node: every component's releases composed spend it exactly
    assert p.node_epsilon() == pytest.approx(prof.epsilon, rel=1e-6)
    assert p.node_epsilon() <= prof.epsilon * (1 + 1e-9)
    specs = p.components.values()
    total = sum(rounds / (2 * (s.noise_multiplier / sensitivity) ** 2) for s in specs)
    expected = _eps_closed_form(1 / math.sqrt(2 * total / rounds), rounds, prof.delta)
    assert p.node_epsilon() == pytest.approx(expected, rel=1e-9)
    for c, spec in p.components.items():
        assert spec.budget == prof.epsilon
        assert p.spent(c) == pytest.approx(
            _eps_closed_form(spec.noise_multiplier / sensitivity, rounds, prof.delta), rel=1e-12
        )
        assert p.spent(c) < p.node_epsilon()
        assert not p.can_share(c)
        with pytest.raises(PrivacyBudgetExhausted):
            p.privatize(c, np.zeros(COMPONENTS[c]))
    assert p.releases("fusion") == rounds  # the refused release was not counted
    # every value the gate let out was charged, the refused ones were not
    assert all(p.charged(c) == rounds for c in COMPONENTS)
    assert p.released == rounds * len(COMPONENTS)


def test_fixed_noise_stops_when_the_budget_is_spent():
    prof = PROFILES["gdpr"]
    p = ReleaseGate(prof, ("tabular",), {"encoder.tabular": 4}, seed=0)
    spec = p.components["encoder.tabular"]
    assert spec.noise_multiplier == prof.noise_multiplier / prof.modality_factor["tabular"]
    # independently: the largest T whose closed-form epsilon fits the budget
    z = spec.noise_multiplier / 2.0
    allowed = 0
    while _eps_closed_form(z, allowed + 1, prof.delta) <= prof.epsilon:
        allowed += 1
    sent = 0
    while p.can_share("encoder.tabular"):
        p.privatize("encoder.tabular", np.ones(4))
        sent += 1
    assert sent == allowed and 100 < sent < 400
    assert p.node_epsilon() <= prof.epsilon


def test_open_profile_does_nothing():
    p = ReleaseGate(PROFILES["open"], MODS, COMPONENTS, rounds_planned=10, seed=0)
    d = np.arange(64, dtype=np.float64) * 100.0
    out, std = p.privatize("encoder.signal", d.copy())
    assert std == 0.0 and np.array_equal(out, d)
    assert p.spent("encoder.signal") == 0.0 and p.can_share("encoder.signal")
    assert p.node_epsilon() == 0.0
    rep = p.report()["encoder.signal"]
    assert rep["clip"] is None and rep["budget"] is None and rep["releases"] == 1
    assert p.charged("encoder.signal") == 1 and p.released == 1  # charged, at no cost
    json.dumps(p.report(), allow_nan=False)


def test_report_is_json_and_complete():
    p = ReleaseGate(PROFILES["ferpa"], MODS, {"fusion": 16}, rounds_planned=2, seed=0)
    p.privatize("fusion", np.ones(16))
    rep = json.loads(json.dumps(p.report(), allow_nan=False))
    assert set(rep) == {"fusion"}
    keys = {"modality", "clip", "sigma", "noise_std", "releases", "epsilon_spent", "budget"}
    keys |= {"exhausted", "trained"}
    assert set(rep["fusion"]) == keys
    assert rep["fusion"]["releases"] == 1 and rep["fusion"]["trained"] is False
    assert rep["fusion"]["epsilon_spent"] == pytest.approx(p.spent("fusion"))
    assert rep["fusion"]["exhausted"] is False
    p.privatize("fusion", np.ones(16))
    assert p.report()["fusion"]["exhausted"] is True


def test_state_survives_a_restart():
    p = ReleaseGate(PROFILES["gdpr"], MODS, {"fusion": 16}, rounds_planned=3, seed=0)
    for _ in range(3):
        p.privatize("fusion", np.ones(16))
    state = json.loads(json.dumps(p.state()))
    q = ReleaseGate(PROFILES["gdpr"], MODS, {"fusion": 16}, rounds_planned=3)
    assert q.released == 0
    assert ReleaseGate.spend(state) > ReleaseGate.spend(q.state())
    q.load(state)
    assert ReleaseGate.spend(state) == ReleaseGate.spend(q.state())
    assert q.spent("fusion") == pytest.approx(p.spent("fusion"))
    assert q.node_epsilon() == pytest.approx(p.node_epsilon())
    assert q.releases("fusion") == 3 and not q.can_share("fusion")
    # what a checkpoint restores was charged by an earlier gate, not by this one
    assert q.charged("fusion") == 0 and q.released == 0 and p.charged("fusion") == 3
    r = ReleaseGate(PROFILES["ferpa"], MODS, COMPONENTS)
    with pytest.raises(ValueError, match="profile"):
        r.load(state)


def test_privatize_validates_its_input():
    p = ReleaseGate(PROFILES["ferpa"], MODS, COMPONENTS, seed=0)
    with pytest.raises(KeyError, match="not privatized"):
        p.privatize("backbone", np.zeros(3))
    with pytest.raises(ValueError, match="elements"):
        p.privatize("fusion", np.zeros(15))
    with pytest.raises(TypeError):
        p.privatize("fusion", np.zeros(16, dtype=np.int64))
    with pytest.raises(ValueError, match="non-finite"):
        p.privatize("fusion", np.full(16, np.nan))
    assert p.releases("fusion") == 0 and p.charged("fusion") == 0 and p.released == 0
    with pytest.raises(KeyError, match="not privatized"):
        p.charged("backbone")
    with pytest.raises(ValueError, match="neighbouring"):
        ReleaseGate(PROFILES["ferpa"], MODS, COMPONENTS, neighbouring="swap")
    with pytest.raises(ValueError, match="unknown modality"):
        ReleaseGate(PROFILES["ferpa"], ("video",), COMPONENTS)
