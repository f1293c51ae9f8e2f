"""JSON schemas of the two benchmark documents, their markdown tables and PNG plots.

The schemas are the documentation of the JSON (benchmarks/README.md shows them) and the
tests validate every document against them: latencies and rates must be present and > 0,
counts >= 0. ``jsonschema`` is imported only by :func:`validate` (a test/CI dependency).
"""

from __future__ import annotations

from typing import Any

from engines.types import STAGES

# Every pipeline report has these; the geometry encoder only where a path ran boxes.
REQUIRED_STAGES = tuple(stage for stage in STAGES if stage != "geometry_encoder")
POSITIVE = {"type": "number", "exclusiveMinimum": 0}
COUNT = {"type": "integer", "minimum": 0}

SUMMARY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Latency summary in milliseconds over n measured (warm-up excluded) samples; fps = items/s at the mean.",
    "required": ["n", "p50", "p90", "p99", "mean", "min", "max", "fps"],
    "properties": {"n": {"type": "integer", "minimum": 1},
                   **{k: POSITIVE for k in ("p50", "p90", "p99", "mean", "min", "max", "fps")}},
}
GOAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "target", "measured", "met", "miss_factor"],
    "properties": {"name": {"type": "string"}, "target": POSITIVE, "measured": POSITIVE, "met": {"type": "boolean"},
                   "miss_factor": POSITIVE},
}
_PATH = {
    "type": "object",
    "required": ["description", "end_to_end", "stages", "prompts_per_call"],
    "properties": {
        "end_to_end": SUMMARY_SCHEMA,
        "stages": {"type": "object", "minProperties": 1,
                   "propertyNames": {"enum": list(STAGES)}, "additionalProperties": SUMMARY_SCHEMA},
        "prompts_per_call": {"type": "integer", "minimum": 1},
    },
}
_COLD_PATH = {**_PATH, "properties": {**_PATH["properties"], "stages": {
    **_PATH["properties"]["stages"], "required": list(REQUIRED_STAGES)}}}
_REF_PATH = {"type": "object", "required": ["end_to_end"], "properties": {"end_to_end": SUMMARY_SCHEMA}}
_SYSTEM = {
    "type": "object",
    "required": ["platform", "cpu", "cpu_count", "versions", "jetson"],
    "properties": {"cpu_count": {"type": "integer", "minimum": 1},
                   "versions": {"type": "object", "required": ["python", "numpy"]}},
}
_RATIOS = {"type": "object", "required": ["warm_over_cold", "text_cached_over_cold"],
           "additionalProperties": POSITIVE}

PIPELINE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "python -m benchmarks pipeline",
    "type": "object",
    "required": ["kind", "schema_version", "created", "system", "config", "paths", "batch", "ratios", "memory",
                 "reference", "goals"],
    "properties": {
        "kind": {"const": "pipeline"},
        "schema_version": {"const": 1},
        "system": _SYSTEM,
        "config": {"type": "object",
                   "required": ["bundle_name", "image_size", "backend", "device", "precision", "prompts", "batch",
                                "iterations", "warmup"],
                   "properties": {"iterations": {"type": "integer", "minimum": 1},
                                  "image_size": {"type": "integer", "minimum": 1}}},
        "paths": {"type": "object", "required": ["cold", "warm", "text_cached"],
                  "properties": {"cold": _COLD_PATH, "warm": _PATH, "text_cached": _PATH}},
        "batch": {"type": "object", "required": ["k", "batched", "single_calls", "batched_over_single"],
                  "properties": {"k": {"type": "integer", "minimum": 1}, "batched": SUMMARY_SCHEMA,
                                 "single_calls": SUMMARY_SCHEMA, "batched_over_single": POSITIVE}},
        "ratios": _RATIOS,
        "memory": {"type": "object", "required": ["peak_rss_bytes"],
                   "properties": {"peak_rss_bytes": {"type": "integer", "exclusiveMinimum": 0}}},
        "reference": {"oneOf": [{"type": "null"}, {
            "type": "object",
            "required": ["implementation", "paths", "ours_interleaved", "ours_over_reference", "ratios", "parity",
                         "peak_rss_bytes"],
            "properties": {
                "paths": {"type": "object", "required": ["cold", "warm", "text_cached"],
                          "additionalProperties": _REF_PATH},
                "ours_interleaved": {"type": "object", "required": ["cold", "warm", "text_cached"],
                                     "additionalProperties": _REF_PATH},
                "ours_over_reference": {"type": "object", "required": ["cold", "warm", "text_cached"],
                                        "additionalProperties": POSITIVE},
                "ours_over_reference_min": {"type": "object", "required": ["cold", "warm", "text_cached"],
                                            "additionalProperties": POSITIVE},
                "ratios": _RATIOS,
                "parity": {"type": "object", "additionalProperties": {"type": ["number", "null"], "minimum": 0}},
                "flops": {"type": "object", "additionalProperties": POSITIVE},
            },
        }]},
        "goals": {"type": "array", "minItems": 1, "items": GOAL_SCHEMA},
    },
}

