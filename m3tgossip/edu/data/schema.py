"""The record schema: modalities, tasks, array shapes, the clickstream vocabulary and the groups.

Every source of education records (the built-in generator, `load_oulad`) fills `EduData` to
these constants, and the model's encoders and heads are sized from them.
"""

from __future__ import annotations

MODALITIES = ("text", "image", "signal", "clickstream", "tabular")
#: task -> number of classes
TASKS = {"at_risk": 2, "engagement": 3, "stress": 2, "handwriting": 2, "next_response": 2}
#: clickstream token ids are in [0, CLICK_VOCAB), 0 = padding
CLICK_VOCAB = 64
CLICK_LEN = 48
#: time steps x channels (`SIGNAL_CHANNELS`)
SIGNAL_SHAPE = (64, 4)
SIGNAL_CHANNELS = ("eda", "heart_rate", "pitch", "energy")
#: handwritten answer image, values in [0, 1]
IMAGE_SHAPE = (1, 8, 8)
TABULAR_DIM = 12
TABULAR_FEATURES = (
    "prior_education",
    "credits",
    "active_days",
    "submission_rate",
    "mean_score",
    "age_band",
    "previous_attempts",
    "click_volume",
    "late_submissions",
    "deprivation",
    "activity_breadth",
    "registration_lead",
)
GROUP_ATTRIBUTES = ("gender", "first_generation", "language", "disability")
#: number of quiz skills; answer tokens are `quiz_correct_<k>` / `quiz_wrong_<k>`, k < SKILLS
SKILLS = 12
ACTIVITIES = (
    "video_play",
    "video_pause",
    "video_complete",
    "video_seek",
    "forum_read",
    "forum_post",
    "forum_reply",
    "resource_download",
    "page_view",
    "homepage",
    "external_link",
    "glossary_lookup",
    "search",
    "assignment_view",
    "assignment_submit",
    "hint_request",
    "notes_edit",
    "wiki_edit",
    "live_session",
    "questionnaire",
    "peer_review",
    "calendar_view",
    "tab_switch",
    "idle",
)
#: token id -> name; ids past the end of this tuple (up to CLICK_VOCAB) are unused
CLICK_TOKENS = (
    "<pad>",
    "login",
    "logout",
    "quiz_start",
    "quiz_submit",
    *ACTIVITIES,
    *(f"quiz_{outcome}_{k}" for k in range(SKILLS) for outcome in ("correct", "wrong")),
)
TOKEN_ID = {name: i for i, name in enumerate(CLICK_TOKENS)}
#: the handwritten worksheet item asks for a prime number below 10: `handwriting` is 1 exactly
#: when the written digit is one of these
PRIME_DIGITS = (2, 3, 5, 7)

assert len(CLICK_TOKENS) <= CLICK_VOCAB and len(TABULAR_FEATURES) == TABULAR_DIM


def answer_token(skill: int, correct: bool) -> int:
    """The clickstream token id of a quiz answer on `skill`."""
    return TOKEN_ID[f"quiz_{'correct' if correct else 'wrong'}_{skill}"]
