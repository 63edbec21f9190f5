"""gRPC's length-prefixed message framing, for driving a server with tools that speak only HTTP/2.

A gRPC request or response body is a sequence of frames: one byte (1 when the message is
compressed), the message length as a 4-byte big-endian unsigned integer, then the message. A file
holding one encoded request frame is what ``h2load -d FILE`` needs to send real gRPC calls::

    h2load -n 20 -c 2 -H 'content-type: application/grpc' -H 'te: trailers' \\
        -d frame.bin http://127.0.0.1:PORT/llmmesh.v1.Router/Generate
"""

from __future__ import annotations

import struct
from pathlib import Path

from google.protobuf.message import Message

HEADER = struct.Struct(">BI")
"""The 5-byte frame header: compressed flag, message length."""


def encode_frame(message: Message | bytes) -> bytes:
    """One uncompressed frame holding ``message`` (a protobuf message or its serialized bytes)."""
    payload = message if isinstance(message, bytes) else message.SerializeToString()
    return HEADER.pack(0, len(payload)) + payload


def write_frame_file(path: Path, message: Message | bytes) -> Path:
    """Write ``message`` as one frame to ``path`` (the body file for ``h2load -d``)."""
    path.write_bytes(encode_frame(message))
    return path


def decode_frames(data: bytes) -> list[bytes]:
    """The payloads of the frames in ``data``, in order.

    Raises ValueError for a compressed frame (we never ask for compression) or when ``data`` does
    not end on a frame boundary.
    """
    payloads = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < HEADER.size:
            raise ValueError(f"truncated frame header at byte {offset}")
        compressed, length = HEADER.unpack_from(data, offset)
        offset += HEADER.size
        if compressed:
            raise ValueError(f"compressed frame at byte {offset - HEADER.size} (not supported)")
        if len(data) - offset < length:
            raise ValueError(
                f"frame at byte {offset - HEADER.size} declares {length} bytes, "
                f"{len(data) - offset} remain"
            )
        payloads.append(data[offset : offset + length])
        offset += length
    return payloads


__all__ = ["HEADER", "decode_frames", "encode_frame", "write_frame_file"]