HTTP_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "python -m benchmarks http",
    "type": "object",
    "required": ["kind", "schema_version", "created", "system", "config", "server", "wall_s", "requests",
                 "throughput_rps", "latency", "server_timings_p50_ms", "comparison", "paired", "goals"],
    "properties": {
        "kind": {"const": "http"},
        "schema_version": {"const": 1},
        "system": _SYSTEM,
        "config": {"type": "object", "required": ["url", "concurrency", "cold_fraction", "prompts"],
                   "properties": {"concurrency": {"type": "integer", "minimum": 1}}},
        "wall_s": POSITIVE,
        "requests": {"type": "object", "required": ["sent", "ok", "errors", "rate_limited", "transport_errors",
                                                     "by_status"],
                     "properties": {"sent": {"type": "integer", "minimum": 1}, "ok": COUNT, "errors": COUNT,
                                    "rate_limited": COUNT, "transport_errors": COUNT,
                                    "by_status": {"type": "object", "additionalProperties": COUNT}}},
        "throughput_rps": POSITIVE,
        "latency": {"type": "object", "required": ["all"], "additionalProperties": SUMMARY_SCHEMA},
        "server_timings_p50_ms": {"type": "object", "additionalProperties": {
            "type": "object", "additionalProperties": {"type": "number", "minimum": 0}}},
        "comparison": {"oneOf": [{"type": "null"}, {"type": "object", "additionalProperties": POSITIVE}]},
        "paired": {"oneOf": [{"type": "null"}, {
            "type": "object",
            "required": ["pairs", "warm", "cold", "warm_http_over_direct", "cold_http_over_direct"],
            "properties": {
                "pairs": {"type": "integer", "minimum": 1},
                "warm": {"type": "object", "required": ["http", "direct"], "additionalProperties": SUMMARY_SCHEMA},
                "cold": {"type": "object", "required": ["http", "direct"], "additionalProperties": SUMMARY_SCHEMA},
                "warm_http_over_direct": POSITIVE,
                "cold_http_over_direct": POSITIVE,
            },
        }]},
        "goals": {"type": "array", "items": GOAL_SCHEMA},
    },
}


