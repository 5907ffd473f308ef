"""Writes this folder's small OULAD-format sample (synthetic students, OULAD's files and codes).

    python tests/data/oulad-sample/make_sample.py

Six module presentations, 20 students each, in the seven CSV files of the Open University
Learning Analytics Dataset with its columns and codes. A latent engagement per student drives
clicks, scores and the final result, so the at-risk and engagement labels can be learned.
Seeded: running it again writes the same files.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PRESENTATIONS = [
    ("AAA", "2013J", 268),
    ("AAA", "2014J", 269),
    ("BBB", "2013B", 240),
    ("BBB", "2013J", 268),
    ("CCC", "2014B", 241),
    ("DDD", "2013B", 240),
]
STUDENTS_PER_PRESENTATION = 20
REGIONS = [
    "East Anglian Region",
    "Scotland",
    "North Western Region",
    "South East Region",
    "West Midlands Region",
    "Wales",
    "London Region",
    "Yorkshire Region",
]
EDUCATION = [
    "No Formal quals",
    "Lower Than A Level",
    "A Level or Equivalent",
    "HE Qualification",
    "Post Graduate Qualification",
]
IMD = [
    "0-10%",
    "10-20%",
    "20-30%",
    "30-40%",
    "40-50%",
    "50-60%",
    "60-70%",
    "70-80%",
    "80-90%",
    "90-100%",
]
SITES = ["oucontent", "forumng", "resource", "subpage", "homepage", "quiz", "url", "ouwiki"]
ASSESSMENTS = [
    ("TMA", 19, 10.0),
    ("CMA", 40, 0.0),
    ("TMA", 54, 20.0),
    ("CMA", 88, 0.0),
    ("TMA", 117, 20.0),
    ("Exam", None, 100.0),
]


def write(name: str, header: list[str], rows: list[list[object]], quote: bool = False) -> None:
    with open(HERE / name, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_ALL if quote else csv.QUOTE_MINIMAL)
        writer.writerow(header)
        writer.writerows(["" if v is None else v for v in row] for row in rows)


def main() -> None:
    rng = np.random.default_rng(2013)
    info, registration, courses, assessments, submitted, vle, clicks = [], [], [], [], [], [], []
    ids = rng.choice(np.arange(11_000, 2_700_000), 200, replace=False)
    used = 0
    site_id, assessment_id = 546_600, 1_750
    for module, presentation, length in PRESENTATIONS:
        courses.append([module, presentation, length])
        sites = []
        for kind in SITES:
            site_id += int(rng.integers(1, 40))
            sites.append(site_id)
            vle.append([site_id, module, presentation, kind, None, None])
        items = []
        for kind, date, weight in ASSESSMENTS:
            assessment_id += 1
            due = length - 4 if date is None else date
            items.append((assessment_id, kind, due))
            assessments.append([module, presentation, assessment_id, kind, date, weight])
        here: set[int] = set()
        for _ in range(STUDENTS_PER_PRESENTATION):
            # a few students repeat a module in a later presentation (same id_student)
            sid = int(ids[int(rng.integers(0, used))]) if used else -1
            if presentation != "2014J" or rng.random() >= 0.2 or sid in here:
                sid, used = int(ids[used]), used + 1
            here.add(sid)
            engagement = rng.normal()
            ability = 0.5 * engagement + 0.9 * rng.normal()
            risk = -0.9 * engagement - 0.7 * ability + 0.5 * rng.normal()
            result = (
                "Withdrawn"
                if risk > 1.0
                else "Fail"
                if risk > 0.3
                else "Distinction"
                if risk < -1.3
                else "Pass"
            )
            leaves = int(rng.integers(20, length - 60)) if result == "Withdrawn" else length
            info.append(
                [
                    module,
                    presentation,
                    sid,
                    "F" if rng.random() < 0.5 else "M",
                    REGIONS[int(rng.integers(len(REGIONS)))],
                    EDUCATION[int(np.clip(round(1.5 + ability), 0, 4))],
                    "" if rng.random() < 0.05 else IMD[int(rng.integers(len(IMD)))],
                    "0-35" if rng.random() < 0.7 else "35-55" if rng.random() < 0.9 else "55<=",
                    int(rng.random() < 0.15),
                    int(rng.choice([30, 60, 60, 90, 120])),
                    "Y" if rng.random() < 0.1 else "N",
                    result,
                ]
            )
            registration.append(
                [
                    module,
                    presentation,
                    sid,
                    int(rng.integers(-120, 0)),
                    leaves if result == "Withdrawn" else None,
                ]
            )
            for aid, _kind, due in items:
                if due >= leaves or rng.random() < 0.1 + 0.15 * (risk > 0.3):
                    continue
                score = float(np.clip(round(62 + 14 * ability + 8 * rng.normal()), 0, 100))
                late = int(rng.integers(-3, 6)) if rng.random() < 0.3 else -1
                submitted.append([aid, sid, due + late, 0, None if rng.random() < 0.02 else score])
            days = max(2, int(rng.poisson(np.exp(2.6 + 0.6 * engagement))))
            for day in np.sort(
                rng.choice(np.arange(-10, min(leaves, length)), days, replace=False)
            ):
                for site in rng.choice(sites, int(rng.integers(1, 3)), replace=False):
                    clicks.append(
                        [
                            module,
                            presentation,
                            sid,
                            int(site),
                            int(day),
                            int(1 + rng.poisson(np.exp(1.0 + 0.4 * engagement))),
                        ]
                    )
    write(
        "studentInfo.csv",
        [
            "code_module",
            "code_presentation",
            "id_student",
            "gender",
            "region",
            "highest_education",
            "imd_band",
            "age_band",
            "num_of_prev_attempts",
            "studied_credits",
            "disability",
            "final_result",
        ],
        info,
        quote=True,
    )
    write(
        "studentRegistration.csv",
        [
            "code_module",
            "code_presentation",
            "id_student",
            "date_registration",
            "date_unregistration",
        ],
        registration,
    )
    write(
        "courses.csv", ["code_module", "code_presentation", "module_presentation_length"], courses
    )
    write(
        "assessments.csv",
        ["code_module", "code_presentation", "id_assessment", "assessment_type", "date", "weight"],
        assessments,
    )
    write(
        "studentAssessment.csv",
        ["id_assessment", "id_student", "date_submitted", "is_banked", "score"],
        submitted,
    )
    write(
        "vle.csv",
        ["id_site", "code_module", "code_presentation", "activity_type", "week_from", "week_to"],
        vle,
    )
    write(
        "studentVle.csv",
        ["code_module", "code_presentation", "id_student", "id_site", "date", "sum_click"],
        clicks,
    )


if __name__ == "__main__":
    main()
