"""/openapi.json says exactly what the server accepts: schemathesis, every check, both ways.

Positive examples (schema-valid) must be accepted, negative ones (schema-invalid) refused with a
4xx, no 5xx, responses as documented. Bounded for CI (a fixed number of derandomized examples
per operation, most of them on the POST routes); the long campaign is run by hand:

    SCHEMATHESIS_HOOKS=tests.server.schemathesis_hooks .venv/bin/schemathesis run \\
        http://127.0.0.1:8000/openapi.json --checks all --max-time 300 --exclude-path /demo/scene

(benchmarks/RESULTS.md has its figures). tests/server/schemathesis_hooks.py teaches the fuzzer
that an image is an image, and works around two multipart misjudgements of schemathesis 4.32.5.
/demo/scene (the demo page's sample-scene helper, server/demo.py) is not part of the API.

schemathesis' own pytest plugin (4.32.5) does not load under pytest 9 ("'Function' object has no
attribute '_nodeid'"), so operations are driven through hypothesis directly.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis==4.32.5 (requirements/dev.txt)")
import tests.server.schemathesis_hooks  # noqa: E402,F401  (registers the image strategies and the hooks)
from hypothesis import HealthCheck, given, settings  # noqa: E402  (hypothesis ships with schemathesis)
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import CHECKS, load_all_checks  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

POST_EXAMPLES = 100  # per generation mode
OTHER_EXAMPLES = 8
NOT_API = {"GET /demo/scene"}


def test_openapi_documents_every_route_with_the_servers_limits(server) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    paths = schema.raw_schema["paths"]
    assert {"/segment", "/embed", "/embeddings/{image_id}", "/healthz", "/readyz", "/info", "/metrics"} <= set(paths)
    body = paths["/segment"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    as_json = body["application/json"]["schema"]["properties"]
    # tests/server/conftest.py SERVER_ENV: 8 prompts of 64 characters, uploads of 2 MiB.
    text_prompt, exemplar_ref = as_json["prompts"]["items"]["anyOf"]  # the tiny bundle takes exemplar boxes
    exemplar = schema.raw_schema["components"]["schemas"][exemplar_ref["$ref"].rsplit("/", 1)[1]]
    assert as_json["prompts"]["maxItems"] == 8 and text_prompt["maxLength"] == 64
    assert exemplar["properties"]["boxes"]["maxItems"] == 16
    assert as_json["max_detections"]["anyOf"][0]["maximum"] == 100
    assert as_json["image"]["anyOf"][0]["maxLength"] == 4 * -(-2 * 1024 * 1024 // 3)
    assert as_json["image_id"]["anyOf"][0]["pattern"] == "^[0-9a-f]{64}$"
    assert "securitySchemes" not in schema.raw_schema.get("components", {})  # no key configured


def test_no_failures_with_every_check(server) -> None:
    load_all_checks()
    checks = CHECKS.get_all()
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations() if r.ok().label not in NOT_API]
    assert len(operations) >= 7
    seen: list[str] = []
    for operation in operations:
        examples = POST_EXAMPLES if operation.method.upper() == "POST" else OTHER_EXAMPLES
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case) -> None:
                case.call_and_validate(base_url=server.url, checks=checks, timeout=30)

            try:
                check()
            except Unsatisfiable:
                if mode is GenerationMode.POSITIVE:
                    raise  # an operation without parameters or body has no negative case
        seen.append(operation.label)
    print("fuzzed:", seen)
