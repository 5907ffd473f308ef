"""The built-in education data: a seeded generator of multi-modal student records per node.

This module owns the data contract the model and training code rely on (`EduData`, the
modality and task constants) and the synthetic federation every testbed runs on. A node calls
`node_data(node, config)` and gets its own train and test records, generated from its topology
entry and the federation seed alone: no node needs another node's data and no server hands
data out.

How a record is made. Every record is one learner in one course week, drawn from a latent
profile: ability, engagement (correlated with ability), workload, stress (raised by workload and
by being a first-generation student, lowered by ability) and the groups gender,
first_generation, language and disability. Every modality is rendered from that profile, so the
modalities carry the signal the tasks need, each with its own noise:

- clickstream: one session of `CLICK_TOKENS`: `login`, activity events whose rates depend on
  engagement, ability and stress (disabled learners pause videos more often), a quiz block
  (`quiz_start`, one `quiz_correct_<k>` or `quiz_wrong_<k>` token per answer on skill k,
  `quiz_submit`) and `logout`; right-padded with 0. Answers follow an item-response model:
  skill mastery is ability plus a per-skill deviation, rising with practice.
- tabular: the `TABULAR_FEATURES`, on a standard scale against a fixed reference population
  (never per-node statistics). First-generation students get lower prior-education and higher
  deprivation values at the same ability: a proxy bias the equity metrics can show.
- text: a short reflection of up to three sentences (understanding, engagement, stress) from
  phrase banks in English, Spanish and French; the sentence level follows the latent with noise.
- signal: 64 steps of electrodermal activity (tonic level and phasic peaks rise with stress),
  heart rate (higher and less variable under stress), voice pitch (gender baseline plus stress)
  and voice energy (engagement), each channel a z-score against fixed reference values; pitch is
  0 and energy low where the learner is silent.
- image: the learner's handwritten answer to the worksheet item "write a prime number below
  10", a real digit from scikit-learn's bundled `load_digits` (scaled to [0, 1], shifted by a
  pixel now and then, with pen noise that is stronger for learners with a motor disability).
  The answer is correct exactly when the digit is 2, 3, 5 or 7, so correctness is readable from
  the image alone; learners of low ability write a wrong digit more often. Test records draw
  from a quarter of the digit images that train records never use.

Labels: `at_risk` (fail or withdraw) from ability, engagement and stress with noise;
`engagement` (low, medium, high) and `stress` (no, yes) from their latents with noise;
`handwriting` (answer correct); `next_response` (the learner's next answer, on the skill of the
last answer in the session and not in the sequence, is correct).

Institutions differ. Their properties come from a hash of the institution name and the
federation seed, so all nodes of one institution agree without talking: main and second
language and the share of learners writing in the second one, subject vocabulary, group mix
(institutions teaching mathematics or programming have few women; second-language and disabled
learners are minorities everywhere), means of the latents and the at-risk base rate, skill
difficulty, platform habits and how often a reflection or a wearable recording is missing. A
node without an institution is its own institution.

Non-IID label skew: each node draws its proportions of the six (at_risk, engagement) label
cells from Dirichlet(alpha * 6 * p), p being its institution's own cell proportions, and keeps
candidate learners until the counts match (smaller alpha, stronger skew). The other labels
follow from the learners kept.

Modalities a node does not collect are absent (zeros, `present` False) for all its records;
within the modalities it collects, text and signal are missing for some records (no reflection
written, wearable not worn), never all modalities of a record. Tasks a node does not serve
have label -1.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from m3tgossip.topology import Topology

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
#: records per node = DataConfig.records x this factor of the node's role
ROLE_SCALE = {"institution": 2.0, "instructor": 1.0, "student": 0.5}
#: the handwritten item asks for a prime number below 10
PRIME_DIGITS = (2, 3, 5, 7)
LANGUAGES = ("en", "es", "fr")

assert len(CLICK_TOKENS) <= CLICK_VOCAB and len(TABULAR_FEATURES) == TABULAR_DIM


def answer_token(skill: int, correct: bool) -> int:
    """The clickstream token id of a quiz answer on `skill`."""
    return TOKEN_ID[f"quiz_{'correct' if correct else 'wrong'}_{skill}"]


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


# ----------------------------------------------------------------------------- the contract


@dataclass
class EduData:
    """N records; arrays hold zeros where a modality is absent, labels -1 where unknown."""

    text: list[str]
    image: np.ndarray  # float32 [N, 1, 8, 8]
    signal: np.ndarray  # float32 [N, 64, 4]
    clickstream: np.ndarray  # int64 [N, 48]
    tabular: np.ndarray  # float32 [N, 12]
    present: dict[str, np.ndarray]  # modality -> bool [N]
    labels: dict[str, np.ndarray]  # task -> int64 [N]
    groups: dict[str, np.ndarray]  # attribute -> '<U16' [N]

    def __post_init__(self) -> None:
        n = len(self.text)
        arrays = {
            "image": self.image,
            "signal": self.signal,
            "clickstream": self.clickstream,
            "tabular": self.tabular,
            **{f"present[{k}]": v for k, v in self.present.items()},
            **{f"labels[{k}]": v for k, v in self.labels.items()},
            **{f"groups[{k}]": v for k, v in self.groups.items()},
        }
        for name, array in arrays.items():
            if len(array) != n:
                raise ValueError(f"EduData.{name} has {len(array)} records, text has {n}")
        if set(self.present) != set(MODALITIES):
            raise ValueError(f"EduData.present must have exactly the keys {MODALITIES}")

    def __len__(self) -> int:
        return len(self.text)

    @classmethod
    def empty(cls, n: int) -> EduData:
        """N records with every modality absent, every label -1 and every group "unknown"."""
        return cls(
            text=[""] * n,
            image=np.zeros((n, *IMAGE_SHAPE), np.float32),
            signal=np.zeros((n, *SIGNAL_SHAPE), np.float32),
            clickstream=np.zeros((n, CLICK_LEN), np.int64),
            tabular=np.zeros((n, TABULAR_DIM), np.float32),
            present={m: np.zeros(n, bool) for m in MODALITIES},
            labels={t: np.full(n, -1, np.int64) for t in TASKS},
            groups={g: np.full(n, "unknown", "<U16") for g in GROUP_ATTRIBUTES},
        )

    def subset(self, idx: np.ndarray) -> EduData:
        """The records at integer positions `idx` (or where the boolean mask `idx` is True)."""
        idx = np.asarray(idx)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.intp, copy=False)
        return EduData(
            text=[self.text[i] for i in idx],
            image=self.image[idx],
            signal=self.signal[idx],
            clickstream=self.clickstream[idx],
            tabular=self.tabular[idx],
            present={k: v[idx] for k, v in self.present.items()},
            labels={k: v[idx] for k, v in self.labels.items()},
            groups={k: v[idx] for k, v in self.groups.items()},
        )

    @staticmethod
    def concat(parts: Sequence[EduData]) -> EduData:
        """The records of all parts in order; the parts must have the same label and group keys."""
        if not parts:
            raise ValueError("EduData.concat needs at least one part")
        first = parts[0]
        for part in parts[1:]:
            if set(part.labels) != set(first.labels) or set(part.groups) != set(first.groups):
                raise ValueError("EduData.concat: parts have different label or group keys")
        return EduData(
            text=[t for p in parts for t in p.text],
            image=np.concatenate([p.image for p in parts]),
            signal=np.concatenate([p.signal for p in parts]),
            clickstream=np.concatenate([p.clickstream for p in parts]),
            tabular=np.concatenate([p.tabular for p in parts]),
            present={k: np.concatenate([p.present[k] for p in parts]) for k in first.present},
            labels={k: np.concatenate([p.labels[k] for p in parts]) for k in first.labels},
            groups={k: np.concatenate([p.groups[k] for p in parts]) for k in first.groups},
        )


@dataclass(frozen=True)
class DataConfig:
    """How much built-in data each node generates and how skewed it is."""

    #: records per node (train + test), scaled by role: institution x2, instructor x1, student x0.5
    records: int = 240
    #: fraction of a node's records held out for evaluation
    test_fraction: float = 0.3
    #: Dirichlet concentration of the non-IID label skew across nodes (smaller = more skewed)
    alpha: float = 0.5
    #: federation seed
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.records, int) or isinstance(self.records, bool) or self.records < 4:
            raise ValueError(f"records: must be an integer >= 4, got {self.records!r}")
        if not (isinstance(self.test_fraction, (int, float)) and 0 < self.test_fraction < 1):
            raise ValueError(f"test_fraction: must be between 0 and 1, got {self.test_fraction!r}")
        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < float("inf")):
            raise ValueError(f"alpha: must be a positive number, got {self.alpha!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed: must be an integer, got {self.seed!r}")


# ----------------------------------------------------------------------------- institutions


@dataclass(frozen=True)
class Institution:
    """The properties all nodes of one institution share (see `institution_profile`)."""

    name: str
    language: str
    second_language: str
    second_share: float
    domain: str
    female_share: float
    nonbinary_share: float
    first_gen_share: float
    disability_share: float
    mature_share: float
    ability_mean: float
    engagement_mean: float
    stress_mean: float
    risk_offset: float
    text_missing: float
    signal_missing: float
    phrase_offset: int
    token_bias: np.ndarray  # [len(ACTIVITIES)]
    skill_weights: np.ndarray  # [SKILLS], sums to 1
    skill_offset: np.ndarray  # [SKILLS]
    prime_weights: np.ndarray  # [len(PRIME_DIGITS)], sums to 1

    def __post_init__(self) -> None:
        for array in (self.token_bias, self.skill_weights, self.skill_offset, self.prime_weights):
            array.setflags(write=False)  # profiles are cached and shared


def _entropy(seed: int, *names: str) -> list[int]:
    return [seed % 2**64, *(zlib.crc32(name.encode("utf-8")) for name in names)]


@lru_cache(maxsize=256)
def institution_profile(name: str, seed: int) -> Institution:
    """The institution's properties, a pure function of its name and the federation seed."""
    rng = np.random.default_rng(np.random.SeedSequence(_entropy(seed, "institution", name)))
    language = str(rng.choice(LANGUAGES, p=[0.6, 0.2, 0.2]))
    second = str(rng.choice([lang for lang in LANGUAGES if lang != language]))
    domain = str(rng.choice(sorted(_TOPICS)))
    stem = domain in ("mathematics", "programming")  # few women, as in many STEM programmes
    return Institution(
        name=name,
        language=language,
        second_language=second,
        second_share=float(rng.uniform(0.02, 0.45)),
        domain=domain,
        female_share=float(rng.uniform(0.12, 0.3) if stem else rng.uniform(0.45, 0.65)),
        nonbinary_share=float(rng.uniform(0.01, 0.05)),
        first_gen_share=float(rng.uniform(0.1, 0.5)),
        disability_share=float(rng.uniform(0.03, 0.15)),
        mature_share=float(rng.uniform(0.1, 0.5)),
        ability_mean=float(rng.normal(0.0, 0.3)),
        engagement_mean=float(rng.normal(0.0, 0.3)),
        stress_mean=float(rng.normal(0.0, 0.25)),
        risk_offset=float(rng.uniform(-1.8, -0.5)),
        text_missing=float(rng.uniform(0.02, 0.15)),
        signal_missing=float(rng.uniform(0.0, 0.12)),
        phrase_offset=int(rng.integers(3)),
        token_bias=rng.normal(0.0, 0.3, len(ACTIVITIES)),
        skill_weights=rng.dirichlet(np.full(SKILLS, 2.0)),
        skill_offset=rng.normal(0.0, 0.4, SKILLS),
        prime_weights=rng.dirichlet(np.full(len(PRIME_DIGITS), 3.0)),
    )


