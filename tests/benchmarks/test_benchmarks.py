"""``python -m benchmarks pipeline`` and ``http`` as committed, on the tiny bundle, 2 iterations.

Checked: the documents follow their JSON schema (every latency/rate present and > 0), the
markdown and PNG are written, and the torch-free claim holds without a reference. Not speed.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from PIL import Image

from benchmarks.report import HTTP_SCHEMA, PIPELINE_SCHEMA, validate
from tests.server.conftest import REPO

SUMMARY_KEYS = ("n", "p50", "p90", "p99", "mean", "min", "max", "fps")


def run_bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=REPO, capture_output=True, text=True,
                          check=False, timeout=timeout)


def summaries(node: Any) -> Iterator[dict[str, Any]]:
    """Every latency summary anywhere in a document."""
    if isinstance(node, dict):
        if set(SUMMARY_KEYS) <= set(node):
            yield node
        for value in node.values():
            yield from summaries(value)
    elif isinstance(node, list):
        for value in node:
            yield from summaries(value)


@pytest.fixture(scope="module")
def pipeline_run(tiny_bundle: Path, tiny_hf_checkpoint: Path, tmp_path_factory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench-pipeline")
    done = run_bench("pipeline", "--bundle", str(tiny_bundle), "--iterations", "2", "--batch", "4",
                     "--reference-checkpoint", str(tiny_hf_checkpoint), "--json", str(out / "p.json"),
                     "--markdown", str(out / "p.md"), "--plot", str(out / "p.png"))
    assert done.returncode == 0, done.stderr
    return json.loads((out / "p.json").read_text()), out


def test_pipeline_document_is_complete(pipeline_run) -> None:
    doc, out = pipeline_run
    validate(doc)
    assert set(doc["paths"]) == {"cold", "warm", "text_cached"}
    assert set(doc["paths"]["cold"]["stages"]) == {"preprocess", "image_encoder", "text_encoder", "decoder",
                                                   "postprocess"}
    assert "image_encoder" not in doc["paths"]["warm"]["stages"]  # the cached path really skips it
    assert set(doc["paths"]["text_cached"]["stages"]) == {"decoder", "postprocess"}
    found = list(summaries(doc))
    assert len(found) == (1 + 5) + (1 + 4) + (1 + 2) + 2 + 3 + 3  # paths (e2e + stages run), batch, reference x2
    for summary in found:
        assert summary["n"] == 2
        assert all(summary[k] > 0 for k in SUMMARY_KEYS), summary
        assert summary["min"] <= summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"]
    ref = doc["reference"]
    assert ref["parity"]["ours_vs_reference_logits_max_abs"] < 1e-4  # same weights, same semantics
    assert ref["parity"]["timed_path_vs_reference_forward_logits_max_abs"] < 1e-4
    assert all(ref["flops"][k] > 0 for k in ("vision_gflop", "text_gflop", "decoder_gflop"))
    assert doc["config"]["backend"] == "onnxruntime" and doc["memory"]["peak_rss_bytes"] > 0
    assert {g["name"].split(",")[0] for g in doc["goals"]} >= {"cold end-to-end", "4 prompts batched / 4 single calls"}
    markdown = (out / "p.md").read_text()
    assert "| cold |" in markdown and "ours / ref" in markdown and "| goal |" in markdown
    with Image.open(out / "p.png") as img:
        assert img.format == "PNG" and img.width > 400


def test_schema_rejects_a_missing_or_non_positive_figure(pipeline_run) -> None:
    doc, _ = pipeline_run
    missing = copy.deepcopy(doc)
    del missing["paths"]["warm"]["end_to_end"]["p99"]
    zero = copy.deepcopy(doc)
    zero["paths"]["cold"]["stages"]["decoder"]["p50"] = 0.0
    no_stage = copy.deepcopy(doc)
    del no_stage["paths"]["cold"]["stages"]["image_encoder"]
    for broken in (missing, zero, no_stage):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, PIPELINE_SCHEMA)


def test_pipeline_without_reference_imports_no_torch(tiny_bundle: Path) -> None:
    code = (
        "import sys; from pathlib import Path\n"
        "from benchmarks.pipeline import PipelineBenchConfig, run_pipeline_benchmark\n"
        "from benchmarks.report import markdown\n"
        f"doc = run_pipeline_benchmark(PipelineBenchConfig(bundle=Path({str(tiny_bundle)!r}), iterations=2, batch=2))\n"
        "markdown(doc)\n"
        "assert doc['reference'] is None\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr


def test_http_benchmark_against_the_server(live_server, pipeline_run, tiny_bundle: Path, tmp_path: Path) -> None:
    _, pipeline_out = pipeline_run
    done = run_bench("http", "--url", live_server.url, "--concurrency", "2", "--requests", "4",
                     "--cold-fraction", "0.5", "--compare", str(pipeline_out / "p.json"),
                     "--compare-bundle", str(tiny_bundle), "--pairs", "2",
                     "--json", str(tmp_path / "h.json"), "--markdown", str(tmp_path / "h.md"),
                     "--plot", str(tmp_path / "h.png"))
    assert done.returncode == 0, done.stderr
    doc = json.loads((tmp_path / "h.json").read_text())
    validate(doc)
    jsonschema.validate(doc, HTTP_SCHEMA)
    assert doc["requests"]["sent"] == 4 and doc["requests"]["ok"] == 4 and doc["requests"]["errors"] == 0
    assert set(doc["latency"]) == {"all", "cold", "warm"}
    assert doc["latency"]["cold"]["n"] == 2 and doc["latency"]["warm"]["n"] == 2
    for summary in summaries(doc):
        assert all(summary[k] > 0 for k in SUMMARY_KEYS), summary
    assert doc["throughput_rps"] > 0
    # cold requests ran the image encoder on the server; warm ones found the embedding
    assert doc["server_timings_p50_ms"]["cold"]["image_encoder"] > doc["server_timings_p50_ms"]["warm"]["image_encoder"]
    assert set(doc["comparison"]) == {"warm_http_over_pipeline_text_cached", "cold_http_over_pipeline_cold"}
    paired = doc["paired"]
    assert paired["pairs"] == 2 and all(paired[k][side]["n"] == 2 for k in ("warm", "cold") for side in ("http", "direct"))
    assert len(doc["goals"]) == 2 and all(g["measured"] > 0 for g in doc["goals"])
    assert all("alternated" in g["name"] for g in doc["goals"])
    assert "req/s" in (tmp_path / "h.md").read_text()
    with Image.open(tmp_path / "h.png") as img:
        assert img.format == "PNG"


def test_http_refuses_non_loopback_and_unbounded_runs() -> None:
    done = run_bench("http", "--url", "http://192.0.2.1:8000", "--requests", "1", timeout=60)
    assert done.returncode == 2 and "not a loopback address" in done.stderr
    done = run_bench("pipeline", "--bundle", "/nonexistent", "--iterations", "0", timeout=60)
    assert done.returncode == 2 and "--iterations" in done.stderr


def test_report_rerenders_a_saved_run(pipeline_run, tmp_path: Path) -> None:
    _, out = pipeline_run
    done = run_bench("report", str(out / "p.json"), "--markdown", str(tmp_path / "again.md"),
                     "--plot", str(tmp_path / "again.png"), timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "again.md").read_text() == (out / "p.md").read_text()
    broken = tmp_path / "broken.json"
    doc = json.loads((out / "p.json").read_text())
    del doc["paths"]["cold"]
    broken.write_text(json.dumps(doc))
    done = run_bench("report", str(broken), timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: ValidationError")
