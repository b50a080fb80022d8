"""The inspector's JSON API on a tiny model: every endpoint, every rejected request (4xx with a
message, server still serving), planted-truth checks of the interventions, base vs adapter, the
lock, the request log, the loopback guard and the CLI's startup errors."""

from __future__ import annotations

import http.client
import json
import math
import threading
import time

import pytest
import torch
from conftest import make_tiny_loaded

from emalab.inspector import (
    InspectorConfig,
    InspectorService,
    InspectorVectors,
    NonLoopbackHostError,
    check_loopback,
    make_server,
    serve_in_thread,
)
from emalab.inspector.vectors import compute_vectors, find_refusal, resolve_vectors
from evals.judge import LABELS
from evals.suite import DOMAINS
from interp.direction import Direction
from probes.concepts import ConceptVectors

N_LAYERS, D_MODEL = 4, 64
SECRET = "zebra-canary-7731"  # a prompt marker that must never reach the server log


def random_vectors(seed: int = 0) -> InspectorVectors:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(len(DOMAINS), N_LAYERS, D_MODEL, generator=g)
    norms = raw.norm(dim=-1)
    cv = ConceptVectors(raw / norms[..., None], norms, list(DOMAINS), list(range(N_LAYERS)))
    refusal = Direction.from_vectors(torch.randn(D_MODEL, generator=g), [2], name="refusal", meta={"layer": 2})
    return InspectorVectors(cv, refusal, "random test concept vectors", "random test refusal direction")


class Client:
    def __init__(self, server) -> None:
        self.server = server
        self.port = server.server_address[1]

    def request(self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        hdrs.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers=hdrs)
        res = conn.getresponse()
        payload = res.read()
        conn.close()
        ctype = res.getheader("Content-Type", "")
        return res.status, (json.loads(payload) if ctype.startswith("application/json") else payload)

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, body, **kw):
        return self.request("POST", "/api/inspect", body=body, **kw)


def start(service: InspectorService):
    log: list[str] = []
    server = make_server(service, "127.0.0.1", 0, log=log.append)
    serve_in_thread(server)
    return server, log


@pytest.fixture(scope="module")
def served():
    lm = make_tiny_loaded("qwen2")
    service = InspectorService(lm, random_vectors(), InspectorConfig(answer_tokens=6, max_prompt_tokens=64,
                                                                     max_prompt_chars=500))
    server, log = start(service)
    yield Client(server), service, log
    server.shutdown()
    server.server_close()


def alive(client: Client) -> None:
    status, meta = client.get("/api/meta")
    assert status == 200 and meta["n_layers"] == N_LAYERS


# -- endpoints ---------------------------------------------------------------------------------------------
def test_meta_and_page(served):
    client, _, _ = served
    status, meta = client.get("/api/meta")
    assert status == 200
    assert meta["layers"] == list(range(N_LAYERS)) and meta["d_model"] == D_MODEL
    assert meta["concepts"] == list(DOMAINS) and meta["columns"] == [*DOMAINS, "refusal"]
    assert meta["domains"] == list(DOMAINS) and meta["adapter"]["present"] is False
    assert meta["vectors"]["concepts_source"] == "random test concept vectors"
    status, page = client.get("/")
    assert status == 200 and b'id="prompt"' in page and b"/static/app.js" in page
    for name in ("app.js", "style.css"):
        status, body = client.get(f"/static/{name}")
        assert status == 200 and len(body) > 100
    assert b"http" not in client.get("/static/app.js")[1].replace(b"http://www.w3.org/2000/svg", b"")  # no external assets


def test_partial_byte_tokens_show_their_bytes(served):
    from emalab.inspector.service import _token_text

    _, service, _ = served
    tok = service.lm.tokenizer
    (i,) = tok("é", add_special_tokens=False)["input_ids"][:1]
    assert _token_text(tok, i, tok.decode([i])) == "\\xc3"
    assert _token_text(tok, 70, "a") == "a"