def validate(doc: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` if ``doc`` does not follow its kind's schema."""
    import jsonschema

    schema = PIPELINE_SCHEMA if doc.get("kind") == "pipeline" else HTTP_SCHEMA
    jsonschema.validate(doc, schema)


# --------------------------------------------------------------------------------- markdown
def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _mib(value: int | None) -> str:
    return "—" if not value else f"{value / 2**20:.0f} MiB"


def pipeline_markdown(doc: dict[str, Any]) -> str:
    cfg, system, ref = doc["config"], doc["system"], doc.get("reference")
    lines = [
        (f"### Pipeline: {cfg['bundle_name']} ({cfg['image_size']} px, {cfg.get('num_queries', '?')} queries), "
        f"{cfg['backend']} {cfg['precision']} on {cfg['device']}"),
        "",
        f"{system['cpu']} ({system['cpu_count']} cores), load avg {system.get('loadavg_1m_start')} → "
        f"{system.get('loadavg_1m')}; {len(cfg['prompts'])} prompt(s) per call, {cfg['iterations']} iterations "
        f"after {cfg['warmup']} warm-up; versions: "
        + ", ".join(f"{k} {v}" for k, v in system["versions"].items()),
        "",
        "| path | " + " | ".join(f"{s} p50" for s in STAGES) + " | **e2e p50** | p90 | p99 | mean | FPS |"
        + (" ours p50 (interleaved) | reference p50 | ours / ref (p50) | ours / ref (min) |" if ref else ""),
        "|---" * (len(STAGES) + 6 + (4 if ref else 0)) + "|",
    ]
    for name, path in doc["paths"].items():
        stages = path["stages"]
        e2e = path["end_to_end"]
        row = (
            f"| {name} | " + " | ".join(_fmt(stages[s]["p50"], 2) if s in stages else "—" for s in STAGES)
            + f" | **{_fmt(e2e['p50'])}** | {_fmt(e2e['p90'])} | {_fmt(e2e['p99'])} | {_fmt(e2e['mean'])} "
            f"| {_fmt(e2e['fps'], 2)} |"
        )
        if ref:
            row += (
                f" {_fmt(ref['ours_interleaved'][name]['end_to_end']['p50'])} "
                f"| {_fmt(ref['paths'][name]['end_to_end']['p50'])} | {_fmt(ref['ours_over_reference'][name], 3)} "
                f"| {_fmt(ref['ours_over_reference_min'][name], 3)} |"
            )
        lines.append(row)
    batch = doc["batch"]
    lines += [
        "",
        (f"Batch: {batch['k']} prompts in one decode call p50 {_fmt(batch['batched']['p50'])} ms vs "
        f"{batch['k']} single-prompt calls {_fmt(batch['single_calls']['p50'])} ms → ratio "
        f"**{batch['batched_over_single']:.3f}** ({_fmt(batch['batched']['fps'])} vs "
        f"{_fmt(batch['single_calls']['fps'])} prompts/s)."),
        (f"Detections kept in the last call per path (score > {cfg.get('score_threshold')}, at most "
         f"{cfg.get('max_detections') or 'all'} per prompt; only their masks are upsampled and RLE-encoded): "
         + ", ".join(f"{k} {v}" for k, v in doc.get("detections_last_call", {}).items()) + "."),
        (f"warm / cold {doc['ratios']['warm_over_cold']:.3f}, text-cached / cold "
        f"{doc['ratios']['text_cached_over_cold']:.3f}; peak RSS (ours, before torch) "
        f"{_mib(doc['memory']['peak_rss_bytes'])}."),
    ]
    if ref:
        parity = ref["parity"]
        lines.append(
            f"Reference: {ref['implementation']}, {ref.get('torch_threads')} threads; warm / cold "
            f"{ref['ratios']['warm_over_cold']:.3f}, text-cached / cold {ref['ratios']['text_cached_over_cold']:.3f}; "
            f"same weights: decoder logits max |ours − ref| "
            f"{parity.get('ours_vs_reference_logits_max_abs', float('nan')):.1e}; peak RSS incl. torch "
            f"{_mib(ref['peak_rss_bytes'])}."
        )
        flops = ref.get("flops")
        if flops:
            lines.append(
                f"FLOPs per call ({flops['prompts']} prompt(s), image once): vision {flops['vision_gflop']:.2f}, "
                f"text {flops['text_gflop']:.2f}, decoder {flops['decoder_gflop']:.2f} GFLOP → floor warm/cold "
                f"{flops['floor_warm_over_cold']:.3f}, text-cached/cold {flops['floor_text_cached_over_cold']:.3f}."
            )
    lines += ["", *goals_markdown(doc["goals"])]
    return "\n".join(lines) + "\n"


def goals_markdown(goals: list[dict[str, Any]]) -> list[str]:
    if not goals:
        return []
    lines = ["| goal | target | measured | met |", "|---|---|---|---|"]
    for goal in goals:
        verdict = "yes" if goal["met"] else f"**no** ({goal['miss_factor']:.2f}× the target)"
        lines.append(f"| {goal['name']} | ≤ {goal['target']:.3f} | {goal['measured']:.3f} | {verdict} |")
    return lines


def http_markdown(doc: dict[str, Any]) -> str:
    cfg, req = doc["config"], doc["requests"]
    model = doc["server"].get("model", {})
    lines = [
        (f"### HTTP: {cfg['url']} ({model.get('name', '?')}, {model.get('backend', '?')} {model.get('precision', '')}), "
        f"concurrency {cfg['concurrency']}, cold fraction {cfg['cold_fraction']}"),
        "",
        (f"{req['sent']} requests in {doc['wall_s']:.1f} s → **{doc['throughput_rps']:.2f} req/s** ok; "
        f"errors {req['errors']} (429: {req['rate_limited']}, transport: {req['transport_errors']}); "
        f"status counts {req['by_status']}."),
        "",
        "| kind | n | p50 ms | p90 ms | p99 ms | mean ms | server total p50 | server queue p50 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, summary in doc["latency"].items():
        server = doc["server_timings_p50_ms"].get(kind, {})
        lines.append(
            f"| {kind} | {summary['n']} | **{_fmt(summary['p50'])}** | {_fmt(summary['p90'])} | {_fmt(summary['p99'])} "
            f"| {_fmt(summary['mean'])} | {_fmt(server.get('total'))} | {_fmt(server.get('queue'))} |"
        )
    if doc.get("paired"):
        paired = doc["paired"]
        lines += ["", f"Alternated in this run ({paired['pairs']} pairs, concurrency 1, same work on both sides):", "",
                  "| kind | HTTP p50 ms | direct pipeline p50 ms | HTTP / direct | HTTP − direct ms |",
                  "|---|---|---|---|---|"]
        for kind in ("warm", "cold"):
            h, d = paired[kind]["http"]["p50"], paired[kind]["direct"]["p50"]
            lines.append(f"| {kind} | {_fmt(h)} | {_fmt(d)} | {paired[f'{kind}_http_over_direct']:.3f} | {_fmt(h - d)} |")
    if doc.get("comparison"):
        comp = doc["comparison"]
        lines += ["", "Against the direct pipeline (same bundle, same prompts): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in comp.items()) + "."]
    lines += ["", *goals_markdown(doc["goals"])]
    return "\n".join(lines) + "\n"


def markdown(doc: dict[str, Any]) -> str:
    if doc["kind"] == "accuracy":
        from benchmarks.accuracy import markdown as accuracy_markdown

        return accuracy_markdown(doc)
    if doc["kind"] == "tracking":
        from benchmarks.tracking import markdown as tracking_markdown

        return tracking_markdown(doc["accuracy"], doc["throughput"])
    return pipeline_markdown(doc) if doc["kind"] == "pipeline" else http_markdown(doc)


# ------------------------------------------------------------------------------------- plot
def plot(doc: dict[str, Any], path: str) -> None:
    """Left: per-stage p50 stacked per path (+ the reference). Right: p50/p90/p99 per path."""
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and the Jetson have no display
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if doc["kind"] == "pipeline":
        names = list(doc["paths"])
        bottoms = [0.0] * len(names)
        for stage in STAGES:
            values = [doc["paths"][n]["stages"].get(stage, {}).get("p50", 0.0) for n in names]
            left.bar(names, values, bottom=bottoms, label=stage)
            bottoms = [b + v for b, v in zip(bottoms, values)]
        if doc.get("reference"):
            ref = [doc["reference"]["paths"][n]["end_to_end"]["p50"] for n in names]
            left.scatter(names, ref, marker="D", color="black", zorder=3, label="transformers eager (e2e)")
            if max(ref) > 10 * max(bottoms):  # the tiny model: eager overhead dwarfs our stages
                left.set_yscale("log")
        left.set_title(f"{doc['config']['bundle_name']}: per-stage p50 (ms)")
        groups = {n: doc["paths"][n]["end_to_end"] for n in names}
    else:
        kinds = list(doc["latency"])
        stages = ("queue", *STAGES)
        bottoms = [0.0] * len(kinds)
        for stage in stages:
            values = [doc["server_timings_p50_ms"].get(k, {}).get(stage, 0.0) for k in kinds]
            left.bar(kinds, values, bottom=bottoms, label=stage)
            bottoms = [b + v for b, v in zip(bottoms, values)]
        left.scatter(kinds, [doc["latency"][k]["p50"] for k in kinds], marker="D", color="black", zorder=3,
                     label="client-seen p50")
        left.set_title(f"HTTP c={doc['config']['concurrency']}: server stage p50 (ms)")
        groups = doc["latency"]
    left.set_ylabel("ms")
    left.legend(fontsize=8)
    width = 0.25
    for i, pct in enumerate(("p50", "p90", "p99")):
        xs = [j + (i - 1) * width for j in range(len(groups))]
        right.bar(xs, [g[pct] for g in groups.values()], width=width, label=pct)
    right.set_xticks(range(len(groups)), list(groups))
    right.set_title("end-to-end latency percentiles (ms)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
