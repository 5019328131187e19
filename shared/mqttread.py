"""paho's Client with a buffered socket read, plain PUBLISH packets parsed in bulk, and PUBACKs in bulk.

The link (shared/mqtt.py) runs on this subclass. paho 2.x spends most of its network thread per message
on machinery a plain QoS 0/1 PUBLISH does not need, and the coordinator receives ~10,000 of them a second:

- Reading. paho reads every packet with three or more recv() calls (command byte, length bytes, body)
  and one select() per packet. Here one recv() of up to READ_CHUNK bytes fills a buffer; `_sock_recv`
  serves paho's small reads from it, and `loop_read` goes on while it holds bytes, so nothing waits in
  the buffer while select() sleeps. A turn makes at most READS_PER_LOOP socket reads, then "would block"
  (paho keeps a partial packet and select() sees the rest), so a flood cannot starve the writes of acks
  and keepalive pings. Each system call releases the GIL, which the pump thread then takes: fewer calls,
  fewer hand-overs.
- PUBLISH. Every complete MQTT 3.1.1 PUBLISH of QoS 0 or 1 at the front of the buffer is parsed here
  (topic, mid, payload: the fields paho's `decode_publish` reads) into an `Incoming`, without paho's
  MQTTMessage, its MQTTMessageInfo (a Condition per message), the callback matcher and mutexes; the
  messages of one turn go to `deliver` as one list, before any packet paho handles itself, so the order
  is the wire's; without manual_ack their PUBACKs follow at once, as paho sends them. Anything else (another packet type, QoS 2, MQTT 5, a packet not yet complete, a topic
  that is not UTF-8, a malformed length) goes through paho's own `_packet_read`, unchanged.
- PUBACK. `puback_many` queues the PUBACKs of a committed batch as ONE write: the same 4-byte packets
  in the same order, one wake-up of paho's thread and one send() instead of one of each per message.

The bytes and their order are exactly what the socket delivered; the buffer is dropped with the socket
it came from (a reconnect starts empty).
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 16  # bytes one socket read may take (a burst of small messages in one system call)
READS_PER_LOOP = 4  # socket reads per network-loop turn, then paho writes (acks, pings) before reading on
# a link that reads at most every read_pause_s gets READS_PER_LOOP reads per PAUSE_UNIT_S of pause a turn: what it
# can take per second is that of a 25 ms pause (4 x 64 KiB / 25 ms ~ 10 MB/s), a longer pause only wakes it less
PAUSE_UNIT_S = 0.025
_PUBACK_WORD = (mqtt.PUBACK << 24) | (2 << 16)  # a PUBACK's fixed header (type, remaining length 2) over the mid
_OK, _AGAIN, _LOST = MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN, MQTTErrorCode.MQTT_ERR_CONN_LOST


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    mid: int
    qos: int
    retain: bool


class BufferedClient(mqtt.Client):
    """paho's Client with the buffered read, the bulk PUBLISH path and `puback_many` (module docstring).
    `deliver`: where parsed messages go, a list per turn (None: every PUBLISH takes paho's own path)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = bytearray()
        self._rbuf_sock: object = None  # the socket the buffered bytes came from
        self._reads_left = READS_PER_LOOP  # of this loop turn (loop_read resets it)
        self.recv_calls = 0  # socket reads made (tests check that a burst needs few)
        self.deliver: Callable[[list[Incoming]], None] | None = None
        self.read_pause_s = 0.0  # least time between two read turns (0: read as soon as select() says)
        self._read_at = 0.0  # time.monotonic() of the last read turn
        self._taken: list[Incoming] = []  # parsed here, not yet delivered
        self.bulk_parsed = 0  # PUBLISH packets parsed by the bulk path (tests check it is taken)
        self._bulk = self._protocol != mqtt.MQTTv5  # MQTT 5 PUBLISH carries properties: paho parses those

    def _own_buffer(self) -> None:
        if self._rbuf_sock is not self._sock:
            self._rbuf.clear()
            self._rbuf_sock = self._sock

    def _recv_chunk(self, bufsize: int) -> bytes:
        """One socket read of up to max(bufsize, READ_CHUNK) bytes within this turn's budget: BlockingIOError
        when the turn read enough (paho writes, then select() brings us back) or nothing is there."""
        if self._reads_left <= 0:
            raise BlockingIOError
        self._reads_left -= 1
        self.recv_calls += 1
        return super()._sock_recv(max(bufsize, READ_CHUNK))

    def _sock_recv(self, bufsize: int) -> bytes:
        self._own_buffer()
        if not self._rbuf:
            data = self._recv_chunk(bufsize)
            if len(data) <= bufsize:
                return data  # also b"": the peer closed
            self._rbuf += data
        out = bytes(self._rbuf[:bufsize])
        del self._rbuf[:bufsize]
        return out

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        reads = READS_PER_LOOP
        if self.read_pause_s:  # at most one read turn per read_pause_s: a trickle is read a few at a time
            pause = self._read_at + self.read_pause_s - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            self._read_at = time.monotonic()
            reads *= max(1, math.ceil(self.read_pause_s / PAUSE_UNIT_S - 1e-9))
        self._reads_left = reads
        try:
            rc = super().loop_read(max_packets)
            while rc == _OK and self._rbuf and self._rbuf_sock is self._sock is not None:
                rc = super().loop_read(max_packets)
        finally:
            self._deliver()
        return rc

    def _packet_read(self) -> MQTTErrorCode:
        if self._bulk and self.deliver is not None and self._in_packet["command"] == 0:
            rc = self._read_publishes()
            if rc is not None:
                return rc
        self._deliver()  # what the bulk path took goes first: the order is the wire's
        return super()._packet_read()

    def _read_publishes(self) -> MQTTErrorCode | None:
        """Parse the complete QoS 0/1 PUBLISH packets at the front of the buffer (one socket read first when
        it is empty). None: the next packet is for paho's `_packet_read` (nothing consumed)."""
        self._own_buffer()
        if not self._rbuf:
            try:
                data = self._recv_chunk(READ_CHUNK)
            except BlockingIOError:
                return _AGAIN
            except OSError as err:  # as paho's _packet_read
                self._easy_log(mqtt.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                return _LOST
            if not data:
                return _LOST
            self._rbuf += data
        b, p, n, taken = self._rbuf, 0, len(self._rbuf), self._taken
        while p < n:
            cmd = b[p]
            if cmd & 0xF6 != 0x30 and cmd & 0xF6 != 0x32:  # PUBLISH (any dup/retain bit) of QoS 0 or 1 only
                break
            i, size, shift = p + 1, 0, 0
            while i < n and i <= p + 4:  # the remaining length: at most 4 bytes of 7 bits
                size |= (b[i] & 0x7F) << shift
                shift += 7
                i += 1
                if not b[i - 1] & 0x80:
                    break
            else:
                break  # not all there yet, or over 4 bytes (paho reports that one)
            end = i + size
            qos = (cmd >> 1) & 1
            head = i + 2 + (b[i] << 8 | b[i + 1]) if size >= 2 and end <= n else end + 1
            if head + 2 * qos > end or head == i + 2:  # incomplete, or malformed (an empty topic): paho's path
                break
            try:
                topic = b[i + 2 : head].decode("utf-8")
            except UnicodeDecodeError:
                break
            mid = b[head] << 8 | b[head + 1] if qos else 0
            taken.append(Incoming(topic, bytes(b[head + 2 * qos : end]), mid, qos, bool(cmd & 1)))
            p = end
        if not p:
            return None
        del b[:p]
        self.bulk_parsed += len(taken)
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()
        return _OK

    def _deliver(self) -> None:
        if self._taken:
            taken, self._taken = self._taken, []
            assert self.deliver is not None
            self.deliver(taken)
            if not self._manual_ack:  # as paho's _handle_publish: a QoS 1 message is acked once handed over
                self.puback_many([m.mid for m in taken if m.qos == 1])

    def puback_many(self, mids: list[int]) -> None:
        """PUBACK every mid with ONE queued write: the same 4-byte packets paho's `ack` sends one by one
        (0x40, remaining length 2, the mid; MQTT 3.1.1 and 5 alike), back to back in one buffer."""
        if mids:
            packet = struct.pack(f"!{len(mids)}I", *(_PUBACK_WORD | mid for mid in mids))
            self._packet_queue(mqtt.PUBACK, packet, 0, 1)


__all__ = ["READ_CHUNK", "READS_PER_LOOP", "BufferedClient", "Incoming"]