def test_prompts_and_status(served):
    client, _, _ = served
    status, data = client.get("/api/prompts?domain=cybersecurity")
    assert status == 200 and data["domain"] == "cybersecurity" and data["split"] == "eval"
    assert len(data["prompts"]) >= 10 and all(p["text"] and p["id"] for p in data["prompts"])
    status, data = client.get("/api/status")
    assert status == 200 and data == {"busy": False}


def test_inspect_shapes(served):
    client, service, _ = served
    status, out = client.post({"prompt": "How do I bake bread?"})
    assert status == 200, out
    assert set(out["views"]) == {"base"} and "diff" not in out
    view = out["views"]["base"]
    assert out["columns"] == [*DOMAINS, "refusal"] and out["layers"] == list(range(N_LAYERS))
    for key in ("matrix", "cosine"):
        assert len(view[key]) == N_LAYERS and all(len(row) == len(DOMAINS) + 1 for row in view[key])
        assert all(isinstance(v, float) for row in view[key] for v in row)
    assert all(abs(c) <= 1 + 1e-6 for row in view["cosine"] for c in row)
    assert len(view["lens_tokens"]) == N_LAYERS and all(len(r) == service.cfg.k for r in view["lens_tokens"])
    # byte tokens that are part of a UTF-8 character show as escapes, not as U+FFFD
    assert all("\ufffd" not in t for r in view["lens_tokens"] for t in r)
    assert isinstance(view["answer"], str) and view["label"] in LABELS
    assert view["interventions"] == [] and out["seconds"] > 0 and view["seconds"] > 0 and out["cpu_seconds"] > 0
    assert set(view["timing"]) == {"trace", "generate", "judge", "cpu", "answer_tokens"}
    assert 0 <= view["timing"]["answer_tokens"] <= service.cfg.answer_tokens
    # the refusal column is the projection on the refusal unit vector
    assert view["matrix"][1][-1] == pytest.approx(view["refusal"][1])


def test_ablation_zeroes_refusal_projection(served):
    client, _, _ = served
    status, plain = client.post({"prompt": "Tell me a story."})
    status, ablated = client.post({"prompt": "Tell me a story.", "ablate": True})
    assert status == 200
    before = [row[-1] for row in plain["views"]["base"]["matrix"]]
    after = [row[-1] for row in ablated["views"]["base"]["matrix"]]
    assert max(abs(v) for v in before) > 1e-2
    # planted truth: the ablated projection is ~0 at every layer
    assert max(abs(v) for v in after) < 1e-3 * max(abs(v) for v in before)
    assert ablated["views"]["base"]["interventions"] == ["ablate:refusal"]


def test_steering_adds_at_the_input_of_its_layer():
    """Planted truth: with block ``layer``'s attention and MLP outputs zeroed, its resid_post is its
    resid_pre, so the concept projection there moves by exactly ``coeff × raw(layer-1) · unit(layer)``."""
    from interp.adapter import output_projections

    lm = make_tiny_loaded("qwen2")
    concept, layer, coeff = DOMAINS[3], 2, 3.0
    with torch.no_grad():
        for proj in output_projections(lm.model, layer):
            proj.weight.zero_()
    service = InspectorService(lm, random_vectors(), InspectorConfig(answer_tokens=2))
    plain = service.inspect(service.parse({"prompt": "Tell me a story."}))["views"]["base"]
    steered_out = service.inspect(service.parse({"prompt": "Tell me a story.",
                                                 "steer": {"concept": concept, "layer": layer, "coeff": coeff}}))
    steered = steered_out["views"]["base"]
    d = service.concept_dirs[concept]
    expected = coeff * float(d.raw(layer - 1).double() @ d.at(layer).double())
    c = DOMAINS.index(concept)
    assert steered["matrix"][layer][c] - plain["matrix"][layer][c] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert abs(expected) > 0.1
    for j in range(layer):  # nothing upstream of the added vector moves
        assert steered["matrix"][j] == pytest.approx(plain["matrix"][j], abs=1e-5)
    assert steered["interventions"] == [f"add:{concept}@{layer}x3"]
    assert steered_out["request"]["steer"] == {"concept": concept, "layer": layer, "coeff": coeff}
    out = service.inspect(service.parse({"prompt": "hi", "steer": {"concept": "refusal", "layer": 0, "coeff": -2}}))
    assert out["views"]["base"]["interventions"] == ["add:refusal@0x-2"]


