"""Loader for the Open University Learning Analytics Dataset (OULAD) into `EduData`.

`load_oulad(folder)` reads the data set's seven CSV files (studentInfo, studentRegistration,
courses, assessments, studentAssessment, vle, studentVle) with the `csv` module. One record is
one student's registration on one module presentation. A missing file or column, or a value
that does not parse, stops with a `ConfigError` naming the file, the line and the column.
Empty values and "?" count as missing where the data set has gaps (imd_band,
date_registration, an assessment's date, score); a submission without a score is ignored.

The mapping:

- prediction point: the student's last scored submission (by date_submitted, then
  id_assessment). `next_response` is 1 when its score is at least 40 (the pass mark), 0 below,
  and -1 for students with no scored submission. Everything the inputs hold happens before it:
  VLE activity dated before its submission day and the earlier scored submissions.
- clickstream: the distinct (day, activity type) pairs of VLE activity, as `CLICK_TOKENS`,
  ordered by day then token id, spaced evenly through the period when there are more than fit;
  the earlier submissions (the last twelve at most) are merged in on their submission day as
  `quiz_correct_<k>` (score >= 40) or `quiz_wrong_<k>`, with k = 0 for tutor-marked (TMA),
  1 for computer-marked (CMA) and 2 for exam assessments. Activity types map to tokens as in
  `ACTIVITY_TOKENS`; an unknown type becomes `page_view` with a warning.
- tabular (`TABULAR_FEATURES`, each z-scored over the loaded records, missing values at the
  mean): prior_education from highest_education (0 no formal qualifications .. 4
  postgraduate), credits = studied_credits, active_days = active days before the prediction
  point per day elapsed, submission_rate = earlier submissions per assessment due before it,
  mean_score of the earlier submissions, age_band (0-35, 35-55, 55<=), previous_attempts =
  num_of_prev_attempts, click_volume = log(1 + clicks before it), late_submissions (submitted
  after the assessment's date), deprivation from imd_band (9 for 0-10%, 0 for 90-100%),
  activity_breadth = distinct activity types before it, registration_lead = -date_registration.
- labels: `at_risk` = final_result Fail or Withdrawn; `engagement` = tertile (0 low, 1, 2 high)
  of the student's total clicks in the presentation; `stress` and `handwriting` -1.
- groups: gender (female, male), disability (yes, no), first_generation and language
  "unknown" (the data set does not record them), and two more attributes, imd_band and
  age_band, as the data set spells them ("unknown" where missing).
- present: tabular for every record, clickstream where the sequence is not empty; text, image
  and signal never.
"""

from __future__ import annotations

import csv
import math
import os
import re
from array import array
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from m3tgossip.edu.data.records import EduData
from m3tgossip.edu.data.schema import CLICK_LEN, TABULAR_FEATURES, TOKEN_ID, answer_token
from m3tgossip.errors import ConfigError
from m3tgossip.log import get_logger

log = get_logger(__name__)

#: OULAD activity_type -> clickstream token name
ACTIVITY_TOKENS = {
    "resource": "resource_download",
    "folder": "resource_download",
    "dataplus": "resource_download",
    "oucontent": "page_view",
    "page": "page_view",
    "subpage": "page_view",
    "sharedsubpage": "page_view",
    "dualpane": "page_view",
    "htmlactivity": "page_view",
    "repeatactivity": "page_view",
    "homepage": "homepage",
    "url": "external_link",
    "glossary": "glossary_lookup",
    "forumng": "forum_read",
    "oucollaborate": "live_session",
    "ouelluminate": "live_session",
    "quiz": "quiz_start",
    "externalquiz": "quiz_start",
    "questionnaire": "questionnaire",
    "ouwiki": "wiki_edit",
}
#: assessment_type -> quiz skill index of its answer tokens
ASSESSMENT_SKILL = {"TMA": 0, "CMA": 1, "Exam": 2}
PASS_MARK = 40.0
FILES = (
    "studentInfo.csv",
    "studentRegistration.csv",
    "courses.csv",
    "assessments.csv",
    "studentAssessment.csv",
    "vle.csv",
    "studentVle.csv",
)

_EDUCATION = {
    "No Formal quals": 0,
    "Lower Than A Level": 1,
    "A Level or Equivalent": 2,
    "HE Qualification": 3,
    "Post Graduate Qualification": 4,
}
_AGE = {"0-35": 0, "35-55": 1, "55<=": 2}
_GENDER = {"F": "female", "M": "male"}
_DISABILITY = {"Y": "yes", "N": "no"}
_RESULTS = ("Pass", "Distinction", "Fail", "Withdrawn")
_IMD = re.compile(r"(\d+)-(\d+)%?")
_MISSING = ("", "?")
_MAX_HISTORY = CLICK_LEN // 4

