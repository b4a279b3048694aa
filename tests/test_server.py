"""`ctcspec serve` as clients see it: a real server process on a loopback port, driven by the `openai` client
(and raw HTTP where the wire format itself is checked). Answers are compared with `ctcspec generate` and with
HF `generate` on the same model."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from server_helpers import API_KEY, running_server, start_server
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import hf_greedy
from ctcspec.cli import main
from ctcspec.prompts import encode_chat

PROMPTS = ["w5 w6 w7 w5 w6 w7 w5 w6", "w10 w11 w12", "w40 w41 w40 w41 w40"]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module", params=["1", "4"], ids=["one-at-a-time", "max-batch-4"])
def server(request, tiny_model_dir, tmp_path_factory):
    """The server one request at a time, and with continuous batching: every test holds for both."""
    log = tmp_path_factory.mktemp("server") / "log"
    with running_server(tiny_model_dir, log, "--max-queue", "32", "--max-batch", request.param) as server:
        server.max_batch = int(request.param)
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def oracle(tiny_model_dir):
    """HF generate's greedy chat answer (text) to a prompt, on the model the server runs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def answer(text: str, max_new_tokens: int) -> str:
        ids = encode_chat(tokenizer, [{"role": "user", "content": text}])
        return tokenizer.decode(hf_greedy(model, ids, max_new_tokens), skip_special_tokens=True)
    return answer


def generate_json(capsys, model_dir, prompt: str, *flags: str) -> dict:
    """What `ctcspec generate --json` gives for this prompt."""
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--prompt", prompt, "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def post(server, path: str, body, headers=AUTH, timeout: float = 120, **kwargs) -> requests.Response:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return requests.post(server.url + path, data=data, headers={"Content-Type": "application/json", **headers},
                         timeout=timeout, **kwargs)


def sse_events(response: requests.Response) -> list:
    """The data of each server-sent event, JSON-decoded ([DONE] as the string)."""
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chat_equals_ctcspec_generate(server, client, capsys, tiny_model_dir, prompt):
    expected = generate_json(capsys, tiny_model_dir, prompt, "--chat", "--max-new-tokens", "24")
    reply = client.chat.completions.create(model=str(tiny_model_dir), max_tokens=24,
                                           messages=[{"role": "user", "content": prompt}])
    assert reply.choices[0].message.content == expected["output"]
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt_tokens = len(encode_chat(tokenizer, [{"role": "user", "content": prompt}]))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.completion_tokens == len(expected["output_ids"]) == 24
    assert reply.usage.total_tokens == prompt_tokens + 24
    stats = reply.model_extra["ctcspec"]
    assert stats["drafter"] == expected["drafter"] and stats["new_tokens"] == 24
    assert stats["beta"] == pytest.approx(24 / stats["steps"], abs=1e-3)


def test_completion_equals_ctcspec_generate(server, client, capsys, tiny_model_dir):
    expected = generate_json(capsys, tiny_model_dir, PROMPTS[0], "--max-new-tokens", "20")
    reply = client.completions.create(model=str(tiny_model_dir), prompt=PROMPTS[0], max_tokens=20)
    assert reply.choices[0].text == expected["output"]
    assert reply.usage.completion_tokens == 20 and reply.object == "text_completion"
    by_ids = client.completions.create(model=str(tiny_model_dir), prompt=expected_ids(tiny_model_dir, PROMPTS[0]),
                                       max_tokens=20)
    assert by_ids.choices[0].text == expected["output"]


def expected_ids(model_dir, text: str) -> list[int]:
    return list(AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"])


def test_chat_stream_is_well_formed_and_equals_the_answer(server, client, tiny_model_dir):
    model = str(tiny_model_dir)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=30)
    body = {"model": model, "messages": messages, "max_tokens": 30, "stream": True,
            "stream_options": {"include_usage": True}}
    with post(server, "/v1/chat/completions", body, stream=True) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks + [usage])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == whole.choices[0].message.content
    steps = [c["ctcspec"]["step"] for c in chunks[1:-1]]
    assert steps == sorted(set(steps)) and all(c["ctcspec"]["step_tokens"] >= 1 for c in chunks[1:-1])
    assert chunks[-1]["ctcspec"]["new_tokens"] == 30
    assert usage["choices"] == [] and usage["usage"] == whole.usage.model_dump(exclude_none=True)
    assert all(c["usage"] is None for c in chunks)


