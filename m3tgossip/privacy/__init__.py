"""Privacy of what a node releases: profiles, the accountant and the release gate."""

from m3tgossip.privacy.dp import (
    DEFAULT_ORDERS,
    MODALITY_ORDER,
    PROFILES,
    DeltaPrivatizer,
    PrivacyBudgetExhausted,
    PrivacyProfile,
    RDPAccountant,
    calibrate_noise_multiplier,
    component_modality,
    gaussian_rdp,
    profile_for,
    rdp_to_epsilon,
)

__all__ = [
    "DEFAULT_ORDERS",
    "DeltaPrivatizer",
    "MODALITY_ORDER",
    "PROFILES",
    "PrivacyBudgetExhausted",
    "PrivacyProfile",
    "RDPAccountant",
    "calibrate_noise_multiplier",
    "component_modality",
    "gaussian_rdp",
    "profile_for",
    "rdp_to_epsilon",
]
