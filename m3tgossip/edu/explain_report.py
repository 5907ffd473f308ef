"""What `m3tgossip explain` writes: role views, the plot and OUT/explain.json.

Role views (`role_view`) split the records by what the data has and give shares per group: an
institution per course (a `course` attribute in learners.csv; the format has no course field
of its own, so without one: per value of each of the folder's group attributes), an
instructor per class (a `class` attribute; without one the node's records are its class), a
student per learner (their own records, each with its prediction explained). The role is the
node's, from the topology in its state folder. `explain` writes OUT/explain.json (keys in
`m3tgossip/docs/data.md`) and OUT/explain.png (stacked share bars per task; needs matplotlib,
the `plot` extra). The attributions themselves are `m3tgossip.edu.explain`'s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from m3tgossip.daemon.influence import summarize as neighbour_summary
from m3tgossip.edu.data.folder import read_folder
from m3tgossip.edu.explain import (
    FORMAT,
    MAX_GROUPS,
    MAX_LEARNERS,
    MAX_MODALITIES,
    MAX_OWN_RECORDS,
    REPEATS,
    ROLE_FIELDS,
    VALUE,
    Explainer,
)
from m3tgossip.edu.restore import build_model, load_trained_node
from m3tgossip.errors import ConfigError


def _by(view: str, group_names: Sequence[str], group_by: str | None) -> tuple[list[str], str]:
    """The attributes a view groups by ("learner" and "node" being special) and a note."""
    if group_by is not None:
        if group_by in ("learner", "node") or group_by in group_names:
            return [group_by], ""
        raise ConfigError(
            "--group-by",
            group_by,
            "not a group attribute of the data; it has "
            + ", ".join(["learner", "node", *group_names]),
        )
    wanted = ROLE_FIELDS[view]
    if wanted == "learner" or wanted in group_names:
        return [wanted], ""
    if view == "institution":
        if group_names:
            return list(group_names), (
                "the data has no course field (a `course` attribute in learners.csv): "
                "grouped by each of its group attributes instead"
            )
        return ["node"], "the data has no course field nor group attributes: the node as one group"
    return ["node"], (
        "the data has no class field (a `class` attribute in learners.csv): an instructor's node "
        "holds its class, so the view is the node's records"
    )


def role_view(
    explainer: Explainer,
    view: str,
    *,
    learners: Sequence[str],
    groups: Mapping[str, np.ndarray],
    records: Sequence[str],
    group_by: str | None = None,
    class_names: Callable[[str], Sequence[str]] | None = None,
    labels: Mapping[str, np.ndarray] | None = None,
    label_names: Callable[[str], Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Shapley shares per group of records (see the module docstring); a student view also
    explains each of the learner's records."""
    if view not in ROLE_FIELDS:
        raise ConfigError("--view", view, f"one of {', '.join(ROLE_FIELDS)}")
    by, note = _by(view, list(groups), group_by)
    learner = np.asarray(learners, dtype=str)
    out: dict[str, Any] = {"role": view, "by": by, "note": note or None, "groups": {}}
    notes = []
    for attribute in by:
        if attribute == "node":
            values = np.full(len(explainer), "all")
        elif attribute == "learner":
            values = learner
        else:
            values = np.asarray(groups[attribute], dtype=str)
        names, counts = np.unique(values, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        limit = MAX_LEARNERS if attribute == "learner" else MAX_GROUPS
        if len(order) > limit:
            notes.append(f"{attribute}: the {limit} largest of {len(order)} groups")
        out["groups"][attribute] = {
            str(names[j]): {
                "records": int(counts[j]),
                "tasks": explainer.shapley(values == names[j]),
            }
            for j in order[:limit]
        }
    if view == "student":
        shown = out["groups"].get("learner", {})
        own: dict[str, list[dict[str, Any]]] = {}
        for who in shown:
            mine = np.flatnonzero(learner == who)
            if len(mine) > MAX_OWN_RECORDS:
                notes.append(f"learner {who}: {MAX_OWN_RECORDS} of {len(mine)} records explained")
            own[who] = [
                {"record": records[i], **explainer.record(int(i), class_names, labels, label_names)}
                for i in mine[:MAX_OWN_RECORDS]
            ]
        out["predictions"] = own
    if notes:
        out["note"] = "; ".join([note, *notes]) if note else "; ".join(notes)
    return out


@dataclass
class Explanation:
    """What `explain` wrote."""

    json_path: Path
    png_path: Path | None
    report: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def plot(report: Mapping[str, Any], path: Path) -> Path | None:
    """Stacked modality share bars per task (negative shares below 0) to `path`; None if
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tasks = list(report["tasks"])
    mods = report["modalities"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(tasks), 4.2))
    up, down = np.zeros(len(tasks)), np.zeros(len(tasks))
    colours = plt.get_cmap("tab10")
    for k, m in enumerate(mods):
        shares = np.array(
            [(report["tasks"][t]["shares"] or {}).get(m, 0.0) for t in tasks], np.float64
        )
        bottom = np.where(shares >= 0, up, down)
        ax.bar(range(len(tasks)), shares, bottom=bottom, label=m, color=colours(k))
        up += np.clip(shares, 0, None)
        down += np.clip(shares, None, 0)
    labels = []
    for t in tasks:
        s = report["tasks"][t]
        labels.append(f"{t}\n{s['total']:.3f} nats" + ("" if s["shares"] else "\n(no shares)"))
    ax.set_xticks(range(len(tasks)), labels, fontsize=8)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("Shapley share of the modality")
    ax.set_title(f"node {report['node']}: {report['records']} records", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def explain(
    state_dir: str | Path,
    data_dir: str | Path,
    out: str | Path,
    *,
    record: str | None = None,
    max_records: int | None = None,
    view: str | None = None,
    group_by: str | None = None,
    repeats: int = REPEATS,
    seed: int = 0,
) -> Explanation:
    """Explain the node of `state_dir` on the records of `data_dir`; write OUT/explain.json and
    OUT/explain.png (see the module docstring and `m3tgossip/docs/data.md`)."""
    if max_records is not None and max_records < 1:
        raise ConfigError("explain", "--max-records", f"must be >= 1, got {max_records}")
    if repeats < 1:
        raise ConfigError("explain", "--repeats", f"must be >= 1, got {repeats}")
    if view is not None and view not in ROLE_FIELDS:
        raise ConfigError("explain", "--view", f"one of {', '.join(ROLE_FIELDS)}, got {view!r}")
    trained = load_trained_node(state_dir)
    model, node = trained.model, trained.node
    if len(model.modalities) > MAX_MODALITIES:
        raise ConfigError(str(state_dir), "modalities", f"more than {MAX_MODALITIES}")
    started = time.perf_counter()
    raw = read_folder(data_dir)
    data, notes = trained.adapter.apply(raw)
    notes = notes + raw.notes
    usable = np.zeros(len(raw), bool)
    for m in model.modalities:
        usable |= raw.present[m]
        if not raw.present[m].any():
            notes.append(f"{m}: no record of {data_dir} has it, so its phi is 0 by construction")
    if not usable.any():
        raise ConfigError(
            str(data_dir),
            "modalities",
            f"no record has any of node {node.id}'s modalities {list(model.modalities)} "
            f"(the folder has {list(raw.manifest.modalities)}): not a data folder for this node",
        )
    idx = np.flatnonzero(usable)
    sampled_from = len(idx)
    if max_records is not None and len(idx) > max_records:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(idx, max_records, replace=False))
        notes.append(f"{max_records} of {sampled_from} records (seeded sample, seed {seed})")
    position = None
    if record is not None:
        if record not in raw.records:
            raise ConfigError(str(raw.manifest.file("labels")), "--record", f"no record {record!r}")
        position = raw.records.index(record)
        if not usable[position]:
            raise ConfigError(
                str(data_dir),
                "--record",
                f"{record!r} has none of node {node.id}'s modalities {list(model.modalities)}",
            )
    labels = {t: data.labels[t][idx] for t in model.tasks}

    def label_names(t: str) -> Sequence[str]:  # labels by the folder's names, as `predict`
        spec = raw.manifest.tasks.get(t)
        return spec.classes if spec else trained.adapter.class_names(t)

    def class_names(t: str) -> Sequence[str]:  # the training folder's, else the same
        return trained.adapter.classes.get(t) or label_names(t)

    batch = model.prepare(data.subset(idx))
    read_s = time.perf_counter() - started
    t0 = time.perf_counter()
    explainer = Explainer(model, batch, labels)
    coalition_s = time.perf_counter() - t0
    report: dict[str, Any] = {
        "format": FORMAT,
        "node": node.id,
        "role": node.role,
        "institution": node.institution,
        "modalities": list(model.modalities),
        "data": str(data_dir),
        "records": len(idx),
        "usable": sampled_from,
        "skipped": int(len(raw) - sampled_from),
        "value": VALUE,
        "coalitions": explainer.full + 1,
        "tasks": explainer.shapley(),
    }
    t0 = time.perf_counter()
    for t, check in explainer.permutation(repeats, seed).items():
        report["tasks"][t]["permutation"] = check
    permutation_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if position is None:
        report["record"] = None
    else:
        hit = np.flatnonzero(idx == position)
        if len(hit):
            one, at, one_labels = explainer, int(hit[0]), labels
        else:  # outside the sample: its own 2^m passes
            one_labels = {t: data.labels[t][[position]] for t in model.tasks}
            one = Explainer(model, model.prepare(data.subset([position])), one_labels)
            at = 0
        report["record"] = {
            "record": record,
            "learner": raw.learners[position],
            **one.record(at, class_names, one_labels, label_names),
        }
    base = build_model(node, int(trained.info["seed"]), trained.options)
    report["components"] = explainer.components({c: x.copy() for c, x in base.vectors().items()})
    del base
    component_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    role = view or node.role
    report["view"] = role_view(
        explainer,
        role,
        learners=[raw.learners[i] for i in idx],
        groups={g: data.groups[g][idx] for g in raw.group_names},
        records=[raw.records[i] for i in idx],
        group_by=group_by,
        class_names=class_names,
        labels=labels,
        label_names=label_names,
    )
    view_s = time.perf_counter() - t0
    # which neighbours moved the held-out loss, from the rounds of `gossip.influence_every`
    report["neighbours"] = neighbour_summary(trained.metrics())
    report["forward_passes"] = explainer.passes
    report["seconds"] = {
        "read": read_s,
        "coalitions": coalition_s,
        "permutation": permutation_s,
        "components": component_s,
        "view": view_s,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot(report, out / "explain.png")
    if png is None:
        notes.append("matplotlib is not installed (the `plot` extra): JSON only, no explain.png")
    report["plot"] = png.name if png else None
    report["notes"] = notes
    path = out / "explain.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return Explanation(path, png, report, notes)