def test_openai_client_streams(server, client, tiny_model_dir):
    model = str(tiny_model_dir)
    whole = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=16)
    stream = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=16, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[1]}],
                                          max_tokens=16, stream=True, stream_options={"include_usage": True})
    chat_chunks = list(chat)
    assert chat_chunks[-1].usage.completion_tokens == 16 and chat_chunks[-1].choices == []


def _words(client, model: str, prompt: str, n: int) -> list[str]:
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=n)
    return reply.choices[0].text.split(" ")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_the_answer_before_them(server, client, tiny_model_dir, stream):
    model = str(tiny_model_dir)
    words = _words(client, model, PROMPTS[2], 24)
    stop = " " + words[5]  # a word the greedy answer writes: the answer ends before its first occurrence
    expected = " ".join(words)[: " ".join(words).find(stop)]
    reply = client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=24, stop=[" w999", stop],
                                      stream=stream)
    if stream:
        chunks = list(reply)
        text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        text, finish = reply.choices[0].text, reply.choices[0].finish_reason
    assert text == expected and finish == "stop"
    unmatched = client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=24, stop="w999 w998")
    assert unmatched.choices[0].text == " ".join(words) and unmatched.choices[0].finish_reason == "length"
    last = client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=24, stop=" " + words[-1])
    assert last.choices[0].finish_reason == "stop"  # completed by the last token allowed: still a stop


def test_seeded_sampling_equals_ctcspec_generate(server, client, capsys, tiny_model_dir):
    expected = generate_json(capsys, tiny_model_dir, PROMPTS[1], "--chat", "--max-new-tokens", "20",
                             "--temperature", "1.5", "--top-k", "20", "--seed", "11")
    answers = [client.chat.completions.create(model=str(tiny_model_dir), max_tokens=20, temperature=1.5, seed=11,
                                              messages=[{"role": "user", "content": PROMPTS[1]}],
                                              extra_body={"top_k": 20}) for _ in range(2)]
    assert [a.choices[0].message.content for a in answers] == [expected["output"]] * 2
    assert answers[0].model_extra["ctcspec"]["seed"] == 11
    unseeded = client.chat.completions.create(model=str(tiny_model_dir), max_tokens=4, temperature=1.0,
                                              messages=[{"role": "user", "content": PROMPTS[1]}])
    assert isinstance(unseeded.model_extra["ctcspec"]["seed"], int)  # drawn, and reported for reproduction


def test_models_health_page_and_metrics(server, client, tiny_model_dir):
    assert [m.id for m in client.models.list()] == [str(tiny_model_dir)]
    assert requests.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    page = requests.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    client.chat.completions.create(model=str(tiny_model_dir), max_tokens=8,
                                   messages=[{"role": "user", "content": PROMPTS[0]}])
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    assert 'ctcspec_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics
    for name in ("ctcspec_tokens_per_step_count", "ctcspec_draft_seconds_total", "ctcspec_decode_seconds_total",
                 "ctcspec_generation_tokens_total", "ctcspec_requests_waiting", "ctcspec_base_forwards_total",
                 "ctcspec_time_to_first_token_seconds_bucket"):
        assert name in metrics, name
    assert _metric(metrics, "ctcspec_tokens_per_step_sum") == _metric(metrics, "ctcspec_generation_tokens_total")
    beta = _metric(metrics, "ctcspec_generation_tokens_total") / _metric(metrics, "ctcspec_base_forwards_total")
    assert _metric(metrics, "ctcspec_beta") == pytest.approx(beta)
    assert 0 < _metric(metrics, "ctcspec_draft_share") < 1


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


