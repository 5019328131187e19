"""Test helpers for the coordinator: a synthetic mask, scripted fake clients that speak the real codec over
a real broker, and a coordinator running in a thread."""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from coordinator.config import CoordinatorConfig
from coordinator.server import Coordinator
from shared.codec import decode, encode
from shared.fingerprint import fp_tag
from shared.maskfile import Mask, MaskMeta
from shared.messages import ErrorCode, ErrorMsg, Heartbeat, Join, Message, Status, SyncRequest, Update
from shared.mqtt import MqttLink, Will
from shared.prng import raw_u64
from shared.sampling import plan_steps
from shared.topics import Topics

M = TypeVar("M")


def sampled(plan: Any, ids: Any) -> dict[str, int]:
    """{id: T} of the ids a wire RoundPlan samples (compact plans list only exceptions: shared/sampling.py)."""
    return {c: t for c in ids if (t := plan_steps(plan, c))}


def uid(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def synthetic_mask(
    nnz_per_layer: tuple[int, ...] = (300, 200), seed: int = 7, with_grad: bool = True
) -> Mask:
    """A mask over made-up (64, 64) layers; indices and grads from shared.prng (no global RNG)."""
    fp = hashlib.sha256(f"model-{seed}".encode()).hexdigest()
    layers, shapes, grad = {}, {}, {}
    for i, k in enumerate(nnz_per_layer):
        name = f"model.layers.{i}.mlp.down_proj"
        keys = torch.from_numpy(raw_u64(seed + i, 64 * 64).astype("int64") & 0x7FFFFFFFFFFFFFFF)
        idx = torch.sort(torch.argsort(keys)[:k]).values.to(torch.int64)
        layers[name], shapes[name] = idx, (64, 64)
        u = raw_u64(seed + 100 + i, k)
        grad[name] = torch.from_numpy(((u >> 40).astype("float64") / 2**24 - 0.5).astype("float32"))
    meta = MaskMeta(1, "test", sum(nnz_per_layer) / (64 * 64 * len(nnz_per_layer)), "synthetic", fp)
    return Mask(layers=layers, shapes=shapes, grad=grad if with_grad else None, meta=meta)


def synthetic_v0(nnz: int, seed: int = 3) -> torch.Tensor:
    u = raw_u64(seed, nnz)
    return torch.from_numpy(((u >> 40).astype("float64") / 2**24 - 0.5).astype("float32"))


class FakeClient:
    """A scripted device: joins, sends hand-made Updates, asks for syncs, collects what it receives."""

    def __init__(self, url: str, fleet: str, cid: str, *, clean: bool = True, run: bool = False) -> None:
        """`run`: also subscribe to the retained RunState (`wait_for(RunState, ...)`)."""
        self.cid, self.topics = cid, Topics(fleet)
        t = self.topics
        subs = [(t.plan, 1), (t.filter("result"), 1), (t.result_latest, 1), (t.to(cid), 1)] + ([(t.run, 1)] if run else [])
        will = Will(t.status(cid), encode(Status("", False, 1.0)), 1, True)
        self.link = MqttLink(url, cid, subscriptions=subs, will=will, clean_session=clean)
        self.link.start()
        assert self.link.wait_connected(10), "fake client could not connect"
        self._buffer: list[tuple[str, Message]] = []
        self._joined: tuple[str, str, int, int] | None = None
        self.rejoins = 0
        self._cv = threading.Condition()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._listen, daemon=True)
        self._reader.start()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.link.publish(topic, payload, qos, retain)

    def join(self, fingerprint: str, mask_id: str, n_samples: int = 10, last_round: int = -1) -> None:
        t = self.topics
        self._joined = (fingerprint, mask_id, n_samples, last_round)
        self.publish(t.status(self.cid), encode(Status("", True, time.time())), 1, True)
        self.publish(
            t.join(self.cid),
            encode(Join("", fingerprint, mask_id, n_samples, 1.0, {"cpu": True, "compact_plan": True}, last_round)),
        )

    def update(
        self,
        round: int,
        grads: list[float],
        n_samples: int,
        fingerprint: str,
        msg_id: int = 1,
        loss: float = 1.0,
    ) -> None:
        self.publish(
            self.topics.up(self.cid),
            encode(Update(round, msg_id, tuple(grads), n_samples, fp_tag(fingerprint), loss)),
        )

    def sync(self, have_round: int) -> None:
        self.publish(self.topics.sync(self.cid), encode(SyncRequest("", have_round)))

    def heartbeat(self, round: int = -1, temp_c: float | None = 51.5, rss: int = 300 << 20) -> None:
        hb = Heartbeat("", time.time(), 12.5, rss, 2 << 30, temp_c, 7.0, 0.4, 400 << 20, round)
        self.publish(self.topics.hb(self.cid), encode(hb), 0)

    def go_offline(self) -> None:
        self.publish(self.topics.status(self.cid), encode(Status("", False, time.time())), 1, True)

    def _listen(self) -> None:
        """Background reader, like a real device: decodes into the buffer, re-joins when asked to."""
        while not self._closed.is_set():
            try:
                msg = self.link.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if not msg.payload:
                continue
            m = decode(msg.payload)
            if isinstance(m, ErrorMsg) and m.code == ErrorCode.UNKNOWN_CLIENT and self._joined is not None:
                self.rejoins += 1  # the coordinator started after our join: join again (docs/ARCHITECTURE.md)
                self.join(*self._joined)
            self.seen(msg.topic, msg.payload, m)
            with self._cv:
                self._buffer.append((msg.topic, m))
                self._cv.notify_all()

    def seen(self, topic: str, payload: bytes, m: Any) -> None:
        """Called by the reader for every decoded message before it is buffered (subclasses react here)."""

    def wait_for(
        self,
        cls: type[M],
        pred: Callable[[M], bool] = lambda m: True,
        timeout: float = 15.0,
        topic: str | None = None,
    ) -> M:
        """First received message of `cls` matching `pred` (and `topic`); consumed from the buffer."""
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                for i, (tp, m) in enumerate(self._buffer):
                    if isinstance(m, cls) and pred(m) and (topic is None or tp == topic):
                        del self._buffer[i]
                        return m
                left = end - time.monotonic()
                if left <= 0:
                    got = [(tp.rsplit("/", 2)[-2:], type(m).__name__) for tp, m in self._buffer]
                    raise TimeoutError(f"{self.cid}: no {cls.__name__} within {timeout} s; got {got}")
                self._cv.wait(min(left, 0.2))

    def drain(self, seconds: float = 0.3) -> list[tuple[str, Message]]:
        time.sleep(seconds)
        with self._cv:
            out, self._buffer = self._buffer, []
        return out

    def close(self) -> None:
        self._closed.set()
        self._reader.join(2)
        self.link.stop(final=[(self.topics.status(self.cid), b"", 1, True)])


