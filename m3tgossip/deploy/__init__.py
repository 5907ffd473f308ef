"""Deployment on campus machines: bundles (node configs, keys, the filled spec, systemd units,
start scripts) from one topology spec and one hosts file."""

from m3tgossip.deploy.bundle import BundleOptions, BundleResult, ensure_key, write_bundle
from m3tgossip.deploy.hosts import load_hosts, parse_endpoint
from m3tgossip.deploy.units import service_unit, start_script, unit_name, watchdog_seconds

__all__ = [
    "BundleOptions",
    "BundleResult",
    "ensure_key",
    "load_hosts",
    "parse_endpoint",
    "service_unit",
    "start_script",
    "unit_name",
    "watchdog_seconds",
    "write_bundle",
]
