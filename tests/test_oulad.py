"""The OULAD loader on a small hand-written copy of the data set's seven files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from m3tgossip.edu.data import (
    CLICK_LEN,
    GROUP_ATTRIBUTES,
    TABULAR_FEATURES,
    TOKEN_ID,
    answer_token,
    load_oulad,
)
from m3tgossip.errors import ConfigError

FILES = {
    "studentInfo.csv": ",".join(
        f'"{column}"'
        for column in (
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
        )
    )
    + """
"AAA","2013J","101","F","Scotland","HE Qualification","20-30%","0-35","0","60","Y","Pass"
"AAA","2013J","102","M","Wales","A Level or Equivalent","","35-55","1","120","N","Fail"
"AAA","2013J","103","F","Wales","Lower Than A Level","0-10%","55<=","0","60","N","Withdrawn"
"BBB","2014B","104","M","London","No Formal quals","90-100%","0-35","0","30","N","Distinction"
""",
    "studentRegistration.csv": """\
code_module,code_presentation,id_student,date_registration,date_unregistration
AAA,2013J,101,-30,
AAA,2013J,102,-10,
AAA,2013J,103,?,20
BBB,2014B,104,-5,
""",
    "courses.csv": """\
code_module,code_presentation,module_presentation_length
AAA,2013J,268
BBB,2014B,240
""",
    "assessments.csv": """\
code_module,code_presentation,id_assessment,assessment_type,date,weight
AAA,2013J,1,TMA,20,10
AAA,2013J,2,CMA,40,0
AAA,2013J,3,Exam,,100
BBB,2014B,4,TMA,30,20
""",
    "studentAssessment.csv": """\
id_assessment,id_student,date_submitted,is_banked,score
1,101,18,0,80
2,101,45,0,30
3,101,99,0,70
1,102,19,0,55
2,102,38,0,20
4,104,29,0,
""",
    "vle.csv": """\
id_site,code_module,code_presentation,activity_type,week_from,week_to
10,AAA,2013J,forumng,,
11,AAA,2013J,resource,,
12,AAA,2013J,quiz,,
20,BBB,2014B,oucontent,,
""",
    "studentVle.csv": """\
code_module,code_presentation,id_student,id_site,date,sum_click
AAA,2013J,101,10,5,3
AAA,2013J,101,11,5,2
AAA,2013J,101,10,5,1
AAA,2013J,101,12,50,4
AAA,2013J,101,10,120,9
AAA,2013J,102,11,-3,1
AAA,2013J,102,10,10,2
AAA,2013J,103,10,2,1
BBB,2014B,104,20,1,50
BBB,2014B,104,20,2,30
""",
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name, text in FILES.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


def row(*names: str | int) -> list[int]:
    tokens = [TOKEN_ID[n] if isinstance(n, str) else n for n in names]
    return tokens + [0] * (CLICK_LEN - len(tokens))


def test_mapping(folder: Path) -> None:
    data = load_oulad(folder)
    assert len(data) == 4
    # clickstream: activity before the last scored submission, earlier results as answer tokens
    assert data.clickstream.tolist() == [
        row(
            "forum_read",
            "resource_download",
            answer_token(0, True),
            answer_token(1, False),
            "quiz_start",
        ),
        row("resource_download", "forum_read", answer_token(0, True)),
        row("forum_read"),
        row("page_view", "page_view"),
    ]
    assert data.labels["at_risk"].tolist() == [0, 1, 1, 0]
    assert data.labels["next_response"].tolist() == [1, 0, -1, -1]
    assert data.labels["engagement"].tolist() == [1, 0, 0, 2]  # total clicks 19, 3, 1, 80
    assert data.labels["stress"].tolist() == [-1] * 4
    assert data.labels["handwriting"].tolist() == [-1] * 4
    assert set(data.groups) == {*GROUP_ATTRIBUTES, "imd_band", "age_band"}
    assert data.groups["gender"].tolist() == ["female", "male", "female", "male"]
    assert data.groups["disability"].tolist() == ["yes", "no", "no", "no"]
    assert data.groups["language"].tolist() == ["unknown"] * 4
    assert data.groups["imd_band"].tolist() == ["20-30%", "unknown", "0-10%", "90-100%"]
    assert data.groups["age_band"].tolist() == ["0-35", "35-55", "55<=", "0-35"]
    assert data.present["tabular"].all() and data.present["clickstream"].all()
    for modality in ("text", "image", "signal"):
        assert not data.present[modality].any()
    assert data.text == [""] * 4 and not data.image.any() and not data.signal.any()


def test_tabular(folder: Path) -> None:
    data = load_oulad(folder)
    assert data.tabular.dtype == np.float32 and data.tabular.shape == (4, len(TABULAR_FEATURES))
    column = {name: data.tabular[:, i] for i, name in enumerate(TABULAR_FEATURES)}
    np.testing.assert_allclose(column["credits"].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(column["credits"].std(), 1.0, atol=1e-5)
    assert np.argsort(column["credits"], kind="stable").tolist() == [3, 0, 2, 1]
    assert column["prior_education"].argmax() == 0 and column["prior_education"].argmin() == 3
    assert column["late_submissions"].argmax() == 0  # 101 handed in the CMA after its date
    assert column["deprivation"][1] == 0.0  # missing imd_band sits at the mean
    assert column["deprivation"][2] > column["deprivation"][0] > column["deprivation"][3]
    assert column["registration_lead"][0] > column["registration_lead"][1]
    assert column["activity_breadth"][0] > column["activity_breadth"][3]


def test_max_students(folder: Path) -> None:
    data = load_oulad(folder, max_students=2)
    assert len(data) == 2
    assert data.groups["gender"].tolist() == ["female", "male"]
    with pytest.raises(ValueError, match="max_students"):
        load_oulad(folder, max_students=0)


def replace_line(name: str, line: int, old: str, new: str):
    def edit(folder: Path) -> None:
        path = folder / name
        lines = path.read_text(encoding="utf-8").splitlines()
        assert old in lines[line - 1]
        lines[line - 1] = lines[line - 1].replace(old, new)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    return edit


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda f: (f / "vle.csv").unlink(), ["vle.csv", "missing"]),
        (
            replace_line("studentInfo.csv", 1, ',"final_result"', ""),
            ["studentInfo.csv", "column 'final_result'", "missing"],
        ),
        (
            replace_line("studentAssessment.csv", 3, ",30", ",abc"),
            ["studentAssessment.csv", "line 3", "column 'score'", "'abc'"],
        ),
        (
            replace_line("studentVle.csv", 4, ",5,1", ",five,1"),
            ["studentVle.csv", "line 4", "column 'date'"],
        ),
        (
            replace_line("studentInfo.csv", 3, '"Fail"', '"Failed"'),
            ["studentInfo.csv", "line 3", "column 'final_result'", "'Failed'"],
        ),
        (
            replace_line("studentVle.csv", 2, ",10,5,3", ",99,5,3"),
            ["studentVle.csv", "line 2", "column 'id_site'", "99 is not in vle.csv"],
        ),
        (
            replace_line("courses.csv", 3, "BBB", "CCC"),
            ["courses.csv", "BBB 2014B", "not listed"],
        ),
    ],
    ids=[
        "missing-file",
        "missing-column",
        "bad-score",
        "bad-date",
        "bad-result",
        "unknown-site",
        "unknown-module",
    ],
)
def test_errors(folder: Path, edit, expected: list[str]) -> None:
    edit(folder)
    with pytest.raises(ConfigError) as caught:
        load_oulad(folder)
    for text in expected:
        assert text in str(caught.value)