Key = tuple[str, str, str]  # code_module, code_presentation, id_student


class _Table:
    """One CSV file: checks the header and parses values, naming file, line and column."""

    def __init__(self, folder: Path, name: str, columns: tuple[str, ...]) -> None:
        self.path = folder / name
        self.columns = columns
        self.line = 0

    def rows(self) -> Iterator[list[str]]:
        """The rows' values in the order of `columns`; `self.line` is the current line."""
        if not self.path.is_file():
            raise ConfigError(
                str(self.path), "", "missing (an OULAD folder has " + ", ".join(FILES) + ")"
            )
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as handle:
                yield from self._read(handle)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            where = f"line {self.line}" if self.line else ""
            raise ConfigError(str(self.path), where, f"cannot read: {exc}") from None

    def _read(self, handle: TextIO) -> Iterator[list[str]]:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        if not header:
            raise ConfigError(str(self.path), "header", "the file is empty")
        for column in self.columns:
            if column not in header:
                raise ConfigError(
                    str(self.path), f"column {column!r}", f"missing from the header {header}"
                )
        index = [header.index(c) for c in self.columns]
        width = len(header)
        for row in reader:
            self.line = reader.line_num
            if not row:
                continue
            if len(row) != width:
                raise ConfigError(
                    str(self.path),
                    f"line {self.line}",
                    f"{len(row)} values, the header has {width}",
                )
            yield [row[i].strip() for i in index]

    def error(self, column: str, problem: str) -> ConfigError:
        return ConfigError(str(self.path), f"line {self.line}, column {column!r}", problem)

    def integer(self, column: str, value: str) -> int:
        try:
            return int(value)
        except ValueError:
            raise self.error(column, f"expected an integer, got {value!r}") from None

    def optional_integer(self, column: str, value: str) -> int | None:
        return None if value in _MISSING else self.integer(column, value)

    def optional_number(self, column: str, value: str) -> float | None:
        if value in _MISSING:
            return None
        try:
            number = float(value)
        except ValueError:
            raise self.error(column, f"expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise self.error(column, f"expected a finite number, got {value!r}")
        return number

    def choice(self, column: str, value: str, allowed: Collection[str]) -> str:
        if value not in allowed:
            raise self.error(column, f"expected one of {', '.join(allowed)}, got {value!r}")
        return value


@dataclass
class _Student:
    """What the loader gathers about one registration."""

    gender: str
    disability: str
    education: int
    age: str
    imd: str
    deprivation: float
    attempts: int
    credits: int
    result: str
    registration: float = math.nan
    length: int = 0
    #: (date_submitted, id_assessment, score, late)
    submissions: list[tuple[int, int, float, bool]] = field(default_factory=list)
    cutoff: float = math.inf
    #: VLE activity before the cutoff, date * 64 + token id
    events: array[int] = field(default_factory=lambda: array("q"))
    clicks_before: int = 0
    clicks_total: int = 0


def load_oulad(folder: str | os.PathLike[str], *, max_students: int | None = None) -> EduData:
    """Read an OULAD folder; with `max_students`, only the first students of studentInfo.csv
    (all registrations of each) are kept."""
    return load_oulad_registrations(folder, max_students=max_students)[1]


def load_oulad_registrations(
    folder: str | os.PathLike[str], *, max_students: int | None = None
) -> tuple[list[Key], EduData]:
    """As `load_oulad`, with each record's (code_module, code_presentation, id_student)."""
    if max_students is not None and (
        not isinstance(max_students, int) or isinstance(max_students, bool) or max_students < 1
    ):
        raise ValueError(f"max_students: must be a positive integer, got {max_students!r}")
    root = Path(folder)
    students = _student_info(root, max_students)
    _registrations(root, students)
    _courses(root, students)
    assessments = _assessments(root)
    _submissions(root, students, assessments)
    _activity(root, students)
    return list(students), _to_edudata(students, assessments)


def _student_info(root: Path, max_students: int | None) -> dict[Key, _Student]:
    table = _Table(
        root,
        "studentInfo.csv",
        (
            "code_module",
            "code_presentation",
            "id_student",
            "gender",
            "highest_education",
            "imd_band",
            "age_band",
            "num_of_prev_attempts",
            "studied_credits",
            "disability",
            "final_result",
        ),
    )
    students: dict[Key, _Student] = {}
    seen: set[str] = set()
    for (
        module,
        presentation,
        sid,
        gender,
        education,
        imd,
        age,
        attempts,
        credits,
        disability,
        result,
    ) in table.rows():
        table.integer("id_student", sid)
        if max_students is not None and sid not in seen and len(seen) >= max_students:
            continue
        seen.add(sid)
        deprivation = math.nan
        if imd not in _MISSING:
            match = _IMD.fullmatch(imd)
            if match is None:
                raise table.error("imd_band", f"expected a band like '20-30%', got {imd!r}")
            deprivation = (90 - int(match.group(1))) / 10
        students[(module, presentation, sid)] = _Student(
            gender=_GENDER[table.choice("gender", gender, _GENDER)],
            disability=_DISABILITY[table.choice("disability", disability, _DISABILITY)],
            education=_EDUCATION[table.choice("highest_education", education, _EDUCATION)],
            age=table.choice("age_band", age, _AGE),
            imd=imd if imd not in _MISSING else "unknown",
            deprivation=deprivation,
            attempts=table.integer("num_of_prev_attempts", attempts),
            credits=table.integer("studied_credits", credits),
            result=table.choice("final_result", result, _RESULTS),
        )
    return students


def _registrations(root: Path, students: dict[Key, _Student]) -> None:
    table = _Table(
        root,
        "studentRegistration.csv",
        ("code_module", "code_presentation", "id_student", "date_registration"),
    )
    for module, presentation, sid, date in table.rows():
        student = students.get((module, presentation, sid))
        if student is not None:
            registered = table.optional_integer("date_registration", date)
            student.registration = math.nan if registered is None else float(registered)


def _courses(root: Path, students: dict[Key, _Student]) -> None:
    table = _Table(
        root, "courses.csv", ("code_module", "code_presentation", "module_presentation_length")
    )
    lengths = {
        (module, presentation): table.integer("module_presentation_length", length)
        for module, presentation, length in table.rows()
    }
    for key, student in students.items():
        if key[:2] not in lengths:
            raise ConfigError(
                str(table.path),
                f"module {key[0]} {key[1]}",
                "not listed, but studentInfo.csv has it",
            )
        student.length = lengths[key[:2]]


@dataclass(frozen=True)
class _Assessment:
    module: str
    presentation: str
    skill: int
    date: int | None


def _assessments(root: Path) -> dict[int, _Assessment]:
    table = _Table(
        root,
        "assessments.csv",
        ("code_module", "code_presentation", "id_assessment", "assessment_type", "date"),
    )
    return {
        table.integer("id_assessment", aid): _Assessment(
            module,
            presentation,
            ASSESSMENT_SKILL[table.choice("assessment_type", kind, ASSESSMENT_SKILL)],
            table.optional_integer("date", date),
        )
        for module, presentation, aid, kind, date in table.rows()
    }


def _submissions(
    root: Path, students: dict[Key, _Student], assessments: dict[int, _Assessment]
) -> None:
    table = _Table(
        root, "studentAssessment.csv", ("id_assessment", "id_student", "date_submitted", "score")
    )
    for aid_text, sid, submitted_text, score_text in table.rows():
        aid = table.integer("id_assessment", aid_text)
        if aid not in assessments:
            raise table.error("id_assessment", f"{aid} is not in assessments.csv")
        submitted = table.integer("date_submitted", submitted_text)
        score = table.optional_number("score", score_text)
        item = assessments[aid]
        student = students.get((item.module, item.presentation, sid))
        if student is None or score is None:
            continue
        late = item.date is not None and submitted > item.date
        student.submissions.append((submitted, aid, score, late))
    for student in students.values():
        student.submissions.sort()
        if student.submissions:
            student.cutoff = student.submissions[-1][0]


def _activity(root: Path, students: dict[Key, _Student]) -> None:
    vle = _Table(root, "vle.csv", ("id_site", "activity_type"))
    site_token: dict[str, int] = {}
    unknown: set[str] = set()
    for site, kind in vle.rows():
        vle.integer("id_site", site)
        if kind not in ACTIVITY_TOKENS and kind not in unknown:
            unknown.add(kind)
            log.warning("%s: unknown activity_type %r, read as page_view", vle.path, kind)
        site_token[site] = TOKEN_ID[ACTIVITY_TOKENS.get(kind, "page_view")]
    table = _Table(
        root,
        "studentVle.csv",
        ("code_module", "code_presentation", "id_student", "id_site", "date", "sum_click"),
    )
    for module, presentation, sid, site, date_text, clicks_text in table.rows():
        student = students.get((module, presentation, sid))
        if student is None:
            continue
        if site not in site_token:
            raise table.error("id_site", f"{site} is not in vle.csv")
        date = table.integer("date", date_text)
        clicks = table.integer("sum_click", clicks_text)
        student.clicks_total += clicks
        if date < student.cutoff:
            student.clicks_before += clicks
            student.events.append(date * 64 + site_token[site])


def _sequence(
    codes: np.ndarray, student: _Student, assessments: dict[int, _Assessment]
) -> np.ndarray:
    """The clickstream row of one registration from its sorted distinct activity `codes`."""
    history = student.submissions[:-1][-_MAX_HISTORY:]
    room = CLICK_LEN - len(history)
    if len(codes) > room:
        codes = codes[np.rint(np.linspace(0, len(codes) - 1, room)).astype(int)]
    dates, tokens = codes // 64, codes % 64
    events = [(int(d), 0, int(t)) for d, t in zip(dates, tokens, strict=True)]
    events += [
        (day, 1, answer_token(assessments[aid].skill, score >= PASS_MARK))
        for day, aid, score, _ in history
    ]
    row = np.zeros(CLICK_LEN, np.int64)
    ordered = [token for _, _, token in sorted(events, key=lambda e: e[:2])]
    row[: len(ordered)] = ordered
    return row


def _zscore(column: np.ndarray) -> np.ndarray:
    known = column[~np.isnan(column)]
    if len(known) == 0:
        return np.zeros_like(column)
    spread = known.std()
    scaled = (column - known.mean()) / spread if spread > 0 else column - known.mean()
    return np.nan_to_num(scaled, nan=0.0)


def _to_edudata(registrations: dict[Key, _Student], assessments: dict[int, _Assessment]) -> EduData:
    students = list(registrations.values())
    n = len(students)
    data = EduData.empty(n)
    features = {name: np.full(n, math.nan) for name in TABULAR_FEATURES}
    due: dict[tuple[str, str], list[int]] = {}
    for item in assessments.values():
        if item.date is not None:
            due.setdefault((item.module, item.presentation), []).append(item.date)
    for i, (key, student) in enumerate(registrations.items()):
        codes = np.unique(np.frombuffer(student.events, np.int64))
        data.clickstream[i] = _sequence(codes, student, assessments)
        history = student.submissions[:-1]
        elapsed = max(1.0, min(student.cutoff, student.length))
        n_due = sum(date < student.cutoff for date in due.get(key[:2], []))
        values = {
            "prior_education": student.education,
            "credits": student.credits,
            "active_days": len(np.unique(codes // 64)) / elapsed,
            "submission_rate": min(1.0, len(history) / n_due) if n_due else math.nan,
            "mean_score": np.mean([s for _, _, s, _ in history]) / 100 if history else math.nan,
            "age_band": _AGE[student.age],
            "previous_attempts": student.attempts,
            "click_volume": math.log1p(student.clicks_before),
            "late_submissions": sum(late for *_, late in history),
            "deprivation": student.deprivation,
            "activity_breadth": len(np.unique(codes % 64)),
            "registration_lead": -student.registration,
        }
        for name, value in values.items():
            features[name][i] = value
        data.labels["at_risk"][i] = student.result in ("Fail", "Withdrawn")
        if student.submissions:
            data.labels["next_response"][i] = student.submissions[-1][2] >= PASS_MARK
    data.tabular = np.stack([_zscore(features[f]) for f in TABULAR_FEATURES], axis=1).astype(
        np.float32
    )
    total = np.array([s.clicks_total for s in students], float)
    if n:
        low, high = np.quantile(total, [1 / 3, 2 / 3])
        data.labels["engagement"] = (total > low).astype(np.int64) + (total > high)
    data.present["tabular"][:] = True
    data.present["clickstream"] = (data.clickstream != 0).any(axis=1)
    data.groups["gender"] = np.array([s.gender for s in students], "<U16")
    data.groups["disability"] = np.array([s.disability for s in students], "<U16")
    data.groups["imd_band"] = np.array([s.imd for s in students], "<U16")
    data.groups["age_band"] = np.array([s.age for s in students], "<U16")
    return data
