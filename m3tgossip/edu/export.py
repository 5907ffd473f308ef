"""`m3tgossip export --state-dir DIR --out DIR2`: a trained node's model, for use elsewhere.

DIR2 receives:

- `adapter_config.json`, `adapter_model.safetensors`: the LoRA adapters in PEFT's own format,
  with the task heads and prompts as PEFT `modules_to_save` (a `lite` node's adapters are the
  ones it mixed with their holders without training them);
- `m3t.json`: what the base model is (M3T config, modalities, tasks and their class names, the
  base checkpoint's digest, LoRA settings), enough to rebuild it and load the adapters;
- `preprocessing.json`: how records are adapted to the model's inputs (`adapt.Adapter`);
- `README.md`: the model card: components with their sharing policy, sizes and holders in the
  topology, rounds trained, the last evaluation and the privacy spent (from the last metrics
  record that has them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from m3tgossip.edu.restore import TrainedNode, load_trained_node

FORMAT = "m3tgossip.export/1"


def _last(records: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    for record in reversed(records):
        if record.get(key):
            return record
    return None


def describe(trained: TrainedNode) -> dict[str, Any]:
    """`m3t.json`: the base model and how the exported files fit it."""
    model, node = trained.model, trained.node
    identity = model.identity
    return {
        "format": FORMAT,
        "node": node.id,
        "role": node.role,
        "institution": node.institution,
        "compute": node.compute,
        "modalities": list(model.modalities),
        "tasks": {t: list(trained.adapter.class_names(t)) for t in model.tasks},
        "config": identity["config"],
        "lora": identity["lora"],
        "base_checkpoint": identity["checkpoint"],
        "backbone": identity["backbone"],
        "text_model": identity["text_model"],
        "seed": identity["seed"],
        "model_id": trained.model_id,
        "round": trained.meta.get("round"),
        "topology": trained.topology.name,
    }


def _holders(trained: TrainedNode, component: str, policy: str) -> str:
    if policy == "shared":
        return ", ".join(trained.topology.holders(component))
    if policy == "followed":
        return ", ".join(trained.topology.holders(component)) + " (mixed here, not trained)"
    if policy == "local":
        return f"{trained.node.id} only (never shared)"
    return "none (not trained; the base weights)"


def model_card(trained: TrainedNode) -> str:
    """The README.md of an export."""
    node, meta = trained.node, trained.meta
    records = trained.metrics()
    data = "its own data folder" if trained.adapter.source == "folder" else "built-in records"
    lines = [
        f"# M3T model of node `{node.id}`",
        "",
        f"Role `{node.role}`{f', institution `{node.institution}`' if node.institution else ''}, "
        f'in the topology "{trained.topology.name}". Trained with m3tgossip (decentralized '
        "gossip learning: the node trained on its own records and averaged its shared "
        "components with its neighbours; no records left it).",
        "",
        f"- modalities: {', '.join(trained.model.modalities)}",
        f"- tasks: {', '.join(trained.model.tasks)}",
        f"- compute tier: {node.compute}; model id `{trained.model_id}`",
        f"- rounds trained: {meta.get('round')}",
        f"- data: {data}",
        "",
        "## Components",
        "",
        "| component | policy | parameters | trained here | holders |",
        "|---|---|---|---|---|",
    ]
    for c in trained.model.components():
        lines.append(
            f"| `{c.name}` | {c.policy} | {c.params} | {c.trainable} | "
            f"{_holders(trained, c.name, c.policy)} |"
        )
    lines += ["", "## Evaluation", ""]
    evaluation = _last(records, "tasks")
    if evaluation is None:
        lines.append("No evaluation recorded.")
    else:
        lines.append(f"On the node's held-out records at round {evaluation.get('round')}:")
        lines.append("")
        lines += ["| task | accuracy | macro-F1 | records |", "|---|---|---|---|"]
        for task, m in evaluation["tasks"].items():
            lines.append(f"| {task} | {m['acc']:.3f} | {m['f1']:.3f} | {m['n']} |")
    lines += ["", "## Privacy", "", f"Profile: `{node.privacy}`."]
    privacy = _last(records, "privacy")
    if privacy is None:
        lines.append("No privacy accounting recorded: updates were shared without DP noise.")
    else:
        p = privacy["privacy"]
        lines.append(f"Epsilon spent at round {privacy.get('round')}: {p.get('node_epsilon')}")
        for comp, eps in sorted(p.get("epsilon", {}).items()):
            lines.append(f"- `{comp}`: {eps}")
        if p.get("retired"):
            lines.append(f"Budget spent (no longer shared): {', '.join(p['retired'])}")
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "import json",
        "",
        "from peft import PeftModel",
        "from m3tgossip.edu.model import M3TConfig, M3TModel",
        "from m3tgossip.edu.model.node_model import load_base_weights",
        "from m3tgossip.edu.model.pretrained import DEFAULT_CHECKPOINT, load_checkpoint",
        "",
        "info = json.load(open('m3t.json'))",
        "base = M3TModel(M3TConfig.from_dict(info['config']), info['modalities'],",
        "                {t: len(c) for t, c in info['tasks'].items()}, seed=info['seed'])",
        "load_base_weights(base, load_checkpoint(DEFAULT_CHECKPOINT), None)",
        "model = PeftModel.from_pretrained(base, '.')",
        "```",
        "",
    ]
    return "\n".join(lines)


def export(state_dir: str | Path, out: str | Path) -> Path:
    """Write the node of `state_dir` into the folder `out` (see the module docstring)."""
    trained = load_trained_node(state_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trained.model.save_pretrained(out)
    (out / "m3t.json").write_text(json.dumps(describe(trained), indent=2) + "\n")
    (out / "preprocessing.json").write_text(json.dumps(trained.adapter.to_json(), indent=2) + "\n")
    (out / "README.md").write_text(model_card(trained))
    return out
