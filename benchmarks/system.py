"""Where a benchmark ran: CPU/GPU, memory, library versions and, on a Jetson, the power mode
and clocks (an Orin Nano at 7 W vs 15 W/MAXN is a 2x difference, so a number without its
nvpmodel mode is meaningless). Nothing here imports torch: versions come from package metadata.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

LIBRARIES = ("numpy", "onnxruntime", "onnxruntime-gpu", "tensorrt", "opencv-python-headless", "pillow",
             "pycocotools", "httpx", "torch", "transformers")  # fmt: skip
TEGRA_RELEASE = Path("/etc/nv_tegra_release")


def peak_rss_bytes() -> int:
    """This process's peak resident set (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def jetson_info() -> dict[str, Any] | None:
    """nvpmodel mode, L4T release, CPU/GPU/EMC clocks and (if jtop is installed) power and RAM."""
    if not TEGRA_RELEASE.exists():
        return None
    info: dict[str, Any] = {"l4t": TEGRA_RELEASE.read_text().splitlines()[0].strip()}
    info["nvpmodel"] = _run(["nvpmodel", "-q"])
    cpus = sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_cur_freq"))
    info["cpu_khz"] = [_read_int(p) for p in cpus]
    gpu = sorted(Path("/sys/class/devfreq").glob("*gpu*/cur_freq")) + sorted(
        Path("/sys/class/devfreq").glob("*ga10b*/cur_freq")
    )
    info["gpu_hz"] = _read_int(gpu[0]) if gpu else None
    info["emc_hz"] = _read_int(Path("/sys/kernel/debug/clk/emc/clk_rate"))
    info["jetson_clocks"] = _run(["jetson_clocks", "--show"])
    info["jtop"] = _jtop_sample()
    return info


def _jtop_sample() -> dict[str, Any] | None:
    try:
        from jtop import jtop  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        with jtop() as jetson:
            if not jetson.ok():
                return None
            power = jetson.power.get("tot", {}) if isinstance(jetson.power, dict) else {}
            memory = jetson.memory.get("RAM", {}) if isinstance(jetson.memory, dict) else {}
            return {"power_mw": power.get("power"), "ram_used_kib": memory.get("used"),
                    "ram_total_kib": memory.get("tot"), "nvpmodel": str(jetson.nvpmodel)}
    except Exception as exc:  # noqa: BLE001 - jtop talks to a service that may be down; a benchmark must not fail
        return {"error": f"{type(exc).__name__}: {exc}"}


def system_info() -> dict[str, Any]:
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count() or 1,
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_bytes": memory_total_bytes(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "versions": library_versions(),
        "jetson": jetson_info(),
    }