class ThreadedCoordinator:
    """A Coordinator running `run()` in a daemon thread."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.error: BaseException | None = None
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.rc = self.coord.run()
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def start(self) -> ThreadedCoordinator:
        self.coord.start()
        assert self.coord.link is not None and self.coord.link.wait_connected(10)
        self.thread.start()
        return self

    def join(self, timeout: float = 30.0) -> int:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.coord.stop()
            self.thread.join(10)
            raise TimeoutError("coordinator did not finish in time")
        if self.error is not None:
            raise self.error
        assert self.rc is not None
        return self.rc

    def stop(self) -> None:
        self.coord.stop()
        self.thread.join(15)


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `pred` every 50 ms; TimeoutError(what) when it is still false after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError(what)
        time.sleep(0.05)


def write_config_toml(path: Path, **keys: Any) -> Path:
    """A coordinator TOML file with a `[coordinator]` table of `keys` (Paths written as strings)."""
    lines = ["[coordinator]"]
    for k, v in keys.items():
        lines.append(f"{k} = {json.dumps(str(v) if isinstance(v, Path) else v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def make_config(tmp: Path, broker: str, **kw: Any) -> CoordinatorConfig:
    base: dict[str, Any] = dict(
        broker=broker, fleet=uid("f"), client_id=uid("coord"), state_dir=tmp / "state", mask=tmp / "mask.safetensors",
        steps=3, lr=1e-3, min_clients=2, round_deadline_s=30.0, metrics=False, sqlite_synchronous="normal",
    )  # fmt: skip
    base.update(kw)
    return CoordinatorConfig(**base)