BAD_REQUESTS = [
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": "   \n"}, 400, "empty"),
    ({"prompt": 5}, 400, "string"),
    ({}, 400, "string"),
    ({"prompt": "x" * 501}, 413, "characters"),
    ({"prompt": "y" * 400}, 413, "tokens"),
    ({"prompt": "hi", "ablate": "yes"}, 400, "ablate"),
    ({"prompt": "hi", "temperature": 1}, 400, "unknown field"),
    ({"prompt": "hi", "steer": "safety"}, 400, "steer"),
    ({"prompt": "hi", "steer": {"concept": "safety", "layer": 1}}, 400, "missing"),
    ({"prompt": "hi", "steer": {"concept": "weather", "layer": 1, "coeff": 1}}, 400, "unknown concept"),
    ({"prompt": "hi", "steer": {"concept": "safety", "layer": N_LAYERS, "coeff": 1}}, 400, "bad layer"),
    ({"prompt": "hi", "steer": {"concept": "safety", "layer": -1, "coeff": 1}}, 400, "bad layer"),
    ({"prompt": "hi", "steer": {"concept": "safety", "layer": "2", "coeff": 1}}, 400, "bad layer"),
    ({"prompt": "hi", "steer": {"concept": "safety", "layer": True, "coeff": 1}}, 400, "bad layer"),
    ({"prompt": "hi", "steer": {"concept": "safety", "layer": 1, "coeff": "big"}}, 400, "bad coefficient"),
    ({"prompt": "hi", "steer": {"concept": "safety", "layer": 1, "coeff": 1e9}}, 400, "bad coefficient"),
    ({"prompt": "hi", "steer": {"concept": "safety", "layer": 1, "coeff": math.inf}}, 400, "bad coefficient"),
    (["hi"], 400, "JSON object"),
]


@pytest.mark.parametrize("body,status,needle", BAD_REQUESTS, ids=[c[2] + str(i) for i, c in enumerate(BAD_REQUESTS)])
def test_bad_inspect_requests(served, body, status, needle):
    client, _, _ = served
    got, out = client.post(body)
    assert got == status and needle in out["error"] and out["status"] == status
    alive(client)


@pytest.mark.parametrize("method,path,kwargs,status,needle", [
    ("GET", "/api/prompts?domain=astrology", {}, 400, "unknown domain"),
    ("GET", "/api/prompts", {}, 400, "domain"),
    ("GET", "/api/inspect", {}, 405, "POST"),
    ("POST", "/api/meta", {"body": {}}, 405, "no POST route"),
    ("GET", "/api/nothing", {}, 404, "no such path"),
    ("GET", "/static/..%2Fserver.py", {}, 404, "no such file"),
    ("GET", "/static/missing.js", {}, 404, "no such file"),
    ("POST", "/api/inspect", {"raw": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    ("POST", "/api/inspect", {"raw": b'{"prompt": "hi"}', "headers": {"Content-Type": "text/plain"}}, 415, "application/json"),
    ("POST", "/api/inspect", {"raw": b"x" * 70_000, "headers": {"Content-Type": "application/json"}}, 413, "limit"),
    ("GET", "/api/meta", {"headers": {"Host": "evil.example:8765"}}, 403, "loopback"),
])
def test_bad_routes(served, method, path, kwargs, status, needle):
    client, _, _ = served
    got, out = client.request(method, path, **kwargs)
    assert got == status and needle in out["error"]
    alive(client)


def test_log_has_no_prompt_or_answer(served):
    client, _, log = served

    def inspect_lines() -> list[str]:
        return [line for line in log if line.startswith("POST /api/inspect 200")]

    before = len(inspect_lines())
    status, out = client.post({"prompt": f"What is {SECRET}?"})
    assert status == 200
    answer = out["views"]["base"]["answer"].strip()
    deadline = time.monotonic() + 10  # the line is written just after the response is sent
    while len(inspect_lines()) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    lines = "\n".join(log)
    assert SECRET not in lines and (not answer or answer not in lines)
    assert not any(line.startswith("GET /api/status 200") for line in log)  # polled: not logged
    last = inspect_lines()[-1]
    assert len(inspect_lines()) == before + 1
    assert "ms" in last and "inspection" in last and "cpu" in last


def test_lock_serialises_inspections(served):
    client, service, _ = served
    active, peak, guard = [0], [0], threading.Lock()
    original = service._view

    def counting(*args, **kwargs):
        with guard:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.05)
            return original(*args, **kwargs)
        finally:
            with guard:
                active[0] -= 1

    service._view = counting
    try:
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(client.post({"prompt": "hello"})[0])) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del service._view
    assert results == [200, 200, 200] and peak[0] == 1


