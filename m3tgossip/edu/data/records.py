"""The dataset container `EduData`: N education records, one array (or list) per modality.

Every source of records fills it to the shapes of `m3tgossip.edu.data.schema`; training,
evaluation and the membership-inference audit read nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from m3tgossip.edu.data.schema import (
    CLICK_LEN,
    GROUP_ATTRIBUTES,
    IMAGE_SHAPE,
    MODALITIES,
    SIGNAL_SHAPE,
    TABULAR_DIM,
    TASKS,
)


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
    #: the learner (protected person) of each record [N]; default: one learner per record.
    #: Private training clips per learner, so records of one learner must share an id.
    learner: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.text)
        if self.learner is None:
            self.learner = np.arange(n, dtype=np.int64)
        if len(self.learner) != n:
            raise ValueError(f"EduData.learner has {len(self.learner)} records, text has {n}")
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
            learner=self.learner[idx] if self.learner is not None else None,
        )

    @staticmethod
    def concat(parts: Sequence[EduData]) -> EduData:
        """The records of all parts in order; the parts must have the same label and group keys.
        Learner ids are kept as they are: parts from different sources may reuse an id."""
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
            learner=np.concatenate([np.asarray(p.learner) for p in parts]),
        )
