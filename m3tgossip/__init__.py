"""m3tgossip: decentralized gossip learning of multi-modal multi-task models for education.

Every participant runs one node daemon (`m3tgossip node`) that trains the model components its
own data and tasks need and averages them with its graph neighbours over ZeroMQ. There is no
central server.
"""

__version__ = "0.1.0"