# ----------------------------------------------------------------------------- learners

_CELLS = 6  # at_risk (2) x engagement (3)
_MAX_BATCHES = 64


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _learners(inst: Institution, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Latent profiles, groups and the at_risk, engagement and stress labels of n learners."""
    female, nonbinary = inst.female_share, inst.nonbinary_share
    gender = rng.choice(
        np.array(["female", "male", "nonbinary"], "<U16"),
        n,
        p=[female, 1 - female - nonbinary, nonbinary],
    )
    first_gen = rng.random(n) < inst.first_gen_share
    language = np.where(rng.random(n) < inst.second_share, inst.second_language, inst.language)
    disability = rng.random(n) < inst.disability_share
    z = rng.standard_normal((n, 7))
    ability = inst.ability_mean + z[:, 0]
    engagement = inst.engagement_mean + 0.35 * z[:, 0] + 0.94 * z[:, 1]
    workload = z[:, 2]
    stress = inst.stress_mean + 0.55 * workload - 0.25 * z[:, 0] + 0.3 * first_gen + 0.75 * z[:, 3]
    risk = inst.risk_offset - 1.3 * ability - 0.9 * engagement + 0.35 * stress + 0.6 * z[:, 4]
    at_risk = (risk > 0).astype(np.int64)
    engagement_level = np.digitize(engagement + 0.45 * z[:, 5], [-0.5, 0.5]).astype(np.int64)
    return {
        "ability": ability,
        "engagement": engagement,
        "workload": workload,
        "stress": stress,
        "gender": gender,
        "first_generation": first_gen,
        "language": language.astype("<U16"),
        "disability": disability,
        "at_risk": at_risk,
        "engagement_level": engagement_level,
        "stress_label": (stress + 0.45 * z[:, 6] > 0.5).astype(np.int64),
        "cell": at_risk * 3 + engagement_level,
    }


@lru_cache(maxsize=256)
def _cell_prior(name: str, seed: int) -> np.ndarray:
    """The institution's proportions of the six (at_risk, engagement) cells, floored at 0.5%."""
    rng = np.random.default_rng(np.random.SeedSequence(_entropy(seed, "cells", name)))
    cells = _learners(institution_profile(name, seed), rng, 8192)["cell"]
    prior = np.maximum(np.bincount(cells, minlength=_CELLS) / len(cells), 0.005)
    prior /= prior.sum()
    prior.setflags(write=False)  # cached and shared
    return prior


def _largest_remainder(share: np.ndarray, n: int) -> np.ndarray:
    raw = share * n
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


def _skewed_learners(
    inst: Institution, config: DataConfig, rng: np.random.Generator, n: int
) -> dict[str, np.ndarray]:
    """n learners whose label cells follow the node's Dirichlet draw, in random order."""
    share = rng.dirichlet(config.alpha * _CELLS * _cell_prior(inst.name, config.seed))
    need = _largest_remainder(share, n)
    parts: list[dict[str, np.ndarray]] = []
    for _ in range(_MAX_BATCHES):
        batch = _learners(inst, rng, max(2 * n, 512))
        take = np.concatenate(
            [np.flatnonzero(batch["cell"] == c)[: need[c]] for c in range(_CELLS)]
        )
        parts.append({k: v[take] for k, v in batch.items()})
        need -= np.bincount(batch["cell"][take], minlength=_CELLS)
        if need.sum() == 0:
            break
    else:
        # a cell too rare to fill: its remaining quota goes to learners of any cell
        spare = np.setdiff1d(np.arange(len(batch["cell"])), take)[: need.sum()]
        parts.append({k: v[spare] for k, v in batch.items()})
    order = rng.permutation(n)
    return {k: np.concatenate([p[k] for p in parts])[order] for k in parts[0]}


# ----------------------------------------------------------------------------- text

#: domain -> language -> topics
_TOPICS = {
    "mathematics": {
        "en": ("fractions", "derivatives", "linear equations", "probability"),
        "es": ("las fracciones", "las derivadas", "las ecuaciones lineales", "la probabilidad"),
        "fr": ("les fractions", "les dérivées", "les équations linéaires", "les probabilités"),
    },
    "biology": {
        "en": ("photosynthesis", "cell division", "genetics", "the immune system"),
        "es": ("la fotosíntesis", "la división celular", "la genética", "el sistema inmune"),
        "fr": (
            "la photosynthèse",
            "la division cellulaire",
            "la génétique",
            "le système immunitaire",
        ),
    },
    "programming": {
        "en": ("loops", "recursion", "functions", "sorting algorithms"),
        "es": ("los bucles", "la recursión", "las funciones", "los algoritmos de ordenación"),
        "fr": ("les boucles", "la récursivité", "les fonctions", "les algorithmes de tri"),
    },
    "history": {
        "en": (
            "the industrial revolution",
            "the cold war",
            "ancient Rome",
            "the French revolution",
        ),
        "es": (
            "la revolución industrial",
            "la guerra fría",
            "la antigua Roma",
            "la revolución francesa",
        ),
        "fr": (
            "la révolution industrielle",
            "la guerre froide",
            "la Rome antique",
            "la Révolution française",
        ),
    },
}
_ACTIVITY_WORDS = {
    "en": (
        "video lectures",
        "practice quiz",
        "forum discussion",
        "lab session",
        "reading assignment",
    ),
    "es": (
        "las clases en vídeo",
        "el cuestionario de práctica",
        "el foro de discusión",
        "la sesión de laboratorio",
        "la lectura asignada",
    ),
    "fr": (
        "les vidéos du cours",
        "le quiz d'entraînement",
        "le forum de discussion",
        "la séance de TP",
        "la lecture obligatoire",
    ),
}
#: language -> (understanding, engagement, stress) -> level (low, middle, high) -> phrases
_PHRASES = {
    "en": (
        (
            (
                "I still do not understand {topic}.",
                "I got lost when we covered {topic}.",
                "Honestly I find {topic} very confusing.",
            ),
            (
                "I understand parts of {topic} but not everything.",
                "Slowly I am getting the hang of {topic}.",
                "I can do the easy exercises on {topic}.",
            ),
            (
                "I can explain {topic} to a classmate now.",
                "Now I fully understand {topic}.",
                "I solved all the exercises on {topic}.",
            ),
        ),
        (
            (
                "I skipped the {activity} this week.",
                "I did not open the {activity}.",
                "I had no time for the {activity}.",
            ),
            (
                "I looked at part of the {activity}.",
                "I went through the {activity} quickly.",
                "I did some of the {activity}.",
            ),
            (
                "I enjoyed the {activity} and asked questions on the forum.",
                "I finished the {activity} and took detailed notes.",
                "I really liked the {activity} and helped other students.",
            ),
        ),
        (
            (
                "I feel calm and ready for the exam.",
                "I am relaxed and sleeping well.",
                "The workload feels manageable.",
            ),
            (
                "I am a bit tired but okay.",
                "Some days are busy but I cope.",
                "The deadlines are tight but fine.",
            ),
            (
                "I am worried I will fail the exam.",
                "I feel stressed and cannot sleep.",
                "I am anxious about my grades and the deadlines.",
            ),
        ),
    ),
    "es": (
        (
            (
                "Todavía no entiendo {topic}.",
                "Me perdí cuando vimos {topic}.",
                "Sinceramente me cuesta mucho entender {topic}.",
            ),
            (
                "Entiendo una parte de {topic} pero no todo.",
                "Poco a poco entiendo mejor {topic}.",
                "Puedo hacer los ejercicios fáciles sobre {topic}.",
            ),
            (
                "Ahora puedo explicar {topic} a un compañero.",
                "Ahora entiendo perfectamente {topic}.",
                "Resolví todos los ejercicios sobre {topic}.",
            ),
        ),
        (
            (
                "Esta semana no hice {activity}.",
                "No abrí {activity}.",
                "No tuve tiempo para {activity}.",
            ),
            (
                "Revisé una parte de {activity}.",
                "Hice {activity} muy rápido.",
                "Hice solo una parte de {activity}.",
            ),
            (
                "Disfruté mucho {activity} y pregunté en el foro.",
                "Terminé {activity} y tomé apuntes detallados.",
                "Aproveché {activity} y ayudé a otros estudiantes.",
            ),
        ),
        (
            (
                "Me siento tranquilo y preparado para el examen.",
                "Estoy relajado y duermo bien.",
                "La carga de trabajo es manejable.",
            ),
            (
                "Estoy un poco cansado pero bien.",
                "Algunos días son intensos pero puedo con ello.",
                "Los plazos son ajustados pero está bien.",
            ),
            (
                "Tengo miedo de suspender el examen.",
                "Me siento estresado y no puedo dormir.",
                "Me preocupan mis notas y los plazos.",
            ),
        ),
    ),
    "fr": (
        (
            (
                "Je ne comprends toujours pas {topic}.",
                "Je me suis perdu quand nous avons vu {topic}.",
                "Franchement j'ai beaucoup de mal avec {topic}.",
            ),
            (
                "Je comprends une partie de {topic} mais pas tout.",
                "Petit à petit je comprends mieux {topic}.",
                "J'arrive à faire les exercices faciles sur {topic}.",
            ),
            (
                "Je peux maintenant expliquer {topic} à un camarade.",
                "Maintenant {topic}, c'est parfaitement clair pour moi.",
                "J'ai résolu tous les exercices sur {topic}.",
            ),
        ),
        (
            (
                "Cette semaine j'ai sauté {activity}.",
                "Je n'ai pas ouvert {activity}.",
                "Je n'ai pas eu le temps pour {activity}.",
            ),
            (
                "J'ai regardé une partie de {activity}.",
                "J'ai fait {activity} rapidement.",
                "J'ai fait seulement une partie de {activity}.",
            ),
            (
                "J'ai adoré {activity} et j'ai posé des questions sur le forum.",
                "J'ai terminé {activity} et pris des notes détaillées.",
                "J'ai aimé {activity} et j'ai aidé d'autres étudiants.",
            ),
        ),
        (
            (
                "Je me sens calme et prêt pour l'examen.",
                "Je suis détendu et je dors bien.",
                "La charge de travail est raisonnable.",
            ),
            (
                "Je suis un peu fatigué mais ça va.",
                "Certains jours sont chargés mais je gère.",
                "Les délais sont serrés mais ça va.",
            ),
            (
                "J'ai peur de rater l'examen.",
                "Je me sens stressé et je n'arrive pas à dormir.",
                "Je m'inquiète pour mes notes et les délais.",
            ),
        ),
    ),
}


def _text(inst: Institution, people: dict[str, np.ndarray], rng: np.random.Generator) -> list[str]:
    """One reflection per learner: understanding, engagement and stress sentences, each kept
    with probability 0.85 (at least one), at a level that follows the latent with noise. An
    institution uses two of the three phrasings of each level."""
    n = len(people["ability"])
    latent = np.stack([people["ability"], people["engagement"], people["stress"] - 0.5], axis=1)
    levels = np.digitize(latent + rng.normal(0.0, 0.6, (n, 3)), [-0.6, 0.6])
    keep = rng.random((n, 3)) < 0.85
    empty = np.flatnonzero(~keep.any(axis=1))
    keep[empty, rng.integers(3, size=len(empty))] = True
    pick = rng.integers(2, size=(n, 3))
    topic_pick = rng.integers(4, size=n)
    activity_pick = rng.integers(5, size=n)
    texts = []
    for i in range(n):
        lang = str(people["language"][i])
        topic = _TOPICS[inst.domain][lang][topic_pick[i]]
        activity = _ACTIVITY_WORDS[lang][activity_pick[i]]
        sentences = []
        for slot in range(3):
            if keep[i, slot]:
                phrases = _PHRASES[lang][slot][levels[i, slot]]
                phrase = phrases[(inst.phrase_offset + pick[i, slot]) % len(phrases)]
                sentences.append(phrase.format(topic=topic, activity=activity))
        texts.append(" ".join(sentences))
    return texts


# ----------------------------------------------------------------------------- clickstream

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


def _clickstream(
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
    correct = rng.random(level.shape) < _sigmoid(1.5 * (level - rng.normal(0, 0.6, level.shape)))
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


# ----------------------------------------------------------------------------- tabular


def _tabular(
    inst: Institution, people: dict[str, np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    """`TABULAR_FEATURES` on a standard scale against the reference population."""
    n = len(people["ability"])
    a, e, s, w = people["ability"], people["engagement"], people["stress"], people["workload"]
    fg = people["first_generation"].astype(float)
    noise = rng.standard_normal((n, TABULAR_DIM))
    age = np.where(rng.random(n) < inst.mature_share, 1 + (rng.random(n) < 0.25), 0)
    attempts = rng.poisson(np.exp(-1.5 - 0.5 * a))
    columns = [
        0.7 * a - 0.35 * fg + 0.6 * noise[:, 0],  # prior_education
        0.7 * w + 0.7 * noise[:, 1],  # credits
        0.7 * e + 0.6 * noise[:, 2],  # active_days
        0.5 * e + 0.3 * a + 0.6 * noise[:, 3],  # submission_rate
        0.7 * a + 0.2 * e + 0.6 * noise[:, 4],  # mean_score
        (age - 0.4) / 0.6,  # age_band
        (attempts - 0.25) / 0.55,  # previous_attempts
        0.6 * e + 0.7 * noise[:, 7],  # click_volume
        -0.5 * e - 0.2 * a + 0.3 * s + 0.7 * noise[:, 8],  # late_submissions
        0.7 * fg - 0.25 + 0.8 * noise[:, 9],  # deprivation
        0.5 * e + 0.2 * w + 0.7 * noise[:, 10],  # activity_breadth
        0.4 * e + 0.9 * noise[:, 11],  # registration_lead
    ]
    return np.stack(columns, axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- signal


def _signal(people: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """[n, 64, 4] windows of EDA, heart rate, voice pitch and voice energy (z-scores)."""
    n = len(people["ability"])
    steps = SIGNAL_SHAPE[0]
    t = np.arange(steps, dtype=float)
    stress, engagement = people["stress"], people["engagement"]
    # electrodermal activity: tonic level and drift, phasic responses (fast rise, slow decay)
    tonic = 0.8 * stress + 0.3 * rng.standard_normal(n)
    eda = tonic[:, None] + rng.normal(0, 0.2, n)[:, None] * (t / steps)
    peaks = np.minimum(rng.poisson(0.6 + 2.0 * _sigmoid(2.0 * stress)), 5)
    onset = rng.uniform(0, steps - 8, (n, 5))
    amplitude = rng.uniform(0.4, 1.0, (n, 5)) * (np.arange(5) < peaks[:, None])
    lag = np.maximum(t[None, None, :] - onset[..., None], 0.0)
    eda += (amplitude[..., None] * (np.exp(-lag / 8.0) - np.exp(-lag / 2.0))).sum(axis=1)
    eda += rng.normal(0, 0.15, (n, steps))
    # heart rate: higher and less variable under stress
    variability = 0.5 * np.exp(-0.5 * stress)
    phase = rng.uniform(0, 2 * np.pi, n)
    heart = (0.7 * stress + 0.2 * engagement + 0.3 * rng.standard_normal(n))[:, None]
    heart = heart + variability[:, None] * np.sin(2 * np.pi * t / 10.0 + phase[:, None])
    heart += rng.normal(0, 0.2, (n, steps))
    # voice: speaking in blocks of 8 steps, more often when engaged
    speaking = np.repeat(
        rng.random((n, steps // 8)) < _sigmoid(0.5 + engagement)[:, None], 8, axis=1
    )
    baseline = np.select(
        [people["gender"] == "female", people["gender"] == "male"], [0.9, -0.9], 0.0
    )
    intonation = (0.2 + 0.3 * _sigmoid(engagement))[:, None] * np.sin(
        2 * np.pi * t / 16.0 + phase[:, None]
    )
    pitch = (baseline + 0.5 * stress)[:, None] + intonation + rng.normal(0, 0.15, (n, steps))
    pitch = np.where(speaking, pitch, 0.0)
    energy = np.where(
        speaking,
        (0.5 + 0.5 * engagement)[:, None] + rng.normal(0, 0.2, (n, steps)),
        -1.5 + rng.normal(0, 0.05, (n, steps)),
    )
    return np.stack([eda, heart, pitch, energy], axis=2).astype(np.float32)


# ----------------------------------------------------------------------------- image


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits: images [1797, 1, 8, 8] in [0, 1], labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32)[:, None], digits.target.astype(np.int64)


_WRONG_DIGITS = (0, 1, 4, 6, 8, 9)
_WRONG_WEIGHTS = np.array([1.0, 3.0, 1.5, 1.0, 1.0, 2.0]) / 9.5


def _image(
    inst: Institution, people: dict[str, np.ndarray], is_test: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Handwritten answers [n, 1, 8, 8] and the handwriting labels [n] (1 = prime digit)."""
    images, targets = _digits()
    n = len(people["ability"])
    correct = rng.random(n) < _sigmoid(1.3 * people["ability"] + 0.4)
    digit = np.where(
        correct,
        rng.choice(PRIME_DIGITS, n, p=inst.prime_weights),
        rng.choice(_WRONG_DIGITS, n, p=_WRONG_WEIGHTS),
    )
    held_out = np.arange(len(targets)) % 4 == 0
    source = np.empty(n, np.int64)
    for d in range(10):
        for test in (False, True):
            rows = np.flatnonzero((digit == d) & (is_test == test))
            pool = np.flatnonzero((targets == d) & (held_out == test))
            source[rows] = rng.choice(pool, len(rows))
    padded = np.pad(images[source], ((0, 0), (0, 0), (1, 1), (1, 1)))
    shift = np.where(rng.random((n, 2)) < 0.3, rng.integers(0, 3, (n, 2)), 1)
    out = np.stack([padded[i, :, y : y + 8, x : x + 8] for i, (y, x) in enumerate(shift)])
    out += rng.normal(0, 1, out.shape) * (0.04 + 0.08 * people["disability"])[:, None, None, None]
    return np.clip(out, 0.0, 1.0).astype(np.float32), correct.astype(np.int64)


# ----------------------------------------------------------------------------- per node


def node_records(node: NodeLike, config: DataConfig) -> int:
    """How many records (train + test) the node generates: `config.records` scaled by role."""
    if node.role not in ROLE_SCALE:
        raise ValueError(f'node "{node.id}": unknown role {node.role!r}')
    return max(4, round(config.records * ROLE_SCALE[node.role]))


def _presence(
    node: NodeLike, inst: Institution, rng: np.random.Generator, n: int
) -> dict[str, np.ndarray]:
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
    unknown = [m for m in node.modalities if m not in MODALITIES]
    unknown += [t for t in node.tasks if t not in TASKS]
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise ValueError(f'node "{node.id}": the built-in education data has no {names}')
    n = node_records(node, config)
    n_test = min(max(1, round(n * config.test_fraction)), n - 1)
    inst = institution_profile(node.institution or node.id, config.seed)
    rng = np.random.default_rng(np.random.SeedSequence(_entropy(config.seed, "node", node.id)))
    people = _skewed_learners(inst, config, rng, n)
    is_test = np.zeros(n, bool)
    is_test[rng.permutation(n)[:n_test]] = True
    present = _presence(node, inst, rng, n)

    clickstream, next_response = _clickstream(inst, people, rng)
    image, handwriting = _image(inst, people, is_test, rng)
    text = [t if p else "" for t, p in zip(_text(inst, people, rng), present["text"])]
    arrays = {
        "image": image,
        "signal": _signal(people, rng),
        "clickstream": clickstream,
        "tabular": _tabular(inst, people, rng),
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
    data = EduData(
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
    return data.subset(~is_test), data.subset(is_test)


def pooled_data(topology: Topology, config: DataConfig) -> tuple[EduData, EduData]:
    """Every node's (train, test) records concatenated: for the centralized reference only."""
    parts = [node_data(node, config) for node in topology.nodes]
    return EduData.concat([p[0] for p in parts]), EduData.concat([p[1] for p in parts])
