"""System programs a test needs: found on PATH, or installed with apt-get (as root), or a reason
to skip."""

from __future__ import annotations

import os
import shutil
import subprocess

#: bound on one apt-get call (a browser is a large download)
APT_TIMEOUT_S = 900.0


def _apt(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(
        ["apt-get", *args],
        capture_output=True,
        text=True,
        timeout=APT_TIMEOUT_S,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def system_binary(binary: str, package: str) -> tuple[str | None, str]:
    """The path of `binary`, installing Debian's `package` first if it is missing and this
    process may (root, apt-get present); (None, why not) otherwise."""
    found = shutil.which(binary)
    if found:
        return found, ""
    if shutil.which("apt-get") is None:
        return None, f"{binary} is not installed and there is no apt-get to install {package}"
    if os.geteuid() != 0:
        return None, f"{binary} is not installed; apt-get install {package} needs root"
    try:
        result = _apt("install", "-y", "-q", "--no-install-recommends", package)
        if result.returncode != 0 and "Unable to locate package" in result.stderr:
            _apt("update", "-q")
            result = _apt("install", "-y", "-q", "--no-install-recommends", package)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"apt-get install {package} failed: {exc}"
    found = shutil.which(binary)
    if found:
        return found, ""
    tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
    return None, f"apt-get install {package} did not provide {binary}: {tail[0]}"
