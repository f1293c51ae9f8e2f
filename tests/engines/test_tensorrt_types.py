"""The TensorRT code against TensorRT's real API: mypy --strict with tensorrt-stubs.

No GPU runs these calls in CI, so a wrong method name, attribute or argument type would only
show on a Jetson. The stubs (TensorRT 10.13's Python API) catch those here; the mutants below
show the check is not vacuous (every TensorRT object is typed, not Any, between the import and
the call). scripts/typecheck_tensorrt.py is the same check from the command line.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from typecheck_tensorrt import run_mypy  # noqa: E402

if importlib.util.find_spec("mypy") is None:
    pytest.fail("mypy is not installed: make venv (requirements/dev.txt)", pytrace=False)


def test_tensorrt_code_type_checks_against_the_stubs() -> None:
    proc = run_mypy()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no issues found in 3 source files" in proc.stdout


@pytest.mark.parametrize(
    "module, good, bad, reported",
    [
        (
            "tensorrt.py",
            "context.execute_async_v3(",
            "context.execute_async_v4(",
            '"IExecutionContext" has no attribute "execute_async_v4"',
        ),
        (
            "tensorrt_build.py",
            "trt.BuilderFlag.__members__",
            "trt.BuilderFlags.__members__",
            'Module has no attribute "BuilderFlags"',
        ),
        (
            "tensorrt_build.py",
            "config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)",
            "config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, str(settings.workspace_bytes))",
            'Argument 2 to "set_memory_pool_limit" of "IBuilderConfig" has incompatible type "str"',
        ),
    ],
    ids=["misspelt-method", "misspelt-enum", "wrong-argument-type"],
)
def test_a_wrong_tensorrt_call_is_reported(
    tmp_path: Path, module: str, good: str, bad: str, reported: str
) -> None:
    source = (REPO / "engines" / module).read_text()
    assert source.count(good) == 1, good
    mutant = tmp_path / "tensorrt_mutant.py"
    mutant.write_text(source.replace(good, bad))
    proc = run_mypy([str(mutant)])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert reported in proc.stdout, proc.stdout
