"""The M3T model: components, masking, personalization, flat views, exact LoRA, PEFT."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel
from tiny import TINY

from m3tgossip.edu.data import MODALITIES, TASKS, DataConfig, node_data
from m3tgossip.edu.model import TEXT_MODEL, Batch, LoraSpec, M3TConfig, M3TModel, build_node_model
from m3tgossip.edu.model.lora import lora_layers
from m3tgossip.edu.model.pretrained import DEFAULT_CHECKPOINT, load_checkpoint, minilm_path
from m3tgossip.edu.train import Trainer

ALL_TASKS = tuple(TASKS)


@dataclass(frozen=True)
class Spec:
    """A topology node entry with the attributes the data and the model read."""

    id: str = "n0"
    role: str = "instructor"
    institution: str | None = "uni-a"
    modalities: tuple[str, ...] = MODALITIES
    tasks: tuple[str, ...] = ALL_TASKS
    compute: str = "full"
    local: tuple[str, ...] = ()


def tiny_model(spec: Spec, **kwargs):
    return build_node_model(spec, checkpoint=None, config=TINY, **kwargs)


def data_of(spec: Spec, records: int = 40, seed: int = 0):
    return node_data(spec, DataConfig(records=records, seed=seed))


def held(spec: Spec) -> set[str]:
    names = {"fusion", "backbone"} | {f"encoder.{m}" for m in spec.modalities}
    return names | {f"{k}.{t}" for t in spec.tasks for k in ("head", "prompt")}


def test_components_have_names_policies_and_counts():
    spec = Spec(local=("head.stress",))
    model = tiny_model(spec)
    components = {c.name: c for c in model.components()}
    assert set(components) == held(spec) | {TEXT_MODEL}
    assert components[TEXT_MODEL].policy == "frozen"
    assert components[TEXT_MODEL].params > 20_000_000  # MiniLM-L6
    assert components["head.stress"].policy == "local"
    assert all(
        c.policy == "shared" for n, c in components.items() if n not in (TEXT_MODEL, "head.stress")
    )
    base = model.base
    assert components["encoder.image"].params == sum(
        p.numel() for p in base.encoders["image"].parameters()
    )
    assert components["fusion"].params == sum(p.numel() for p in base.fusion.parameters())
    # frozen_a: an adapted component trains exactly its LoRA B matrices
    for name in ("encoder.image", "fusion", "backbone"):
        prefix = "encoders.image" if name == "encoder.image" else name
        b_sizes = sum(
            layer.lora_B["default"].weight.numel()
            for n, layer in lora_layers(model.net).items()
            if n.startswith(prefix + ".")
        )
        assert components[name].trainable == b_sizes > 0
    head = base.heads["at_risk"]
    assert components["head.at_risk"].trainable == sum(
        p.numel() for p in head.parameters() if p.requires_grad
    )


def test_default_checkpoint_matches_the_default_config():
    ckpt = load_checkpoint(DEFAULT_CHECKPOINT)
    assert ckpt.config == M3TConfig()
    assert DEFAULT_CHECKPOINT.stat().st_size < 5_000_000
    model = build_node_model(Spec(modalities=("image", "tabular"), tasks=("at_risk",)))
    expected = ckpt.tensors["encoders.image.mlp.fc1.weight"]
    assert torch.equal(model.base.encoders["image"].mlp.fc1.base_layer.weight, expected)


def test_any_subset_of_modalities_including_none_gives_finite_outputs():
    spec = Spec(modalities=("image", "signal", "clickstream", "tabular"))
    model = tiny_model(spec)
    data, _ = data_of(spec)
    batch = model.prepare(data).take(torch.arange(16))
    for i, combo in enumerate(itertools.product([False, True], repeat=4)):
        for m, on in zip(spec.modalities, combo, strict=True):
            batch.present[m][i] = on
    out = model(batch)
    assert all(torch.isfinite(x).all() for x in out.values())
    # masking is real: a modality's features reach exactly the records that have it
    for m in spec.modalities:
        changed = Batch(dict(batch.inputs), batch.present)
        changed.inputs[m] = batch.inputs[m] + 1
        again = model(changed)
        has = batch.present[m]
        for t in spec.tasks:
            assert torch.allclose(out[t][~has], again[t][~has])
            assert not torch.isclose(out[t][has], again[t][has]).all(dim=1).any()


def test_hard_personalization_builds_only_held_components():
    spec = Spec(modalities=("text", "clickstream"), tasks=("at_risk", "next_response"))
    model = tiny_model(spec)
    assert set(model.base.encoders) == {"text", "clickstream"}
    assert "encoder.image" not in {c.name for c in model.components()}
    assert set(model.shared_vectors()) == held(spec)
    no_text = tiny_model(Spec(modalities=("image",), tasks=("handwriting",)))
    assert no_text.text_encoder is None
    assert TEXT_MODEL not in {c.name for c in no_text.components()}


def test_local_components_are_trained_but_not_shared():
    spec = Spec(
        modalities=("tabular",),
        tasks=("at_risk", "stress"),
        local=("head.at_risk", "prompt.at_risk"),
    )
    model = tiny_model(spec)
    assert set(model.shared_vectors()) == held(spec) - set(spec.local)
    assert set(spec.local) <= set(model.vectors())
    before = model.vectors()["head.at_risk"].copy()
    train, test = data_of(spec)
    Trainer(model, train, test, lr=1e-2).train_steps(3)
    assert not np.array_equal(model.vectors()["head.at_risk"], before)


def test_lite_node_trains_prompts_and_heads_and_follows_the_adapters():
    spec = Spec(
        modalities=("tabular", "signal"),
        tasks=("at_risk", "stress"),
        compute="lite",
        local=("head.stress", "encoder.signal"),
    )
    model = tiny_model(spec)
    policies = {c.name: c.policy for c in model.components()}
    assert policies["backbone"] == policies["fusion"] == policies["encoder.tabular"] == "followed"
    # a local component a lite node does not train never moves: it stays at its initial adapters
    assert policies["encoder.signal"] == "frozen"
    assert set(model.shared_vectors()) == {
        "backbone",
        "fusion",
        "encoder.tabular",
        "head.at_risk",
        "prompt.at_risk",
        "prompt.stress",
    }
    assert set(model.trained_flat()) == {
        "head.at_risk",
        "head.stress",
        "prompt.at_risk",
        "prompt.stress",
    }
    trained = {id(p) for p in model.trainable_parameters()}
    for c in ("backbone", "fusion", "encoder.tabular"):
        assert not any(id(p) in trained or p.requires_grad for p in model.flat[c].params)
    # training leaves the followed adapters alone and moves heads and prompts
    before = {c: x.copy() for c, x in model.vectors().items()}
    train, test = data_of(spec)
    Trainer(model, train, test, lr=1e-2).train_steps(3)
    after = model.vectors()
    for c in ("backbone", "fusion", "encoder.tabular"):
        assert np.array_equal(after[c], before[c])
    assert not np.array_equal(after["head.at_risk"], before["head.at_risk"])
    # a mixed value loaded into a followed component changes what the model computes
    batch = model.prepare(test)
    model.eval()
    with torch.no_grad():
        out = model(batch)["at_risk"].clone()
        model.load_shared_vectors({"backbone": before["backbone"] + 0.05})
        assert not torch.allclose(model(batch)["at_risk"], out)
    # every shared component has one layout on lite and full nodes, so they mix together
    full = tiny_model(Spec(modalities=spec.modalities, tasks=spec.tasks))
    for c, x in tiny_model(spec).shared_vectors().items():
        assert np.array_equal(full.shared_vectors()[c], x)


def test_shared_vectors_are_views_of_the_parameters():
    spec = Spec(modalities=("tabular",), tasks=("at_risk",))
    model = tiny_model(spec)
    train, test = data_of(spec)
    vectors = model.shared_vectors()
    assert vectors is model.shared_vectors()
    assert all(
        v.dtype == np.float32 and v.ndim == 1 and v.flags.c_contiguous for v in vectors.values()
    )
    batch = model.prepare(test)
    before = model(batch)["at_risk"].detach().clone()
    vectors["head.at_risk"] += 0.5  # in place, as the daemon mixes
    assert not torch.allclose(model(batch)["at_risk"], before)
    snapshot = vectors["backbone"].copy()
    Trainer(model, train, test, lr=1e-2).train_steps(2)  # the optimiser writes the same memory
    assert not np.array_equal(vectors["backbone"], snapshot)
    loaded = {c: np.zeros_like(v) for c, v in vectors.items()}
    model.load_shared_vectors(loaded)
    assert all(not v.any() for v in model.shared_vectors().values())


def test_a_task_output_does_not_depend_on_the_other_tasks_held():
    one = tiny_model(Spec(modalities=("tabular",), tasks=("at_risk",)))
    two = tiny_model(Spec(modalities=("tabular",), tasks=("at_risk", "engagement")))
    data, _ = data_of(Spec(modalities=("tabular",)))
    assert np.array_equal(one.vectors()["head.at_risk"], two.vectors()["head.at_risk"])
    assert torch.allclose(
        one(one.prepare(data))["at_risk"], two(two.prepare(data))["at_risk"], atol=1e-6
    )


def _train_two(mode: str) -> tuple:
    """Two nodes of one federation (same seed), trained on different records."""
    spec_a = Spec(id="a", modalities=("tabular", "signal"), tasks=("at_risk", "stress"))
    spec_b = Spec(id="b", institution="uni-b", modalities=spec_a.modalities, tasks=spec_a.tasks)
    lora = LoraSpec(rank=2, mode=mode, alpha=4.0)
    models = []
    for i, spec in enumerate((spec_a, spec_b)):
        model = tiny_model(spec, lora=lora, seed=7)
        Trainer(model, *data_of(spec), lr=5e-2, seed=i).train_steps(8)
        models.append(model)
    return models, tiny_model(spec_a, lora=lora, seed=7)


def _relative_error(models, mixed) -> float:
    a, b = (m.delta_weights() for m in models)
    got = mixed.delta_weights()
    num = sum(float((got[k] - (a[k] + b[k]) / 2).norm() ** 2) for k in got)
    den = sum(float(((a[k] + b[k]) / 2).norm() ** 2) for k in got)
    return (num / den) ** 0.5


def test_frozen_a_lora_averages_exactly():
    models, mixed = _train_two("frozen_a")
    vec_a, vec_b = (m.shared_vectors() for m in models)
    assert not np.allclose(vec_a["backbone"], vec_b["backbone"])
    mixed.load_shared_vectors({c: (vec_a[c] + vec_b[c]) / 2 for c in vec_a})
    assert _relative_error(models, mixed) < 1e-5


def test_separate_lora_has_a_cross_term_error():
    models, mixed = _train_two("separate")
    vec_a, vec_b = (m.shared_vectors() for m in models)
    mixed.load_shared_vectors({c: (vec_a[c] + vec_b[c]) / 2 for c in vec_a})
    assert _relative_error(models, mixed) > 1e-3


def test_adapters_round_trip_through_peft_save_and_from_pretrained(tmp_path):
    spec = Spec(modalities=("tabular", "clickstream"), tasks=("at_risk", "engagement"))
    model = tiny_model(spec, seed=3)
    train, test = data_of(spec)
    Trainer(model, train, test, lr=1e-2).train_steps(4)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter_config.json").is_file()
    batch = model.prepare(test)
    expected = model(batch)
    # PEFT's own loader on a fresh base model
    base = M3TModel(TINY, spec.modalities, {t: TASKS[t] for t in spec.tasks}, seed=3)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path))
    restored = peft_model(batch)
    # and the node model resumed from the folder
    resumed = tiny_model(spec, seed=3, adapters=tmp_path)
    again = resumed(batch)
    for t in spec.tasks:
        assert torch.allclose(restored[t], expected[t], atol=1e-6)
        assert torch.allclose(again[t], expected[t], atol=1e-6)
    for c, v in model.shared_vectors().items():
        assert np.array_equal(resumed.shared_vectors()[c], v)


def test_backbone_from_a_transformers_folder():
    spec = Spec(modalities=("tabular",), tasks=("at_risk",))
    model = tiny_model(spec, backbone_path=minilm_path(), backbone_layers=1)
    names = set(lora_layers(model.net))
    assert {
        "backbone.layers.0.attention.self.query",
        "backbone.layers.0.attention.self.value",
    } <= names
    assert model.identity["backbone"]["layers"] == 1
    train, test = data_of(spec)
    batch = model.prepare(test)
    before = model(batch)["at_risk"].detach().clone()
    assert torch.isfinite(before).all()
    Trainer(model, train, test, lr=1e-2).train_steps(2)
    assert not torch.allclose(model(batch)["at_risk"], before)
    # the pretrained layers stay frozen; adapters and the bridge are what the node shares
    bert_params = dict(model.base.backbone.layers.named_parameters())
    assert not any(p.requires_grad for n, p in bert_params.items() if "lora_" not in n)
    assert model.shared_vectors()["backbone"].size > 2 * 16 * 384