TOO_LONG = " ".join(f"w{3 + i % 90}" for i in range(400))  # 400 tokens; the tiny model's context holds 320
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "w1 w2"}]
# (path, body, headers, status, param, code)
ERRORS = {
    "malformed JSON": (CHAT, '{"messages": [', AUTH, 400, None, None),
    "no body": (CHAT, "", AUTH, 400, None, None),
    "body not an object": (CHAT, "[1, 2]", AUTH, 400, None, None),
    "empty messages": (CHAT, {"messages": []}, AUTH, 400, "messages", None),
    "unknown role": (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, AUTH, 400, "messages.0.role", None),
    "image content": (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                      AUTH, 400, "messages.0.content.0.type", None),
    "negative temperature": (CHAT, {"messages": USER, "temperature": -1}, AUTH, 400, "temperature", None),
    "top_p above 1": (CHAT, {"messages": USER, "top_p": 2}, AUTH, 400, "top_p", None),
    "temperature not a number": (CHAT, {"messages": USER, "temperature": "hot"}, AUTH, 400, "temperature", None),
    "n = 2": (CHAT, {"messages": USER, "n": 2}, AUTH, 400, "n", None),
    "max_tokens 0": (CHAT, {"messages": USER, "max_tokens": 0}, AUTH, 400, "max_tokens", None),
    "logprobs": (CHAT, {"messages": USER, "logprobs": True}, AUTH, 400, "logprobs", None),
    "tools": (CHAT, {"messages": USER, "tools": [{"type": "function"}]}, AUTH, 400, "tools", None),
    "frequency_penalty": (CHAT, {"messages": USER, "frequency_penalty": 0.5}, AUTH, 400, "frequency_penalty", None),
    "presence_penalty": (CHAT, {"messages": USER, "presence_penalty": -1}, AUTH, 400, "presence_penalty", None),
    "temperature that overflows": (CHAT, {"messages": USER, "temperature": 1e-40}, AUTH, 400, "temperature", None),
    "a lone surrogate": (CHAT, '{"messages": [{"role": "user", "content": "w1 \\ud800"}]}', AUTH, 400,
                         "messages.0.content", None),
    "stop string too long": (CHAT, {"messages": USER, "stop": "w1" * 200}, AUTH, 400, "stop", None),
    "too many stop strings": (CHAT, {"messages": USER, "stop": [f"w{i}" for i in range(17)]}, AUTH, 400, "stop",
                              None),
    "unknown field": (CHAT, {"messages": USER, "max_tokenz": 5}, AUTH, 400, "max_tokenz", None),
    "stream_options without stream": (CHAT, {"messages": USER, "stream_options": {"include_usage": True}}, AUTH,
                                      400, None, None),
    "empty stop string": (CHAT, {"messages": USER, "stop": [""]}, AUTH, 400, "stop", None),
    "seed too large": (CHAT, {"messages": USER, "seed": 2**64}, AUTH, 400, "seed", None),
    "prompt longer than the context": (CHAT, {"messages": [{"role": "user", "content": TOO_LONG}]}, AUTH, 400,
                                       "messages", "context_length_exceeded"),
    "max_tokens past the context": (CHAT, {"messages": USER, "max_tokens": 1000}, AUTH, 400, "max_tokens",
                                    "context_length_exceeded"),
    "completion: empty prompt": ("/v1/completions", {"prompt": ""}, AUTH, 400, "prompt", None),
    "completion: batch of prompts": ("/v1/completions", {"prompt": ["w1", "w2"]}, AUTH, 400, "prompt", None),
    "completion: token id outside the vocabulary": ("/v1/completions", {"prompt": [1, 2, 100000]}, AUTH, 400,
                                                    "prompt", None),
    "completion: echo": ("/v1/completions", {"prompt": "w1", "echo": True}, AUTH, 400, "echo", None),
    "no API key": (CHAT, {"messages": USER}, {}, 401, None, "invalid_api_key"),
    "wrong API key": (CHAT, {"messages": USER}, {"Authorization": "Bearer nope"}, 401, None, "invalid_api_key"),
    "unknown model": (CHAT, {"model": "gpt-5", "messages": USER}, AUTH, 404, "model", "model_not_found"),
    "unknown path": ("/v1/embeddings", {"input": "w1"}, AUTH, 404, None, "not_found"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_requests_get_an_openai_error(server, case):
    path, body, headers, status, param, code = ERRORS[case]
    response = post(server, path, body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"] and "\n" not in error["message"]
    assert error["param"] == param and error["code"] == code, error


def test_wrong_method_and_unauthorized_models(server):
    assert requests.get(server.url + CHAT, timeout=10).status_code == 405
    assert requests.get(server.url + "/v1/models", timeout=10).json()["error"]["code"] == "invalid_api_key"


def test_sixteen_concurrent_streams_some_disconnecting(server, client, oracle, tiny_model_dir):
    """Every stream that runs to its end is exactly HF generate's greedy answer; clients that leave mid-stream
    free the engine at its next step; nothing is lost and the server stays healthy."""
    model, stay, leave = str(tiny_model_dir), 24, 250
    prompts = [f"w{3 + i} w{20 + i} w{3 + i} w{20 + i}" for i in range(16)]
    metrics_before = requests.get(server.url + "/metrics", timeout=10).text
    before = _metric(metrics_before, "ctcspec_generation_tokens_total")
    started = threading.Barrier(16)

    def run(i: int):
        leaving = i % 4 == 1
        body = {"model": model, "messages": [{"role": "user", "content": prompts[i]}], "stream": True,
                "max_tokens": leave if leaving else stay, "stream_options": {"include_usage": True}}
        started.wait()
        with post(server, CHAT, body, stream=True) as response:
            assert response.status_code == 200
            if leaving:
                lines = response.iter_lines(decode_unicode=True)
                for _ in range(4):  # the role chunk, then a step or two
                    next(lines)
                return None
            events = sse_events(response)
        assert events[-1] == "[DONE]"
        return "".join(e["choices"][0]["delta"]["content"] for e in events[:-2]), events[-2]["usage"]

    with ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = list(pool.map(run, range(16)))
    for i, outcome in enumerate(outcomes):
        if outcome is not None:
            text, usage = outcome
            assert text == oracle(prompts[i], stay), i
            assert usage["completion_tokens"] == stay
    completed = sum(o is not None for o in outcomes)
    assert completed == 12
    metrics = _idle_metrics(server)  # the engine finishes the last step of the last client that left
    generated = _metric(metrics, "ctcspec_generation_tokens_total") - before
    assert generated - completed * stay < 4 * leave / 2, "clients that left kept the engine busy"
    def grown(name: str) -> float:
        return _metric(metrics, name) - _metric(metrics_before, name)
    forwards = grown("ctcspec_batch_sequences_count")
    if server.max_batch > 1:  # sixteen clients at once keep every row busy most of the time
        assert grown("ctcspec_batch_sequences_sum") / forwards > 0.75 * server.max_batch
        assert grown("ctcspec_batch_nodes_sum") >= grown("ctcspec_batch_sequences_sum")
    else:
        assert forwards == 0
    assert requests.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    after = client.chat.completions.create(model=model, max_tokens=stay,
                                           messages=[{"role": "user", "content": prompts[0]}])
    assert after.choices[0].message.content == oracle(prompts[0], stay)


def _idle_metrics(server) -> str:
    """/metrics once nothing is waiting or running."""
    deadline = time.monotonic() + 60
    while True:
        metrics = requests.get(server.url + "/metrics", timeout=10).text
        idle = _metric(metrics, "ctcspec_requests_running") == 0 and _metric(metrics, "ctcspec_requests_waiting") == 0
        if idle or time.monotonic() > deadline:
            return metrics
        time.sleep(0.2)


def test_a_client_that_gives_up_on_a_plain_answer_frees_the_engine(server):
    before = _metric(_idle_metrics(server), "ctcspec_generation_tokens_total")
    with pytest.raises(requests.Timeout):
        post(server, CHAT, {"messages": USER, "max_tokens": 300}, timeout=0.1)  # well before 300 tokens here
    generated = _metric(_idle_metrics(server), "ctcspec_generation_tokens_total") - before
    assert generated < 300, "the engine finished an answer nobody was waiting for"


@pytest.mark.parametrize("max_batch", ["1", "4"])
def test_full_queue_is_429_and_sigterm_drains(tiny_model_dir, tmp_path, max_batch):
    """With --max-queue 1, a second request while one runs gets 429; SIGTERM lets the running stream finish,
    then the server exits cleanly."""
    server = start_server(tiny_model_dir, tmp_path / "log", "--max-queue", "1", "--max-batch", max_batch)
    try:
        body = {"messages": USER, "stream": True, "max_tokens": 300}
        with post(server, CHAT, body, stream=True) as response:
            lines = response.iter_lines(decode_unicode=True)
            next(line for line in lines if line.startswith("data: "))
            busy = post(server, CHAT, {"messages": USER, "max_tokens": 4})
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
            server.process.send_signal(15)
            rest = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]" and json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
        assert json.loads(rest[-2])["ctcspec"]["new_tokens"] == 300
        assert server.process.wait(timeout=60) == 0
        assert "Traceback" not in server.output()
    finally:
        server.stop()
