"""Research harnesses: the one-machine testbed as a Python API and the chaos runner."""

from m3tgossip.harness.chaos import ChaosRun
from m3tgossip.harness.chaos_spec import ChaosSpec
from m3tgossip.harness.nemesis import Fault, plan_nemesis
from m3tgossip.harness.netlab import NetLab, netns_available
from m3tgossip.harness.progress import Progress, bar_iter
from m3tgossip.harness.summary import Summary, format_summary
from m3tgossip.harness.testbed import Child, Placement, Testbed, free_ports
from m3tgossip.harness.testbed_spec import TestbedSpec
from m3tgossip.harness.verdict import CHECKS, digest_spread, format_verdict

__all__ = [
    "CHECKS",
    "ChaosRun",
    "ChaosSpec",
    "Child",
    "Fault",
    "NetLab",
    "Placement",
    "Progress",
    "Summary",
    "Testbed",
    "TestbedSpec",
    "bar_iter",
    "digest_spread",
    "format_summary",
    "format_verdict",
    "free_ports",
    "netns_available",
    "plan_nemesis",
]
