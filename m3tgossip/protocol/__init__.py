"""The wire protocol: typed messages, their schema, frames and tensor codecs."""

from m3tgossip.protocol.codecs import (
    Codec,
    parse_codec,
)
from m3tgossip.protocol.wire import (
    DEFAULT_LIMITS,
    DTYPES,
    PROTOCOL_VERSION,
    Limits,
    Message,
    MsgType,
    TensorMeta,
    decode,
    encode,
    frames_nbytes,
    new_session,
    values_digest,
)

__all__ = [
    "Codec",
    "DEFAULT_LIMITS",
    "DTYPES",
    "Limits",
    "Message",
    "MsgType",
    "PROTOCOL_VERSION",
    "TensorMeta",
    "decode",
    "encode",
    "frames_nbytes",
    "new_session",
    "parse_codec",
    "values_digest",
]