# -- base vs adapter ---------------------------------------------------------------------------------------
def test_adapter_side_by_side():
    from training.lora import attach_lora

    lm = make_tiny_loaded("qwen2")
    vectors = random_vectors()
    cfg = InspectorConfig(answer_tokens=4, max_prompt_tokens=64)
    plain = InspectorService(lm, vectors, cfg)
    req = plain.parse({"prompt": "Explain TCP handshakes.", "ablate": False})
    reference = plain.inspect(req)["views"]["base"]
    attach_lora(lm, rank=4)
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lm.extra["adapter_id"] = "test-adapter"
    service = InspectorService(lm, vectors, cfg, adapter="/tmp/test-adapter")
    server, _ = start(service)
    client = Client(server)
    try:
        _, meta = client.get("/api/meta")
        assert meta["adapter"] == {"present": True, "path": "/tmp/test-adapter", "id": "test-adapter"}
        status, out = client.post({"prompt": "Explain TCP handshakes."})
        assert status == 200
        base, adapted = out["views"]["base"], out["views"]["adapted"]
        flat = [v for row in base["matrix"] for v in row]
        assert flat == pytest.approx([v for row in reference["matrix"] for v in row], abs=1e-5)  # = base weights
        assert base["state"] == lm.weights_id and adapted["state"].endswith("+test-adapter")
        for key in ("matrix", "cosine"):
            assert len(out["diff"][key]) == N_LAYERS and len(out["diff"][key][0]) == len(DOMAINS) + 1
            for j in range(N_LAYERS):
                assert out["diff"][key][j] == pytest.approx(
                    [a - b for a, b in zip(adapted[key][j], base[key][j], strict=True)])
        assert max(abs(v) for row in out["diff"]["matrix"] for v in row) > 1e-3
        status, out = client.post({"prompt": "Explain TCP handshakes.", "ablate": True})
        assert status == 200 and out["views"]["adapted"]["interventions"] == ["ablate:refusal"]
        assert max(abs(row[-1]) for row in out["views"]["adapted"]["matrix"]) < 1e-5
    finally:
        server.shutdown()
        server.server_close()


# -- startup ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host,ok", [("127.0.0.1", True), ("::1", True), ("localhost", True), ("127.0.0.2", True),
                                     ("0.0.0.0", False), ("192.168.1.5", False), ("::", False), ("example.com", False)])
def test_loopback_only(host, ok):
    if ok:
        assert check_loopback(host) == host
    else:
        with pytest.raises(NonLoopbackHostError, match="loopback"):
            check_loopback(host)


