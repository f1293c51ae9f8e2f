"""Type-check the TensorRT code against TensorRT's real Python API (``tensorrt-stubs``).

    .venv/bin/python scripts/typecheck_tensorrt.py            # the TARGETS below
    .venv/bin/python scripts/typecheck_tensorrt.py FILE ...    # other files (the tests use this)

No GPU is lent to this project, so nothing runs TensorRT in CI; mypy --strict with the stubs at
least proves every TensorRT class, method, attribute and argument type we use exists in
TensorRT 10.13's API. ``tensorrt-stubs`` (requirements/dev.txt, installed with ``--no-deps``:
its ``tensorrt`` dependency is an sdist that downloads TensorRT) cannot be used as installed:

* it ships ``tensorrt/__init__.pyi`` without ``py.typed`` and is not named ``tensorrt-stubs/``,
  so mypy skips it (PEP 561);
* pybind11-stubgen wrote a few lines Python cannot parse (parameters named ``in``, a required
  parameter after defaulted ones) and module variables ``bool``/``float``... that shadow the
  builtins in annotations.

So this script copies the stub files into ``.mypy_cache/tensorrt-stubs/`` with those lines
mended (nothing else changes) and runs mypy with that directory on ``MYPYPATH``. The mypy
settings themselves are in pyproject.toml (``[tool.mypy]``).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("engines/tensorrt_build.py", "engines/tensorrt.py", "deploy/entrypoint.py")
STUB_DIR = REPO / ".mypy_cache" / "tensorrt-stubs"
# A module-level name the stubs define as a DataType value (trt.bool), shadowing the builtin in
# every annotation of that module.
_SHADOWED = ("bool",)


def _split_parameters(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return parts


def mend(text: str, shadowed: tuple[str, ...]) -> str:
    """The stub text with unparseable or shadowed lines mended (see the module docstring)."""
    text = re.sub(r"([(,]\s*)in:", r"\1in_:", text)  # `in` is a keyword
    lines = text.split("\n")
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*def \w+\()(.*)(\)\s*->.*:\s*)$", line)
        if not match:
            continue
        params, seen_default = _split_parameters(match.group(2)), False
        for j, param in enumerate(params):
            name = param.strip()
            if name == "*" or name.startswith("**"):
                break
            if "=" in name:
                seen_default = True
            elif seen_default and not name.startswith("*"):
                params[j] = param + " = ..."
        params_text, returns = ",".join(params), match.group(3)
        for builtin in shadowed:  # as a type, never as a parameter's name (`bool: int`)
            params_text = re.sub(rf"(?<![\w.]){builtin}\b(?!\s*:)", f"builtins.{builtin}", params_text)
            returns = re.sub(rf"(?<![\w.]){builtin}\b", f"builtins.{builtin}", returns)
        lines[i] = match.group(1) + params_text + returns
    text = "\n".join(lines)
    text = re.sub(r"\bcapsule\b", "typing.Any", text)
    if shadowed and "import builtins" not in text:
        text = "import builtins\nimport typing\n" + text
    return text


def prepare_stubs(target: Path = STUB_DIR) -> Path:
    """Copy the installed tensorrt-stubs into ``target``, mended; return ``target``."""
    try:
        files = importlib.metadata.files("tensorrt-stubs") or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            "tensorrt-stubs is not installed: pip install --no-deps -r requirements/dev.txt "
            "(or pip install --no-deps tensorrt-stubs)"
        ) from None
    stubs = [f for f in files if str(f).endswith(".pyi")]
    if not stubs:
        raise SystemExit("tensorrt-stubs is installed without .pyi files")
    for stub in stubs:
        source = Path(str(stub.locate()))
        text = source.read_text(encoding="utf-8")
        defines = tuple(name for name in _SHADOWED if re.search(rf"^{name}: ", text, re.M))
        out = target / str(stub)
        out.parent.mkdir(parents=True, exist_ok=True)
        mended = mend(text, defines)
        if not out.is_file() or out.read_text(encoding="utf-8") != mended:
            out.write_text(mended, encoding="utf-8")
    return target


def run_mypy(targets: list[str] | tuple[str, ...] = TARGETS) -> subprocess.CompletedProcess[str]:
    stub_dir = prepare_stubs()
    env = dict(os.environ, MYPYPATH=os.pathsep.join([str(stub_dir), str(REPO)]))
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"), "--strict", *targets],
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip


def main(argv: list[str]) -> int:
    proc = run_mypy(argv or TARGETS)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
