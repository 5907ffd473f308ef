"""What the SLURM and Kubernetes launchers share: key folders, atomic files, node settings.

`ensure_keys` fills a key folder with one CURVE keypair per node and an operator key, keeping
every pair already there (a key is never overwritten). `write_atomic` replaces a file in one
step, so launchers that write the same file at once never leave a torn one. `node_overrides`
turns `--set TABLE.KEY=VALUE` and `-o KEY=VALUE` options into the overrides of
`m3tgossip.daemon.config.load_node_config`; `node_toml` writes them as a node config file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from m3tgossip.errors import ConfigError
from m3tgossip.net import PUBLIC_SUFFIX, SECRET_SUFFIX, generate_keys, load_public, load_secret

#: name of the operator keypair a key folder holds (allowed to query every node's status)
OPERATOR = "operator"
#: node config tables `--set` may name
SETTING_TABLES = ("gossip", "transport", "faults", "privacy")


def ensure_keys(folder: str | os.PathLike[str], ids: Iterable[str]) -> dict[str, str]:
    """node id -> public key, generating `<id>.key` / `<id>.key_secret` (mode 600) for every id
    (and `OPERATOR`) that has no pair in `folder` yet; complete pairs are kept as they are.

    ConfigError naming the file if a pair is half there or its two files do not match.
    """
    out = Path(folder)
    keys: dict[str, str] = {}
    for nid in [*ids, OPERATOR]:
        public, secret = out / f"{nid}{PUBLIC_SUFFIX}", out / f"{nid}{SECRET_SUFFIX}"
        if public.exists() and secret.exists():
            pair = load_secret(secret)
            if load_public(public) != pair.public:
                raise ConfigError(str(public), "", f"does not match {secret.name}")
            keys[nid] = pair.public
        elif public.exists() or secret.exists():
            there = public if public.exists() else secret
            raise ConfigError(
                str(there),
                "",
                "half a keypair: the other file is missing; remove it to generate a new pair",
            )
        else:
            keys[nid] = generate_keys(out, nid).public
    out.chmod(0o700)
    return keys


def write_atomic(path: str | os.PathLike[str], text: str, tag: str = "") -> bool:
    """Write `text` to `path` through a temporary file and a rename; False (and nothing written)
    if the file already holds exactly `text`. `tag` keeps concurrent writers' temporary files
    apart (e.g. the task rank)."""
    target = Path(path)
    try:
        if target.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}{tag}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    return True


def node_overrides(
    settings: Sequence[tuple[str, Any]], options: Sequence[tuple[str, Any]]
) -> dict[str, Any]:
    """`load_node_config` overrides from `--set TABLE.KEY=VALUE` and `-o KEY=VALUE` pairs."""
    out: dict[str, Any] = {}
    for key, value in settings:
        table, dot, rest = key.partition(".")
        if table not in SETTING_TABLES or not dot or not rest:
            raise ConfigError(
                "--set",
                key,
                f"expected TABLE.KEY with TABLE one of {', '.join(SETTING_TABLES)}",
            )
        out[key] = value
    for key, value in options:
        out[f"workload.{key}"] = value
    return out


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError("node settings", where, f"not a finite number: {value!r}")
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f'"{k}" = {_toml_value(v, where)}' for k, v in value.items())
        return "{" + items + "}"
    raise ConfigError("node settings", where, f"cannot write {type(value).__name__} to TOML")


def node_toml(node: Mapping[str, Any], overrides: Mapping[str, Any], comment: str = "") -> str:
    """A node config file: the `[node]` table `node`, then each table of `overrides`
    (`gossip.deadline_k`, `workload.size`, ...); loads with `load_node_config`."""
    tables: dict[str, dict[str, Any]] = {"node": dict(node)}
    for key, value in overrides.items():
        table, _, rest = key.partition(".")
        tables.setdefault(table, {})[rest] = value
    lines = [f"# {line}" if line else "#" for line in comment.splitlines()]
    for table, values in tables.items():
        if lines:
            lines.append("")
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml_value(v, f'{table}.{k}')}" for k, v in values.items()]
    return "\n".join(lines) + "\n"
