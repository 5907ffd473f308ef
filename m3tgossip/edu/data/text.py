"""The text modality: a learner's short written reflection on the course week.

Up to three sentences (understanding, engagement, stress) from phrase banks in English, Spanish
and French, about a topic of the institution's domain; the level of each sentence follows the
learner's latent with noise.
"""

from __future__ import annotations

import numpy as np

from m3tgossip.edu.data.institutions import DOMAINS, LANGUAGES, Institution

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


assert set(_TOPICS) == set(DOMAINS) and all(set(t) == set(LANGUAGES) for t in _TOPICS.values())
assert set(_ACTIVITY_WORDS) == set(LANGUAGES) and set(_PHRASES) == set(LANGUAGES)


def reflections(
    inst: Institution, people: dict[str, np.ndarray], rng: np.random.Generator
) -> list[str]:
    """One reflection per learner, in the learner's language.

    The understanding, engagement and stress sentences are each kept with probability 0.85 (at
    least one), at a level that follows the latent with noise. An institution uses two of the
    three phrasings of each level.
    """
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
