#!/usr/bin/env python3
"""Delta exchange throughput between two node processes, against the hardware limit.

Four ways to move one component delta (float32) from a sender process to a receiver process
over ZeroMQ on 127.0.0.1, measured in the same run with the same flow control:

- `raw`: pyzmq DEALER -> ROUTER, one frame of the same size, nothing else done with it: the
  limit of ZeroMQ on this machine. The sender hands libzmq a memoryview of the array
  (`copy=False`); libzmq's I/O thread writes it to the TCP socket (the kernel copies it once),
  the receiver's I/O thread reads it into a fresh libzmq message (the kernel copies it once
  more), and Python gets that as a `zmq.Frame` (`copy=False`) and drops it.
- `pickle`: how PyTorch-based FL frameworks ship a `state_dict`. The sender pickles a dict of
  the header fields and the delta as a torch tensor (`torch.from_numpy`, no copy) with
  `pickle.dumps` (default protocol): the tensor pickles its storage through `torch.save` into
  an in-memory buffer that is embedded in the pickle as a bytes object, so the values are
  copied at least twice; `socket.send(bytes)` hands the result to libzmq without a further
  copy (pyzmq's copy threshold). The receiver's `recv_multipart()` (default `copy=True`)
  copies the message into a bytes object; `pickle.loads` copies the embedded bytes out of it
  and `torch.load`s them into a new storage (another copy); `.numpy()` shares that storage.
- `pickle-numpy`: the decentralizepy D-PSGD path: the same, but the dict holds the numpy array
  (a `state_dict` converted with `.numpy()`). `pickle.dumps` copies the values twice (the
  array's `tobytes` state, then into the pickle); the receiver's `recv_multipart()` copies
  the message into bytes and `pickle.loads` copies the values into the bytes object that
  becomes the array's buffer.
- `m3tgossip`: the project's path end to end: `protocol.encode` of a `delta` message (the tensor
  frame is a memoryview, no copy), the `Transport` (its socket options, its security, its
  `poll`), `protocol.decode` with every check (NaN/Inf and norm: one read of the values), the
  tensor read in place from the received frame.

The receivers of the last three ways then do the same with the delta, so among them only the
serialisation differs: each applies it to its replica of the sender (`mixing.add_into`, as the
daemon's `replica += delta`) and takes one CHOCO step (`mixing.choco_mix_into`).

Like with like: the `raw` and pickle sockets get every option a node's sockets get
(`transport.router_options`/`dealer_options` with the default `TransportConfig`: high-water
marks, maximum message size, heartbeats, `IMMEDIATE`, routing id) in a context with one I/O
thread, as the `Transport` makes them, and each way runs in `plain` and `curve` mode (CURVE on
the raw and pickle sockets too). Flow control, identical for all ways: the sender keeps at
most `window` messages unacknowledged, the receiver acknowledges every `ack_every` messages;
the first `warmup` messages are not timed. Throughput is payload bytes (the tensor) per
second between the acknowledgement of the warm-up and the last acknowledgement; each repeat
runs every way once, in turn, and the median over `--repeat` repeats is reported. Sender and
receiver run one compute thread each (`OMP_NUM_THREADS=1`).

    python benchmarks/exchange.py --out runs/bench-exchange.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq

from m3tgossip import protocol
from m3tgossip.consensus import add_into, choco_mix_into
from m3tgossip.net import (
    AllowList,
    Curve,
    Keypair,
    Plaintext,
    Transport,
    TransportConfig,
    dealer_options,
    router_options,
)

SIZES = {"64KB": 64 << 10, "4MB": 4 << 20, "64MB": 64 << 20}
WAYS = ("raw", "pickle", "pickle-numpy", "m3tgossip")
#: bytes allowed in flight per link (sets the window for each size)
IN_FLIGHT_BYTES = 256 << 20
#: bound on any wait for the peer process or an acknowledgement
WAIT_S = 120.0
COMPONENT = "backbone"


@dataclass(frozen=True)
class Trial:
    way: str
    mode: str
    size: int
    messages: int
    warmup: int
    window: int
    ack_every: int
    server: Keypair
    client: Keypair
    mix: bool = True


def plan(size: int, total_bytes: int) -> tuple[int, int, int, int]:
    """(timed messages, warm-up messages, window, ack every) for one message size."""
    window = max(2, min(32, IN_FLIGHT_BYTES // size))
    ack_every = max(1, window // 4)
    messages = max(4 * window, total_bytes // size)
    messages -= messages % ack_every
    warmup = max(ack_every, window)
    warmup -= warmup % ack_every
    return messages, warmup, window, ack_every


def _context() -> zmq.Context:
    """A context like the `Transport`'s."""
    ctx = zmq.Context(io_threads=1)
    ctx.setsockopt(zmq.MAX_SOCKETS, 4096)
    return ctx


