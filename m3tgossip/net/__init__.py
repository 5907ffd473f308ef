"""Links between daemons: ZeroMQ transport, CURVE and ZAP, fault injection, status queries."""

from m3tgossip.net.faults import (
    FaultConfig,
    FaultyTransport,
    malicious_value,
)
from m3tgossip.net.security import (
    OPERATOR_PREFIX,
    PUBLIC_SUFFIX,
    SECRET_SUFFIX,
    AllowList,
    Curve,
    Keypair,
    for_node,
    generate_keys,
    load_keypair,
    load_public,
    load_public_keys,
    load_secret,
    zap_reply,
)
from m3tgossip.net.status import (
    query_status,
    request_forget,
)
from m3tgossip.net.transport import (
    POLL_MAX_BYTES,
    Plaintext,
    Security,
    Transport,
    TransportConfig,
    dealer_options,
    is_loopback,
    router_options,
)

__all__ = [
    "AllowList",
    "Curve",
    "FaultConfig",
    "FaultyTransport",
    "Keypair",
    "OPERATOR_PREFIX",
    "POLL_MAX_BYTES",
    "PUBLIC_SUFFIX",
    "Plaintext",
    "SECRET_SUFFIX",
    "Security",
    "Transport",
    "TransportConfig",
    "dealer_options",
    "for_node",
    "generate_keys",
    "is_loopback",
    "load_keypair",
    "load_public",
    "load_public_keys",
    "load_secret",
    "malicious_value",
    "query_status",
    "request_forget",
    "router_options",
    "zap_reply",
]