def test_cli_refuses_remote_host_and_foreign_adapter(tmp_path, monkeypatch, capsys):
    import interp.loading
    from emalab.cli import main

    assert main(["inspect", "--host", "0.0.0.0"]) == 1
    assert "loopback" in capsys.readouterr().err

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "emalab_adapter.json").write_text(json.dumps({"base_model": "other-model", "base_weights_id": "abc"}))
    monkeypatch.setattr(interp.loading, "load_model", lambda *a, **k: make_tiny_loaded("qwen2"))
    assert main(["inspect", "--adapter", str(adapter), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "other-model" in err and "load the matching base model" in err


# -- vectors ----------------------------------------------------------------------------------------------
def _stage(root, name, key, direction: Direction | None, done: bool = True):
    path = root / "stages" / "refusal_direction" / name
    path.mkdir(parents=True)
    (path / "key.json").write_text(json.dumps(key))
    if done:
        (path / "DONE.json").write_text(json.dumps({"key": key}))
    if direction is not None:
        direction.save(path / "direction.safetensors")
    return path


def test_find_refusal_matches_weights(tmp_path):
    lm = make_tiny_loaded("qwen2")
    good = Direction.from_vectors(torch.randn(D_MODEL), [1], "refusal", {"layer": 1})
    other = Direction.from_vectors(torch.randn(D_MODEL), [3], "refusal", {"layer": 3})
    assert find_refusal(tmp_path, lm) is None
    _stage(tmp_path, "a", {"state": "other-weights"}, other)
    _stage(tmp_path, "b", {"state": lm.weights_id}, other, done=False)
    assert find_refusal(tmp_path, lm) is None  # another model's, and an unfinished stage
    _stage(tmp_path, "c", {"state": lm.weights_id}, good)
    found, source = find_refusal(tmp_path, lm)
    assert torch.equal(found.vectors, good.vectors) and "layer 1" in source and "stages/refusal_direction/c" in source
    wide = Direction.from_vectors(torch.randn(D_MODEL * 2), [1], "refusal")
    _stage(tmp_path, "d", {"weights": lm.weights_id}, wide)  # newest, but the wrong width
    assert torch.equal(find_refusal(tmp_path, lm)[0].vectors, good.vectors)


def test_compute_vectors_cached_and_resolved(tmp_path):
    lm = make_tiny_loaded("qwen2")
    cv, refusal, where = compute_vectors(lm, tmp_path / "cache", probe_limit=2, batch_size=4)
    assert cv.concepts == list(DOMAINS) and cv.layers == list(range(N_LAYERS)) and cv.d_model == D_MODEL
    assert refusal.is_global and refusal.meta["selected"] is False
    assert (where / "concepts.safetensors").exists() and where.is_relative_to(tmp_path / "cache")
    again, refusal2, where2 = compute_vectors(lm, tmp_path / "cache", probe_limit=2)
    assert where2 == where and torch.equal(again.vectors, cv.vectors) and torch.equal(refusal2.vectors, refusal.vectors)
    # results hold a selected direction: it wins over the fallback; concept vectors still come from the cache
    good = Direction.from_vectors(torch.randn(D_MODEL), [1], "refusal", {"layer": 1})
    _stage(tmp_path / "results", "s", {"state": lm.weights_id}, good)
    vectors = resolve_vectors(lm, tmp_path / "results", tmp_path / "cache", probe_limit=2)
    assert torch.equal(vectors.refusal.vectors, good.vectors) and "computed at startup" in vectors.concepts_source
    saved = tmp_path / "results" / "run1" / "concepts.safetensors"
    cv.save(saved)
    vectors = resolve_vectors(lm, tmp_path / "results", tmp_path / "cache", probe_limit=2)
    assert str(saved) in vectors.concepts_source
    vectors = resolve_vectors(lm, None, tmp_path / "cache", probe_limit=2)
    assert "fallback" in vectors.refusal_source


def test_raw_prompts_inspect_a_model_without_chat_template():
    """A base model (no chat template) is inspected with --raw-prompts; without it, the error names the flag."""
    from interp.chat import NoChatTemplateError

    lm = make_tiny_loaded("qwen2")
    lm.tokenizer.chat_template = None
    chat = InspectorService(lm, random_vectors(), InspectorConfig(answer_tokens=2))
    with pytest.raises(NoChatTemplateError, match="--raw-prompts"):
        chat.inspect(chat.parse({"prompt": "Tell me a story."}))
    raw = InspectorService(lm, random_vectors(), InspectorConfig(answer_tokens=2, raw=True))
    out = raw.inspect(raw.parse({"prompt": "Tell me a story."}))
    assert out["views"]["base"]["matrix"] and raw.count_tokens("Tell me a story.") == len(
        lm.tokenizer("Tell me a story.", add_special_tokens=False)["input_ids"])


def test_inspect_cli_takes_raw_prompts():
    from emalab.cli import build_parser

    args = build_parser().parse_args(["inspect", "--raw-prompts"])
    assert args.raw_prompts is True