def _keypair() -> Keypair:
    public, secret = zmq.curve_keypair()
    return Keypair(public.decode(), secret.decode())


def _curve_server(sock: zmq.Socket, keys: Keypair) -> None:
    sock.curve_server = True
    sock.curve_secretkey = keys.secret.encode()
    sock.curve_publickey = keys.public.encode()


def _curve_client(sock: zmq.Socket, keys: Keypair, server: str) -> None:
    sock.curve_serverkey = server.encode()
    sock.curve_publickey = keys.public.encode()
    sock.curve_secretkey = keys.secret.encode()


# ----------------------------------------------------------------------------- receiver


class Receiver:
    """Binds for one trial, then consumes `warmup + messages` messages, acknowledging counts."""

    def __init__(self, trial: Trial) -> None:
        self.t = trial
        self.ctx: zmq.Context | None = None
        self.transport: Transport | None = None
        n = trial.size // 4
        self.own = np.zeros(n, np.float32)
        self.mine = np.zeros(n, np.float32)  # our state as the neighbour holds it
        self.replica = np.zeros(n, np.float32)  # the neighbour's state as we hold it
        self.weights = {"recv": 0.5, "send": 0.5}
        if trial.way == "m3tgossip":
            security = (
                Curve(trial.server, AllowList.build({"send": trial.client.public}), {})
                if trial.mode == "curve"
                else Plaintext()
            )
            self.transport = Transport("recv", "tcp://127.0.0.1:0", {}, TransportConfig(), security)
            self.endpoint = self.transport.endpoint
        else:
            self.ctx = _context()
            self.sock = self.ctx.socket(zmq.ROUTER)
            router_options(self.sock, TransportConfig())
            if trial.mode == "curve":
                _curve_server(self.sock, trial.server)
            self.sock.bind("tcp://127.0.0.1:0")
            self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def mix(self, delta: np.ndarray) -> None:
        if not self.t.mix:
            return
        add_into(self.replica, delta)
        choco_mix_into(self.own, self.mine, {"send": self.replica}, self.weights)

    def run(self) -> None:
        total = self.t.warmup + self.t.messages
        count = 0
        deadline = time.monotonic() + WAIT_S
        while count < total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"receiver: {count} of {total} messages within {WAIT_S} s")
            if self.transport is not None:
                for routing_id, frames, _user in self.transport.poll(100):
                    msg = protocol.decode(frames)
                    self.mix(msg.tensors[COMPONENT])
                    count += 1
                    if count % self.t.ack_every == 0:
                        self.transport.reply(routing_id, [count.to_bytes(8, "little")])
                continue
            if not self.sock.poll(100):
                continue
            if self.t.way == "raw":
                routing_id, _payload = self.sock.recv_multipart(copy=False)
            else:
                routing_id, payload = self.sock.recv_multipart()
                delta = pickle.loads(payload)["tensors"][COMPONENT]
                self.mix(delta.numpy() if self.t.way == "pickle" else delta)
            count += 1
            if count % self.t.ack_every == 0:
                self.sock.send_multipart([routing_id, count.to_bytes(8, "little")], copy=False)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close(0)
        if self.ctx is not None:
            self.sock.close(0)
            self.ctx.term()


# ----------------------------------------------------------------------------- sender


