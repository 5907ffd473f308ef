"""Privacy of what a node releases: profiles, the accountant, private training, the release gate."""

from m3tgossip.privacy.accountant import (
    DEFAULT_ORDERS,
    RDPAccountant,
    calibrate_noise_multiplier,
    gaussian_rdp,
    rdp_to_epsilon,
    sampled_gaussian_rdp,
)
from m3tgossip.privacy.cancel import CancellingNoise
from m3tgossip.privacy.gate import (
    NEIGHBOURING,
    ComponentPrivacy,
    PrivacyBudgetExhausted,
    ReleaseGate,
)
from m3tgossip.privacy.profiles import (
    MODALITY_ORDER,
    PROFILES,
    PrivacyProfile,
    component_modality,
    profile_for,
)
from m3tgossip.privacy.training import TrainingNoise, TrainingPlan, training_noise

__all__ = [
    "DEFAULT_ORDERS",
    "MODALITY_ORDER",
    "NEIGHBOURING",
    "PROFILES",
    "CancellingNoise",
    "ComponentPrivacy",
    "PrivacyBudgetExhausted",
    "PrivacyProfile",
    "RDPAccountant",
    "ReleaseGate",
    "TrainingNoise",
    "TrainingPlan",
    "calibrate_noise_multiplier",
    "component_modality",
    "gaussian_rdp",
    "profile_for",
    "rdp_to_epsilon",
    "sampled_gaussian_rdp",
    "training_noise",
]
