"""The official `openai` client against a live server on 127.0.0.1 (tiny model)."""

from __future__ import annotations

import json
import re

import pytest

openai = pytest.importorskip("openai")

from conftest import live_pages_match, start_server  # noqa: E402

from dendrite.server.config import ServerConfig  # noqa: E402

KEY = "sk-test-1"


@pytest.fixture(scope="module")
def srv(tiny_model):
    s = start_server(tiny_model, ServerConfig(api_keys=(KEY,), model_name="tiny"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_completion_greedy_is_deterministic_and_reports_usage(client):
    a = client.completions.create(model="tiny", prompt="The cat", max_tokens=6, temperature=0)
    b = client.completions.create(model="tiny", prompt="The cat", max_tokens=6, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].finish_reason == "length"
    assert a.usage.completion_tokens == 6 and a.usage.prompt_tokens > 0
    assert a.usage.total_tokens == a.usage.prompt_tokens + 6


def test_streamed_completion_equals_whole_one(client):
    kw = dict(model="tiny", prompt="Once upon", max_tokens=12, temperature=0.9, seed=7)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_choices_equal_separate_requests_with_derived_seeds(client):
    kw = dict(model="tiny", prompt="A tree", max_tokens=8, temperature=1.0)
    many = client.completions.create(n=4, seed=100, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    singles = [client.completions.create(seed=100 + i, **kw).choices[0].text for i in range(4)]
    assert [c.text for c in many.choices] == singles
    assert len(set(singles)) > 1  # the seeds differ, so do the samples


def test_chat_completion_uses_the_chat_template_and_streams(client, srv):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, seed=3,
                                       temperature=0.7)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    prompt = srv.engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    n_prompt = len(srv.engine.tokenizer.encode(prompt, add_special_tokens=False))
    assert r.usage.prompt_tokens == n_prompt
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6,
                                                 seed=3, temperature=0.7, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_logprobs_are_the_engines(client, srv):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0,
                                  logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 5 and all(x <= 0 for x in lp.token_logprobs)
    assert len(lp.tokens) == 5 and lp.text_offset[0] == 0
    # the same logprobs as the engine run directly
    from dendrite.sampling import SamplingParams

    def direct(engine):
        seq = engine.new_sequence("Hello")
        try:
            return engine.generate(seq, SamplingParams(temperature=0, max_tokens=5))[0].logprobs
        finally:
            seq.release()

    assert lp.token_logprobs == pytest.approx(srv.on_engine(direct), abs=1e-5)
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=4, temperature=0, logprobs=True)
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(t.logprob <= 0 for t in content)


def test_stop_string_cuts_the_text(client):
    base = client.completions.create(model="tiny", prompt="Hello", max_tokens=12,
                                     temperature=0).choices[0].text
    stop = base[3:5]
    assert stop and stop not in base[:4]  # a stop string that first occurs at offset 3
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0,
                                  stop=[stop])
    assert r.choices[0].text == base[:base.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Hello", max_tokens=12, temperature=0, stop=[stop], stream=True))
    assert streamed == r.choices[0].text


def test_response_format_json_schema_and_regex_extension(client):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}},
              "required": ["a"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "json"}], max_tokens=40, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        extra_body={"ignore_eos": True})
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        assert set(json.loads(text)) == {"a"}
    else:  # cut by max_tokens: still a prefix the grammar allowed
        assert text.lstrip().startswith("{")
    r = client.completions.create(model="tiny", prompt="Code:", max_tokens=10, seed=2,
                                  extra_body={"regex": "[0-9]{3}-[a-z]{2}"})
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", r.choices[0].text)
    assert r.choices[0].finish_reason == "stop"


def test_wrong_key_and_unknown_model_are_refused(srv, client):
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError, match="model"):
        client.completions.create(model="gpt-9", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=10**6)


def test_no_pages_leak_after_the_requests(srv, client):
    client.completions.create(model="tiny", prompt="end", max_tokens=3, n=3, seed=0)
    used, live = live_pages_match(srv)
    assert used == live == 0


def _engine_run(srv, prompt: str, n_top: int, max_tokens: int, add_bos: bool = True):
    """The same greedy request run on the engine directly: (ids, logprobs, top_logprobs)."""
    from dendrite.sampling import SamplingParams

    def direct(engine):
        seq = engine.new_sequence(prompt, add_bos=add_bos)
        try:
            [r] = engine.generate(seq, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                      logprobs=n_top))
            return r.token_ids, r.logprobs, r.top_logprobs
        finally:
            seq.release()

    return srv.on_engine(direct)


def _text(srv, t: int) -> str:
    return srv.engine.tokenizer.decode([t], skip_special_tokens=False)


def test_completion_top_logprobs_are_the_engines(client, srv):
    ids, lps, tops = _engine_run(srv, "Hello", 3, 5)
    want = []
    for t, lp, top in zip(ids, lps, tops):
        d = {_text(srv, a): x for a, x in top}
        d.setdefault(_text(srv, t), lp)
        want.append(d)
    kw = dict(model="tiny", prompt="Hello", max_tokens=5, temperature=0, logprobs=3)
    got = client.completions.create(**kw).choices[0].logprobs
    assert len(got.top_logprobs) == 5
    for g, w in zip(got.top_logprobs, want):
        assert list(g) == list(w)  # best first, the chosen token last when not among them
        assert list(g.values()) == pytest.approx(list(w.values()), abs=1e-5)
    # streaming gives the same, token by token
    streamed = [d for c in client.completions.create(stream=True, **kw)
                if c.choices and c.choices[0].logprobs
                for d in c.choices[0].logprobs.top_logprobs]
    assert [list(d) for d in streamed] == [list(w) for w in want]


def test_chat_top_logprobs_are_the_engines(client, srv):
    msgs = [{"role": "user", "content": "Tell me"}]
    prompt = srv.engine.tokenizer.apply_chat_template(msgs)
    ids, lps, tops = _engine_run(srv, prompt, 4, 4, add_bos=False)
    kw = dict(model="tiny", messages=msgs, max_tokens=4, temperature=0, logprobs=True,
              top_logprobs=4)
    content = client.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [t for c in client.chat.completions.create(stream=True, **kw)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    gtok = srv.on_engine(lambda e: e.grammar_tokenizer.ll)
    for got in (content, streamed):
        assert len(got) == 4
        for g, t, lp, top in zip(got, ids, lps, tops):
            assert g.token == _text(srv, t) and g.logprob == pytest.approx(lp, abs=1e-5)
            assert g.bytes == list(gtok.decode_bytes([t]))
            assert [a.token for a in g.top_logprobs] == [_text(srv, a) for a, _ in top]
            assert [a.logprob for a in g.top_logprobs] == pytest.approx([x for _, x in top],
                                                                        abs=1e-5)
            assert g.top_logprobs[0].logprob >= g.top_logprobs[-1].logprob
    # logprobs without top_logprobs: empty alternatives; top_logprobs alone is refused
    plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2,
                                           temperature=0, logprobs=True)
    assert all(t.top_logprobs == [] for t in plain.choices[0].logprobs.content)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2,
                                       top_logprobs=2)
