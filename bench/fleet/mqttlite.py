"""A minimal asyncio MQTT 3.1.1 client for the fleet simulator: thousands of connections in one event loop.

Why not paho: a paho client per simulated device costs a thread (loop_start) or a hand-written selector
loop around loop_read/loop_write/loop_misc, and its per-message Python overhead is several times this
one's. The fleet bench needs 10,000 connections on two cores next to the broker and the coordinator it is
measuring, so the simulator must be cheap. What this supports is exactly what a device does: CONNECT
(clean_session, will, keepalive), SUBSCRIBE, PUBLISH QoS 0/1 out (a future per QoS 1 PUBACK), PUBLISH
QoS 0/1 in (auto PUBACK), PINGREQ, DISCONNECT, and an abrupt abort (the broker then sends the will).
No QoS 2, no MQTT 5, no TLS, no automatic reconnect (the caller decides when to come back).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 1, 2, 3, 4, 8, 9, 12, 13, 14


class MqttError(RuntimeError):
    pass


@dataclass(frozen=True)
class LiteWill:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def connect_packet(client_id: str, clean: bool, keepalive: int, will: LiteWill | None) -> bytes:
    flags = 0x02 if clean else 0
    payload = _s(client_id)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += _s(will.topic) + struct.pack("!H", len(will.payload)) + will.payload
    return _packet(CONNECT << 4, _s("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload)


def publish_packet(topic: str, payload: bytes, qos: int, retain: bool, pid: int) -> bytes:
    body = _s(topic) + (struct.pack("!H", pid) if qos else b"") + payload
    return _packet((PUBLISH << 4) | (qos << 1) | int(retain), body)


class LiteClient(asyncio.Protocol):
    """One connection. `on_message(topic, payload)` runs in the event loop for every PUBLISH received."""

    def __init__(self, client_id: str, on_message: Callable[[str, bytes], None],
                 on_lost: Callable[[LiteClient], None] | None = None) -> None:
        self.client_id = client_id
        self.on_message = on_message
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._pid = 0
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._connack: asyncio.Future[int] | None = None
        self.connected = False

    # -- asyncio.Protocol --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= 2:
            n, mult, i = 0, 1, 1
            while True:
                if i >= len(buf):
                    return  # remaining length not complete yet
                b = buf[i]
                n += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
            if len(buf) < i + n:
                return
            first, body = buf[0], bytes(buf[i:i + n])
            del buf[:i + n]
            self._handle(first >> 4, first & 0x0F, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connected = False
        self.transport = None
        err = MqttError(f"{self.client_id}: connection lost ({exc})")
        for fut in [self._connack, *self._waiting.values()]:
            if fut is not None and not fut.done():
                fut.set_exception(err)
                fut.exception()  # mark retrieved: a lost ack is counted by the caller, not logged by asyncio
        self._waiting.clear()
        if self.on_lost is not None:
            self.on_lost(self)

    # -- packets in ---------------------------------------------------------------------------------------
    def _handle(self, kind: int, flags: int, body: bytes) -> None:
        if kind == PUBLISH:
            qos = (flags >> 1) & 3
            tlen = struct.unpack_from("!H", body)[0]
            topic = body[2:2 + tlen].decode()
            pos = 2 + tlen
            if qos:
                pid = struct.unpack_from("!H", body, pos)[0]
                pos += 2
                self._write(bytes([PUBACK << 4, 2]) + struct.pack("!H", pid))
            self.on_message(topic, body[pos:])
        elif kind in (PUBACK, SUBACK):
            fut = self._waiting.pop(struct.unpack_from("!H", body)[0], None)
            if fut is not None and not fut.done():
                fut.set_result(body[2] if kind == SUBACK and len(body) > 2 else 0)
        elif kind == CONNACK and self._connack is not None and not self._connack.done():
            self._connack.set_result(body[1])

    # -- packets out --------------------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _next_pid(self) -> int:
        self._pid = self._pid % 65535 + 1
        return self._pid

    async def handshake(self, clean: bool, keepalive: int, will: LiteWill | None, timeout: float) -> None:
        self._connack = asyncio.get_running_loop().create_future()
        self._write(connect_packet(self.client_id, clean, keepalive, will))
        rc = await asyncio.wait_for(self._connack, timeout)
        if rc != 0:
            raise MqttError(f"{self.client_id}: CONNACK return code {rc}")
        self.connected = True

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> asyncio.Future[int] | None:
        """QoS 1: a future that resolves on PUBACK (fails when the connection drops first)."""
        pid = self._next_pid() if qos else 0
        fut = None
        if qos:
            fut = asyncio.get_running_loop().create_future()
            self._waiting[pid] = fut
        self._write(publish_packet(topic, payload, qos, retain, pid))
        return fut

    def subscribe(self, topics: list[tuple[str, int]]) -> asyncio.Future[int]:
        pid = self._next_pid()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[pid] = fut
        body = struct.pack("!H", pid) + b"".join(_s(t) + bytes([q]) for t, q in topics)
        self._write(_packet((SUBSCRIBE << 4) | 0x02, body))
        return fut

    def ping(self) -> None:
        self._write(bytes([PINGREQ << 4, 0]))

    def disconnect(self) -> None:
        """Clean goodbye: the broker discards the will."""
        self._write(bytes([DISCONNECT << 4, 0]))
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT, like a device losing power: the broker sends the will."""
        if self.transport is not None:
            self.transport.abort()


async def open_client(host: str, port: int, client_id: str, on_message: Callable[[str, bytes], None], *,
                      clean: bool = False, keepalive: int = 60, will: LiteWill | None = None,
                      timeout: float = 20.0, on_lost: Callable[[LiteClient], None] | None = None) -> LiteClient:
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(
        loop.create_connection(lambda: LiteClient(client_id, on_message, on_lost), host, port), timeout)
    await proto.handshake(clean, keepalive, will, timeout)
    return proto