def send_trial(trial: Trial, endpoint: str) -> float:
    """Run one trial against `endpoint`; return the timed seconds."""
    delta = np.random.default_rng(0).standard_normal(trial.size // 4).astype(np.float32)
    ctx: zmq.Context | None = None
    transport: Transport | None = None
    if trial.way == "m3tgossip":
        security = (
            Curve(trial.client, AllowList(), {"recv": trial.server.public})
            if trial.mode == "curve"
            else Plaintext()
        )
        transport = Transport(
            "send", "tcp://127.0.0.1:0", {"recv": endpoint}, TransportConfig(), security
        )
        sock = transport.dealers["recv"]  # acknowledgements come back on the DEALER
        session = protocol.new_session()
        meta = {COMPONENT: protocol.TensorMeta(COMPONENT, "float32", delta.shape, base=0)}

        def send(seq: int) -> bool:
            msg = protocol.Message(
                protocol.MsgType.DELTA,
                "send",
                session,
                seq,
                seq,
                {},
                tensors={COMPONENT: delta},
                meta=meta,
            )
            return transport.send("recv", protocol.encode(msg))
    else:
        ctx = _context()
        sock = ctx.socket(zmq.DEALER)
        dealer_options(sock, TransportConfig(), "send")
        if trial.mode == "curve":
            _curve_client(sock, trial.client, trial.server.public)
        sock.connect(endpoint)
        payload = memoryview(delta.view(np.uint8))

        def send(seq: int) -> bool:
            try:
                if trial.way == "raw":
                    sock.send(payload, flags=zmq.NOBLOCK, copy=False)
                else:
                    tensor = torch.from_numpy(delta) if trial.way == "pickle" else delta
                    obj = {
                        "sender": "send",
                        "seq": seq,
                        "round": seq,
                        "tensors": {COMPONENT: tensor},
                    }
                    sock.send(pickle.dumps(obj), flags=zmq.NOBLOCK)
            except zmq.Again:
                return False
            return True

    total = trial.warmup + trial.messages
    sent = acked = 0
    start = 0.0
    deadline = time.monotonic() + WAIT_S
    try:
        while acked < total:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"sender ({trial.way} {trial.mode} {trial.size}): {acked} of {total} "
                    f"acknowledged, {sent} sent, within {WAIT_S} s"
                )
            if sent < total and sent - acked < trial.window:
                if send(sent + 1):
                    sent += 1
                    continue
                if sent == 0:  # not connected yet
                    time.sleep(0.001)
                    continue
            if sock.poll(100):
                acked = int.from_bytes(sock.recv(), "little")
                if acked == trial.warmup:
                    start = time.perf_counter()
        return time.perf_counter() - start
    finally:
        if transport is not None:
            transport.close(0)
        if ctx is not None:
            sock.close(0)
            ctx.term()


# ----------------------------------------------------------------------------- processes


def receiver_main(conn: Any) -> None:
    while True:
        trial = conn.recv()
        if trial is None:
            return
        rx = Receiver(trial)
        try:
            conn.send(rx.endpoint)
            rx.run()
            # the last acknowledgements may still be queued: close once the sender has them
            if not conn.poll(WAIT_S) or conn.recv() != "close":
                raise TimeoutError("receiver: no close from the parent")
        finally:
            rx.close()
        conn.send("done")


def sender_main(conn: Any) -> None:
    while True:
        item = conn.recv()
        if item is None:
            return
        trial, endpoint = item
        conn.send(send_trial(trial, endpoint))


