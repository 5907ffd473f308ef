"""Erasure in the daemon: an operator's `forget_request`, the `forget` flood to every node,
who may ask for one, what each node does, and the report it writes.

The spec is `docs/protocol.md` (`forget_request`, `forget_reply`, `forget`). In short:

- `m3tgossip forget` sends `forget_request` to the node that holds the learners (or to the
  node that leaves). The node answers it only for an operator key (on CURVE; a plaintext node
  on loopback answers anyone), erases locally through its workload's `forget`, and floods a
  `forget` naming itself as origin, tagged for every node of the spec with the key it shares
  with that node (`protocol.erasure`).
- A node accepts a `forget` only if its own tag verifies against the origin's public key, and,
  for a node erasure, only if the origin is the node erased: a key that is not the learner's
  node (or the leaving node) cannot start one, even through a neighbour. A refused `forget` is
  logged with its reason and counted (`rejected`); the daemon goes on.
- An accepted `forget` is applied once (by request id), written to the report and forwarded
  to every neighbour, the one it came from included: each neighbour's own copy is the barrier
  below.
- Exact mode: every node returns to its stage checkpoint and the rounds that follow replay
  without the erased contribution. In a spec with `[[stages]]` that is the checkpoint of the
  start of the earliest stage that used the erased records: the stage the learners' node (or
  the erased node) joined at, 0 for a node there from the start (`rollback_stage`); a node
  returns to the `stage-<k-1>.npz` its previous stage ended with (`StageRunner`), or to its
  values before any training if it was not there yet. So that no value from before the
  erasure is mixed after it, the node forgets its replicas of its neighbours, restarts its
  published copy from its rolled-back values (sent as full state), and drops its neighbours'
  tensor messages until each neighbour's own `forget` of that request arrives: a neighbour
  forwards it right after its own rollback, on the same ordered link, so whatever follows it
  is from after.
- A node erasure: the neighbours stop mixing the leaving node for good; the leaving node
  stops once the flood is sent.

Each node writes `erasure-<request>.json` in its state folder (atomically): what was removed,
which components, the mode, the round, what the workload reports (verification figures at the
owner) and the time taken.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from m3tgossip import protocol
from m3tgossip.daemon import checkpoint
from m3tgossip.daemon.exchange import Exchange
from m3tgossip.daemon.link import Link
from m3tgossip.daemon.peers import Peer
from m3tgossip.daemon.state import NodeState
from m3tgossip.log import get_logger
from m3tgossip.net.security import OPERATOR_PREFIX, SECRET_SUFFIX, load_secret
from m3tgossip.protocol import erasure

log = get_logger(__name__)

MsgType = protocol.MsgType
#: message types whose content a rolled-back node must not mix from a neighbour behind it
_TENSOR_TYPES = frozenset({MsgType.DELTA, MsgType.STATE, MsgType.PUSH})


class Erasures:
    """The erasures a node started, accepted or refused."""

    def __init__(self, node: NodeState, link: Link, exchange: Exchange) -> None:
        self.node = node
        self.link = link
        self.exchange = exchange
        #: request id -> the accepted `forget` body
        self.seen: dict[str, dict[str, Any]] = {}
        #: neighbour -> the exact erasure whose `forget` it has not sent this node yet
        self.barrier: dict[str, str] = {}
        self.refused = 0
        #: nodes erased from the federation: nothing of them is handled again
        self.gone: set[str] = set()
        self._secret: str | None = None

    # ------------------------------------------------------------------ keys

    def secret(self) -> str | None:
        """This node's CURVE secret key (Z85), None on plaintext."""
        cfg = self.node.config
        if cfg.insecure or not cfg.key_dir:
            return None
        if self._secret is None:
            path = Path(cfg.key_dir) / f"{self.node.id}{SECRET_SUFFIX}"
            self._secret = load_secret(path).secret
        return self._secret

    def _tags(self, body: dict[str, Any]) -> dict[str, str]:
        own = self.secret()
        if own is None:
            return {}
        publics = {
            n.id: n.public_key
            for n in self.node.topology.nodes
            if n.id != self.node.id and n.public_key
        }
        return erasure.tags_for(own, publics, body)

    # ------------------------------------------------------------------ requests

    def on_request(self, routing_id: bytes, msg: protocol.Message, user: str | None) -> None:
        """`forget_request` from a client: refuse, or erase here and flood the `forget`."""
        body: dict[str, Any] = dict(msg.body)
        reason = self._request_refusal(body, user)
        request = ""
        if reason is None:
            request = secrets.token_hex(16)
            forget = {
                "request": request,
                "origin": self.node.id,
                "target": body["target"],
                "ids": list(body["ids"]),
                "mode": body["mode"],
            }
            try:
                self._apply(forget, own=True, via=None)
            except ValueError as exc:
                reason = str(exc)
            else:
                forget["tags"] = self._tags(forget)
                self._flood(forget)
        if reason is not None:
            self.refused += 1
            log.warning("%s: refused forget_request from %s: %s", self.node.id, user, reason)
            self.link.reply(
                routing_id,
                MsgType.FORGET_REPLY,
                {"accepted": False, "request": "", "reason": reason},
            )
            return
        self.link.reply(
            routing_id,
            MsgType.FORGET_REPLY,
            {"accepted": True, "request": request, "reason": f"{body['mode']} erasure started"},
        )
        if body["target"] == "node":
            self.node.stop_reason = "erased from the federation"

    def _request_refusal(self, body: dict[str, Any], user: str | None) -> str | None:
        if user is not None and not user.startswith(OPERATOR_PREFIX):
            return f"a forget request needs an operator key; this link is {user!r}"
        if body["target"] == "node" and body["ids"] != [self.node.id]:
            return (
                f"a node erases only itself: run `m3tgossip forget --node` against the node "
                f"that leaves, not {self.node.id!r}"
            )
        forgets = callable(getattr(self.node.workload, "forget", None))
        if body["target"] == "learner" and not forgets:
            return f"workload {self.node.workload.name!r} cannot erase learners"
        return None

    # ------------------------------------------------------------------ the flood

    def on_forget(self, peer: Peer, msg: protocol.Message) -> None:
        """A neighbour's `forget`: the barrier for its request, then accept (once) or refuse."""
        body: dict[str, Any] = dict(msg.body)
        if self.barrier.get(peer.id) == body["request"]:
            del self.barrier[peer.id]
        if body["request"] in self.seen:
            return
        reason = self._refusal(body)
        if reason is not None:
            self.link.rejected += 1
            self.refused += 1
            log.warning(
                "%s: refused forget %s from %s (origin %r): %s",
                self.node.id,
                body["request"][:8],
                peer.id,
                body["origin"],
                reason,
            )
            return
        try:
            self._apply(body, own=False, via=peer.id)
        except ValueError as exc:  # the workload could not follow it; the flood goes on
            log.error("%s: erasure %s failed here: %s", self.node.id, body["request"][:8], exc)
        self._flood(body)

    def _refusal(self, body: dict[str, Any]) -> str | None:
        origin = body["origin"]
        if origin == self.node.id:
            return "names this node as its origin, which never sent it"
        if origin not in self.node.topology.ids():
            return f"origin {origin!r} is not a node of the topology"
        if body["target"] == "node" and body["ids"] != [origin]:
            return f"a node erasure comes from the node itself; {origin!r} names {body['ids']}"
        own = self.secret()
        if own is None:
            return None  # plaintext on loopback: nothing is authenticated (docs/protocol.md)
        public = self.node.topology.node(origin).public_key
        if not public:
            return f"origin {origin!r} has no public_key in the topology"
        if not erasure.verify_tag(self.node.id, own, public, body):
            return f"its tag for this node is not {origin!r}'s: not sent by the learner's node"
        return None

    def _flood(self, body: dict[str, Any]) -> None:
        for peer in self.node.peers.values():
            if not peer.left:
                self.link.send(peer, MsgType.FORGET, body)

    def blocks(self, peer: Peer, msg: protocol.Message) -> bool:
        """Whether to drop a message from `peer`: it was erased from the federation, or this
        tensor message predates its rollback in an exact erasure."""
        if peer.id in self.gone:
            return True
        return msg.type in _TENSOR_TYPES and peer.id in self.barrier

    # ------------------------------------------------------------------ applying one

    def _apply(self, body: dict[str, Any], *, own: bool, via: str | None) -> None:
        node = self.node
        t0 = time.monotonic()
        forget = getattr(node.workload, "forget", None)
        erased_here = own or (body["target"] == "node" and body["ids"] == [node.id])
        stage, start = rollback_stage(node, body), None
        back_to = node.topology.stages[stage - 1].round if stage else 0
        if body["mode"] == "exact" and stage and node.topology.joins_at(node.id) < stage:
            found = checkpoint.load_file(node.config.state_path / f"stage-{stage - 1}.npz")
            if found is None:  # not kept (a state folder from elsewhere): the run's start
                log.warning(
                    "%s: no checkpoint of the start of stage %d; rolling back to the run's start",
                    node.id,
                    stage,
                )
                stage, back_to = 0, 0
            else:
                start = found[0]
        if callable(forget):
            kwargs = {"start": start} if start is not None else {}
            result = forget(body["target"], body["ids"], body["mode"], erased_here, **kwargs)
        else:
            result = {"note": f"workload {node.workload.name!r} holds nothing to erase"}
        self.seen[body["request"]] = body
        if body["target"] == "node":
            self.gone.add(body["ids"][0])
            gone = node.peers.get(body["ids"][0])
            if gone is not None:
                gone.reset(gone.session)
                gone.left = True
                gone.components = ()
        if body["mode"] == "exact" and not (own and body["target"] == "node"):
            # what the neighbours hold of this node starts over from the rolled-back values
            # (the mixers step from the published copy: an old one would bring the erased
            # contribution back), sent to each of them as full state after the `forget`
            for comp, x in node.shared.items():
                self.exchange.published[comp][...] = x
                self.exchange.version[comp] += 1
            for peer in node.peers.values():
                peer.replicas.clear()
                peer.versions.clear()
                peer.pending.clear()
                peer.heard.clear()
                peer.need_state = set(peer.components)
                if peer.live and peer.id != via:
                    self.barrier[peer.id] = body["request"]
        report = {
            "request": body["request"],
            "node": node.id,
            "origin": body["origin"],
            "target": body["target"],
            "ids": body["ids"],
            "mode": body["mode"],
            "approximate": body["mode"] == "approximate",
            "received_from": via,
            "round": node.round,
            "rolled_back_to_round": back_to if body["mode"] == "exact" else None,
            "rolled_back_to_stage": stage if body["mode"] == "exact" else None,
            "rolled_back_to_stage_name": (
                node.topology.stages[stage - 1].name if stage else "start"
            )
            if body["mode"] == "exact"
            else None,
            "rounds_to_replay": max(0, node.round - back_to) if body["mode"] == "exact" else 0,
            "time": time.time(),
            "time_s": time.monotonic() - t0,
            **result,
        }
        write_report(node.config.state_path, report)
        log.info(
            "%s: %s erasure %s of %s %s (origin %s)",
            node.id,
            body["mode"],
            body["request"][:8],
            body["target"],
            ", ".join(body["ids"][:5]),
            body["origin"],
        )


def rollback_stage(node: NodeState, body: Mapping[str, Any]) -> int:
    """The earliest stage that used the erased records: the stage the learners' node (the
    origin of a learner erasure) or the erased node joined at; 0 without stages."""
    erased = body["origin"] if body["target"] == "learner" else body["ids"][0]
    topology = node.topology
    if not topology.stages or erased not in topology.ids():
        return 0
    return topology.joins_at(erased)


def write_report(folder: Path, report: dict[str, Any]) -> Path:
    """`erasure-<request>.json` in `folder`: write, fsync, rename."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"erasure-{report['request']}.json"
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as fh:
        json.dump(report, fh, indent=2, sort_keys=True, default=_jsonable)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def _jsonable(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
