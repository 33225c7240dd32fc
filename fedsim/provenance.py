"""Provenance of a run: package versions, host, device and the git state of the code.

`provenance(device)` is recorded in every run's ``summary.json`` under ``provenance``; `version()`
is what ``fedsim --version`` prints. Nothing here imports flwr or initialises CUDA for a CPU run:
versions come from the installed distributions' metadata.
"""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

DISTRIBUTION = "fedsim-lab"
"""fedsim's distribution name on PyPI (the name `fedsim` belongs to an unrelated project)."""

PACKAGES = {"fedsim": DISTRIBUTION, "torch": "torch", "flwr": "flwr", "numpy": "numpy"}
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def _dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def version() -> str:
    """fedsim's version (from the installed `fedsim-lab` metadata; "unknown" from a bare checkout)."""
    return _dist_version(DISTRIBUTION) or "unknown"


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    """Versions of fedsim, torch, flwr, numpy (None when not installed) and Python."""
    out = {name: _dist_version(dist) for name, dist in PACKAGES.items()}
    out["python"] = platform.python_version()
    return out


def git_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``{commit, dirty, root}`` of the git work tree containing `path`, or None (no git, no tree).

    `dirty` is True when tracked files differ from the commit or untracked, not-ignored files
    exist. Runs with GIT_OPTIONAL_LOCKS=0 so parallel runs never contend for the index lock.
    """
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                                 timeout=10, env=env)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain")
    return {"commit": commit, "dirty": bool(status) if status is not None else None,
            "root": git("rev-parse", "--show-toplevel")}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(requested: str) -> dict[str, Any]:
    """What `engine.device` resolved to: its name, and for CUDA the capability and versions."""
    import torch

    info: dict[str, Any] = {"requested": requested, "torch_threads": torch.get_num_threads(),
                            "cpu": _cpu_name(), "cpu_count": os.cpu_count()}
    use_cuda = requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available())
    if use_cuda and torch.cuda.is_available():
        dev = torch.device(requested if requested.startswith("cuda") else "cuda")
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(type="cuda", index=idx, name=props.name,
                    capability=f"{props.major}.{props.minor}",
                    memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info.update(type="cpu", name=info["cpu"])
    return info


def provenance(device: str = "cpu", scenario: str | None = None) -> dict[str, Any]:
    """Versions, host, device and git state for ``summary.json``.

    `git` is the state of the tree fedsim runs from (an editable install or a checkout); when the
    scenario file lies in another git tree (a user's experiment repository), `scenario_git` too.
    """
    out: dict[str, Any] = {
        "versions": versions(), "host": socket.gethostname(), "platform": platform.platform(),
        "device": device_info(device), "argv": list(sys.argv),
        "git": git_state(SOURCE_ROOT) if (SOURCE_ROOT / "pyproject.toml").is_file() else None,
    }
    if scenario:
        other = git_state(Path(scenario).resolve().parent)
        if other and other["root"] != (out["git"] or {}).get("root"):
            out["scenario_git"] = other
    return out