def _recv(conn: Any, what: str) -> Any:
    if not conn.poll(WAIT_S):
        raise TimeoutError(f"no {what} within {WAIT_S} s")
    return conn.recv()


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "platform": platform.platform(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--modes", nargs="*", default=["plain", "curve"], choices=["plain", "curve"])
    p.add_argument(
        "--bytes", type=float, default=512e6, help="payload bytes timed per run and size"
    )
    p.add_argument("--repeat", type=int, default=5, help="runs per way; the median is reported")
    p.add_argument("--out", help="write the rows as JSON to this file")
    p.add_argument(
        "--no-mix", action="store_true", help="diagnosis: receivers decode but do not apply or mix"
    )
    args = p.parse_args()

    spawn = mp.get_context("spawn")
    rx_conn, rx_child = spawn.Pipe()
    tx_conn, tx_child = spawn.Pipe()
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    os.environ.update(env)
    receiver = spawn.Process(target=receiver_main, args=(rx_child,), daemon=True)
    sender = spawn.Process(target=sender_main, args=(tx_child,), daemon=True)
    receiver.start()
    sender.start()
    info = machine()
    print(
        f"setup: {info['cpu']}, {info['cores']} cores, load average {info['load_average']:.2f}, "
        f"python {info['python']}, numpy {info['numpy']}, torch {info['torch']}, "
        f"pyzmq {info['pyzmq']} (libzmq {info['libzmq']}); sender and receiver in two processes "
        f"on 127.0.0.1; float32 deltas; ~{args.bytes / 1e6:.0f} MB timed per run, "
        f"median of {args.repeat}",
        flush=True,
    )
    server, client = _keypair(), _keypair()
    rows = []
    try:
        for mode in args.modes:
            for label in args.sizes:
                size = SIZES[label]
                messages, warmup, window, ack_every = plan(size, int(args.bytes))
                rates: dict[str, list[float]] = {w: [] for w in WAYS}
                for _ in range(args.repeat):
                    for way in WAYS:
                        trial = Trial(
                            way,
                            mode,
                            size,
                            messages,
                            warmup,
                            window,
                            ack_every,
                            server,
                            client,
                            mix=not args.no_mix,
                        )
                        rx_conn.send(trial)
                        endpoint = _recv(rx_conn, "receiver endpoint")
                        tx_conn.send((trial, endpoint))
                        seconds = _recv(tx_conn, "sender result")
                        rx_conn.send("close")
                        if _recv(rx_conn, "receiver end") != "done":
                            raise RuntimeError("receiver failed")
                        rates[way].append(messages * size / seconds)
                med = {w: statistics.median(r) for w, r in rates.items()}
                row = {
                    "size_bytes": size,
                    "mode": mode,
                    "bytes_per_s": med["m3tgossip"],
                    "raw_bytes_per_s": med["raw"],
                    "pickle_bytes_per_s": med["pickle"],
                    "pickle_numpy_bytes_per_s": med["pickle-numpy"],
                    "ratio_to_raw": med["m3tgossip"] / med["raw"],
                    "ratio_to_pickle": med["m3tgossip"] / med["pickle"],
                    "ratio_to_pickle_numpy": med["m3tgossip"] / med["pickle-numpy"],
                    "messages": messages,
                    "warmup": warmup,
                    "window": window,
                    "ack_every": ack_every,
                    "runs": {w: r for w, r in rates.items()},
                }
                rows.append(row)
                print(
                    f"{mode:<6}{label:>6}  m3tgossip {med['m3tgossip'] / 1e9:6.3f} GB/s  "
                    f"raw {med['raw'] / 1e9:6.3f}  pickle {med['pickle'] / 1e9:6.3f}  "
                    f"pickle-numpy {med['pickle-numpy'] / 1e9:6.3f}  "
                    f"ratio to raw {row['ratio_to_raw']:.2f}  "
                    f"to pickle {row['ratio_to_pickle']:.2f}  "
                    f"to pickle-numpy {row['ratio_to_pickle_numpy']:.2f}  "
                    f"({messages} msgs, window {window}, ack every {ack_every})",
                    flush=True,
                )
    finally:
        for conn in (rx_conn, tx_conn):
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in (receiver, sender):
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
    print(
        f"\n{'mode':<6}{'size':>6}{'m3t GB/s':>10}{'raw GB/s':>10}{'pickle GB/s':>12}"
        f"{'pickle-np GB/s':>15}{'/raw':>7}{'/pickle':>9}{'/pickle-np':>12}"
    )
    for r in rows:
        label = next(k for k, v in SIZES.items() if v == r["size_bytes"])
        print(
            f"{r['mode']:<6}{label:>6}{r['bytes_per_s'] / 1e9:>10.3f}"
            f"{r['raw_bytes_per_s'] / 1e9:>10.3f}{r['pickle_bytes_per_s'] / 1e9:>12.3f}"
            f"{r['pickle_numpy_bytes_per_s'] / 1e9:>15.3f}"
            f"{r['ratio_to_raw']:>7.2f}{r['ratio_to_pickle']:>9.2f}{r['ratio_to_pickle_numpy']:>12.2f}"
        )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {"setup": {**info, "bytes": args.bytes, "repeat": args.repeat}, "rows": rows},
                indent=2,
            )
        )
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
