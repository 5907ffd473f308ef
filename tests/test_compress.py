"""Compressed deltas: codecs through the wire, and error feedback through the replicas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from m3tgossip import protocol
from m3tgossip.errors import ProtocolError
from m3tgossip.harness import Testbed, TestbedSpec
from m3tgossip.protocol import DEFAULT_LIMITS, ENCODINGS, codecs, parse_codec

SESSION = "0" * 32


def through_wire(codec_spec: str, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    payload, meta, dense = parse_codec(codec_spec).encode("backbone", delta, 3, 0.0)
    msg = protocol.Message(
        protocol.MsgType.DELTA, "n0", SESSION, 1, 0, {}, {"backbone": payload}, {"backbone": meta}
    )
    frames = protocol.encode(msg)
    got = protocol.decode([bytes(f) for f in frames])
    return got.tensors["backbone"], dense, protocol.frames_nbytes(frames)


@pytest.mark.parametrize("spec", ["raw", "fp16", "int8", "topk:0.1", "topk:1.0"])
def test_receiver_decodes_exactly_what_the_sender_adds_to_its_replica(spec: str) -> None:
    delta = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    received, dense, _ = through_wire(spec, delta)
    assert received.shape == delta.shape
    assert np.array_equal(received.astype(np.float32), dense.astype(np.float32))


def test_compressed_sizes_and_topk_keeps_largest() -> None:
    delta = np.random.default_rng(1).standard_normal(10_000).astype(np.float32)
    sizes = {spec: through_wire(spec, delta)[2] for spec in ("raw", "fp16", "int8", "topk:0.05")}
    assert sizes["fp16"] < 0.55 * sizes["raw"] and sizes["int8"] < 0.3 * sizes["raw"]
    assert sizes["topk:0.05"] < 0.12 * sizes["raw"]
    received, _, _ = through_wire("topk:0.05", delta)
    kept = np.flatnonzero(received)
    assert len(kept) == 500
    assert np.min(np.abs(delta[kept])) >= np.sort(np.abs(delta))[-500]


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda h, p: h["tensors"][0].update(enc="int8"), ["needs dtype int8"]),
        (lambda h, p: h["tensors"][0].pop("scale"), ["needs a scale"]),
        (lambda h, p: h["tensors"][0].update(scale=-1.0), ["scale > 0"]),
    ],
)
def test_bad_int8_rejected(mutate, words) -> None:
    import msgpack

    payload, meta, _ = parse_codec("int8").encode("backbone", np.ones(8, np.float32), 0, 0.0)
    frames = protocol.encode(
        protocol.Message(
            protocol.MsgType.DELTA,
            "n0",
            SESSION,
            1,
            0,
            {},
            {"backbone": payload},
            {"backbone": meta},
        )
    )
    header = msgpack.unpackb(frames[0])
    if "needs dtype" in words[0]:
        header["tensors"][0]["dtype"] = "float32"
        frames = [msgpack.packb(header), np.ones(8, np.float32).tobytes()]
    else:
        mutate(header, None)
        frames = [msgpack.packb(header), bytes(frames[1])]
    with pytest.raises(ProtocolError) as info:
        protocol.decode(frames)
    assert all(w in str(info.value) for w in words)


def test_bad_topk_payload_rejected() -> None:
    import msgpack

    payload, meta, _ = parse_codec("topk:0.5").encode(
        "backbone", np.arange(8, dtype=np.float32), 0, 0.0
    )
    frames = protocol.encode(
        protocol.Message(
            protocol.MsgType.DELTA,
            "n0",
            SESSION,
            1,
            0,
            {},
            {"backbone": payload},
            {"backbone": meta},
        )
    )
    header, body = frames[0], bytearray(bytes(frames[1]))
    body[0:4] = np.array([99], "<i4").tobytes()  # index out of range / not increasing
    with pytest.raises(ProtocolError, match="topk indices"):
        protocol.decode([header, bytes(body)])
    with pytest.raises(ProtocolError, match="not a multiple"):
        protocol.decode([header, bytes(body[:-1])])
    assert msgpack.unpackb(header)["tensors"][0]["enc"] == "topk"


def test_bad_codec_names() -> None:
    for spec in ("zip", "topk", "topk:0", "topk:2", "topk:nan", "int8:3"):
        with pytest.raises(ValueError, match=f"compression {spec!r}"):
            parse_codec(spec)
    with pytest.raises(ValueError, match=r"topk needs a fraction in \(0, 1\], got 1.5"):
        codecs.TopK(1.5)


@pytest.mark.parametrize(
    ("spec", "tag"),
    [("raw", "raw"), ("fp16", "raw"), ("int8", "int8"), ("topk:0.25", "topk")],
)
def test_each_codec_decodes_its_own_wire_tag(spec: str, tag: str) -> None:
    codec = parse_codec(spec)
    delta = np.random.default_rng(2).standard_normal((4, 5)).astype(np.float64)
    payload, meta, dense = codec.encode("backbone", delta, 0, 0.0)
    assert codec.tag == meta.enc == tag
    decoder = codecs.decoder_for(meta.enc, "here")
    view = memoryview(np.ascontiguousarray(payload).reshape(-1).view(np.uint8))
    got = decoder.decode(view, meta, "here", DEFAULT_LIMITS)
    assert got.shape == delta.shape and not got.flags.writeable
    assert np.array_equal(got.astype(np.float64), dense.astype(np.float64))


def test_every_allowed_wire_tag_has_a_decoder() -> None:
    assert set(codecs.DECODERS) == set(ENCODINGS)
    with pytest.raises(ProtocolError, match=r"here: encoding 'zip' not known \(known: raw, int8"):
        codecs.decoder_for("zip", "here")


def test_codecs_refuse_to_load_with_a_tag_and_no_decoder(monkeypatch) -> None:
    monkeypatch.delitem(codecs.DECODERS, "topk")
    with pytest.raises(RuntimeError, match="wire encodings without a decoder in codecs.py: topk"):
        codecs._check_registry()
    monkeypatch.undo()
    monkeypatch.setattr(codecs, "ENCODINGS", ("raw", "int8"))
    with pytest.raises(RuntimeError, match=r"wire tag is not in ENCODINGS: topk \(topk\)"):
        codecs._check_registry()


@pytest.mark.multiprocess
def test_int8_gossip_with_error_feedback_reaches_consensus(tmp_path: Path) -> None:
    spec = tmp_path / "ring.toml"
    spec.write_text('name = "r6"\n[generator]\nkind = "cycle"\nn = 6\n')
    out = tmp_path / "bed"
    options = {"size": 256, "dtype": "float32"}
    settings = {"gossip.compression": "int8"}
    bed = TestbedSpec(
        spec, out, rounds=60, quiet=True, timeout=120, options=options, settings=settings
    )
    code = Testbed(bed).run().exit_code
    s = json.loads((out / "summary.json").read_text())
    assert code == 0
    assert s["final_consensus_error"] < 1e-4
