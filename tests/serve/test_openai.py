"""The OpenAI-compatible routes through the official ``openai`` client against a real uvicorn on
127.0.0.1: completions, chat, streaming, models, errors in OpenAI's format, a client leaving
mid-stream, adapters loaded on demand, and the Prometheus metrics."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

import deltatune as dt
from deltatune.serve import create_app
from tests.serve.conftest import LiveServer
from tests.serve.generation_fixtures import (CHAT_TEMPLATE, LLAMA_ADAPTERS, chat_tokenizer, greedy_alone,  # noqa: F401
                                             llama_root, llama_with, tiny_llama)


@pytest.fixture(scope="module")
def reference(llama_root):
    return llama_with(llama_root, [*LLAMA_ADAPTERS, "spare"])


@pytest.fixture(scope="module")
def server(llama_root, chat_tokenizer):
    app = create_app(llama_with(llama_root), chat_tokenizer, adapter_root=llama_root, load_on_demand=True,
                     max_adapters=8, max_running=8, precision="fp32")
    with LiveServer(app) as live:
        live.app = app
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def expected_text(reference, tokenizer, adapter: str, prompt_ids: list[int], n: int) -> str:
    return tokenizer.decode(greedy_alone(reference, adapter, prompt_ids, n), skip_special_tokens=True)


def test_models_lists_the_base_and_every_loaded_adapter(client):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == dt.BASE_ADAPTER and set(LLAMA_ADAPTERS) <= set(ids)


def test_completions_equal_the_library_alone(client, reference, chat_tokenizer):
    prompt = "the quick brown fox"
    ids = chat_tokenizer(prompt)["input_ids"]
    for name in ["l0", "l3", dt.BASE_ADAPTER]:
        out = client.completions.create(model=name, prompt=prompt, max_tokens=9, temperature=0)
        assert out.choices[0].text == expected_text(reference, chat_tokenizer, name, ids, 9)
        assert out.choices[0].finish_reason == "length"
        assert out.model == name
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 9)


def test_concurrent_requests_over_adapters_each_equal_alone(server, reference, chat_tokenizer):
    prompts = ["a", "the cat sat on the mat", "why is the sky blue", "one two three four five six"]
    jobs = [([*LLAMA_ADAPTERS, dt.BASE_ADAPTER][i % 5], prompts[i % 4], 4 + i) for i in range(12)]

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(client.completions.create(model=m, prompt=p, max_tokens=n, temperature=0)
                                          for m, p, n in jobs))

    for (name, prompt, n), out in zip(jobs, asyncio.run(main())):
        ids = chat_tokenizer(prompt)["input_ids"]
        assert out.choices[0].text == expected_text(reference, chat_tokenizer, name, ids, n), (name, prompt)


def test_chat_streamed_and_not_give_the_same_text_through_the_chat_template(client, reference, chat_tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a colour"}]
    whole = client.chat.completions.create(model="l1", messages=messages, max_tokens=10, temperature=0)
    rendered = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("assistant:")
    ids = chat_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert whole.choices[0].message.content == expected_text(reference, chat_tokenizer, "l1", ids, 10)
    assert whole.choices[0].message.role == "assistant" and whole.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model="l1", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # it streamed, piece by piece
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_sampling_with_a_seed_repeats_and_stop_strings_end_the_text(client):
    kwargs = dict(model="l2", prompt="once upon a time", max_tokens=12, temperature=0.8, top_p=0.9, seed=11)
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first
    greedy = client.completions.create(model="l2", prompt="once upon a time", max_tokens=12, temperature=0)
    text = greedy.choices[0].text
    stop = text.split()[len(text.split()) // 2]
    cut = client.completions.create(model="l2", prompt="once upon a time", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="l2", prompt="once upon a time", max_tokens=12, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_errors_come_in_openai_format(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="hi", max_tokens=3)
    assert err.value.status_code == 404 and "nope" in err.value.message
    assert err.value.body["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="l0", prompt="hi", max_tokens=3, n=2)
    assert "n" in err.value.message
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "l0", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.NotFoundError):  # on-demand loads take only folders inside the root
        client.completions.create(model="..", prompt="hi", max_tokens=3)


def test_on_demand_loads_follow_the_admin_path_rules(client, llama_root, chat_tokenizer):
    (llama_root / "linked").symlink_to(llama_root / "l0", target_is_directory=True)
    with pytest.raises(openai.PermissionDeniedError, match="symlink"):
        client.completions.create(model="linked", prompt="hi", max_tokens=3)
    with pytest.raises(dt.ConfigError, match="adapter-root"):
        create_app(tiny_llama(), chat_tokenizer, load_on_demand=True)


def test_a_client_leaving_mid_stream_frees_its_slot(server):
    scheduler = server.app.state.generation.scheduler
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={"model": "l0", "prompt": "tell me", "max_tokens": 1000,
                                                      "temperature": 0, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        deadline = time.monotonic() + 30
        while (scheduler.running or scheduler.batch.rows) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not scheduler.running and not scheduler.batch.rows
        metrics = c.get("/metrics", headers={"Accept": "text/plain"}).text
    assert 'deltatune_generation_requests_total{adapter="l0",finish_reason="cancelled"} 1.0' in metrics


def test_an_adapter_folder_loads_on_demand(client, reference, chat_tokenizer, server):
    assert "spare" not in server.app.state.engine.loaded
    out = client.completions.create(model="spare", prompt="hello", max_tokens=6, temperature=0)
    ids = chat_tokenizer("hello")["input_ids"]
    assert out.choices[0].text == expected_text(reference, chat_tokenizer, "spare", ids, 6)
    assert "spare" in [m.id for m in client.models.list()]


def test_prometheus_metrics_per_adapter(client, server):
    client.completions.create(model="l3", prompt="hi there", max_tokens=5, temperature=0)
    text = httpx.get(f"{server.url}/metrics", headers={"Accept": "text/plain; version=0.0.4"}).text
    assert 'deltatune_time_to_first_token_seconds_count{adapter="l3"}' in text
    assert 'deltatune_generated_tokens_total{adapter="l3"}' in text
    assert 'deltatune_running_sequences{adapter="l3"} 0.0' in text
    assert "deltatune_waiting_sequences" in text
    assert httpx.get(f"{server.url}/metrics").json()["requests_total"] > 0  # JSON stays the default
