"""The clickstream modality: one learning-platform session per learner, with a quiz block.

A session of `CLICK_TOKENS`: `login`, activity events whose rates depend on engagement, ability
and stress (disabled learners pause videos more often) and the institution's platform habits, a
quiz block (`quiz_start`, one `quiz_correct_<k>` or `quiz_wrong_<k>` token per answer on skill
k, `quiz_submit`) and `logout`; right-padded with 0. Answers follow an item-response model:
skill mastery is ability plus a per-skill deviation, rising with practice.

The `next_response` label is the learner's next answer, on the skill of the last answer in the
session and not in the sequence: 1 if correct.
"""

from __future__ import annotations

import numpy as np

from m3tgossip.edu.data.draws import sigmoid
from m3tgossip.edu.data.institutions import Institution
from m3tgossip.edu.data.schema import ACTIVITIES, CLICK_LEN, SKILLS, TOKEN_ID, answer_token

#: activity -> (base log-rate, engagement, ability, stress effect)
_ACTIVITY_EFFECTS = {
    "video_play": (1.0, 0.3, 0.0, 0.0),
    "video_pause": (0.3, 0.0, -0.3, 0.2),
    "video_complete": (0.2, 0.9, 0.2, 0.0),
    "video_seek": (0.0, -0.2, -0.2, 0.2),
    "forum_read": (0.5, 0.5, 0.0, 0.0),
    "forum_post": (-0.8, 1.0, 0.1, 0.0),
    "forum_reply": (-1.0, 1.0, 0.2, 0.0),
    "resource_download": (0.4, 0.4, 0.0, 0.0),
    "page_view": (1.0, 0.0, 0.0, 0.0),
    "homepage": (0.6, -0.2, 0.0, 0.0),
    "external_link": (-0.5, 0.2, 0.0, 0.0),
    "glossary_lookup": (-0.6, 0.1, -0.5, 0.0),
    "search": (-0.2, 0.1, -0.3, 0.1),
    "assignment_view": (0.3, 0.3, 0.0, 0.2),
    "assignment_submit": (-0.3, 0.7, 0.4, 0.0),
    "hint_request": (-0.4, 0.1, -0.9, 0.1),
    "notes_edit": (-0.6, 0.8, 0.2, 0.0),
    "wiki_edit": (-1.2, 0.6, 0.1, 0.0),
    "live_session": (-0.9, 0.8, 0.0, 0.0),
    "questionnaire": (-1.2, 0.3, 0.0, 0.0),
    "peer_review": (-1.2, 0.7, 0.3, 0.0),
    "calendar_view": (-0.5, 0.1, 0.0, 0.5),
    "tab_switch": (0.0, -0.7, 0.0, 0.5),
    "idle": (0.3, -1.0, 0.0, 0.4),
}
_EFFECTS = np.array([_ACTIVITY_EFFECTS[a] for a in ACTIVITIES])
_ACTIVITY_IDS = np.array([TOKEN_ID[a] for a in ACTIVITIES])
_MAX_ANSWERS = 10


def sessions(
    inst: Institution, people: dict[str, np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sessions [n, CLICK_LEN] and the next_response labels [n]."""
    n = len(people["ability"])
    ability, engagement, stress = people["ability"], people["engagement"], people["stress"]
    # quiz block: answers on two focus skills, item-response model with a practice effect
    answers = np.clip(
        np.rint(4 + 1.5 * engagement + rng.normal(0, 1.5, n)), 2, _MAX_ANSWERS
    ).astype(int)
    focus = np.argsort(rng.gumbel(size=(n, SKILLS)) + np.log(inst.skill_weights), axis=1)[:, :2]
    mastery = ability[:, None] + inst.skill_offset[focus] + rng.normal(0, 0.7, (n, 2))
    which = rng.integers(2, size=(n, _MAX_ANSWERS + 1))
    which[np.arange(n), answers] = which[np.arange(n), answers - 1]  # next item: same skill as last
    onehot = np.eye(2, dtype=int)[which]  # [n, answers + 1, 2]
    earlier = np.cumsum(onehot, axis=1) - onehot  # earlier answers per focus skill
    practice = np.take_along_axis(earlier, which[..., None], axis=2)[..., 0]
    level = np.take_along_axis(mastery, which, axis=1) + 0.15 * practice
    correct = rng.random(level.shape) < sigmoid(1.5 * (level - rng.normal(0, 0.6, level.shape)))
    skill = np.take_along_axis(focus, which, axis=1)
    next_response = correct[np.arange(n), answers].astype(np.int64)
    # activities: a categorical draw per event (Gumbel-max over the per-learner log-rates)
    logits = _EFFECTS[:, 0] + inst.token_bias + np.outer(engagement, _EFFECTS[:, 1])
    logits += np.outer(ability, _EFFECTS[:, 2]) + np.outer(stress, _EFFECTS[:, 3])
    logits[:, ACTIVITIES.index("video_pause")] += 0.6 * people["disability"]
    events = _ACTIVITY_IDS[
        np.argmax(logits[:, None, :] + rng.gumbel(size=(n, CLICK_LEN, len(ACTIVITIES))), axis=2)
    ]
    length = np.clip(
        np.rint(20 + 8 * engagement + rng.normal(0, 4, n)), answers + 5, CLICK_LEN
    ).astype(int)
    quiz_at = rng.random(n)
    out = np.zeros((n, CLICK_LEN), np.int64)
    for i in range(n):
        activities = length[i] - answers[i] - 4
        before = int(quiz_at[i] * activities + 0.5)
        quiz = [TOKEN_ID["quiz_start"]]
        quiz += [answer_token(int(skill[i, j]), bool(correct[i, j])) for j in range(answers[i])]
        quiz.append(TOKEN_ID["quiz_submit"])
        tokens = [
            TOKEN_ID["login"],
            *events[i, :before],
            *quiz,
            *events[i, before:activities],
            TOKEN_ID["logout"],
        ]
        out[i, : len(tokens)] = tokens
    return out, next_response
