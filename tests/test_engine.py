"""The continuous batching engine (vlm/engine.py): every request gets exactly the tokens it
gets alone, rows join and leave a running batch, cancellation, queue limits, shutdown."""

import copy
import os
import threading
import time

import pytest
import torch
from conftest import shape_image

from vlm.engine import Engine, EngineClosed, EngineConfig, QueueFull
from vlm.generate import GenerationConfig, generate
from vlm.session import Session

# Different lengths, 0 to 3 images, text before and after images.
PROMPTS = [
    ("<image>a red", ["red"]),
    ("the cat <image>sits on <image>the", ["blue", "green"]),
    ("what is the capital of france", []),
    ("<image><image><image>three shapes: ", ["red", "cyan", "yellow"]),
    ("a", []),
    ("<image>what", ["magenta"]),
    ("question: is there a circle? answer: yes. no. maybe. the cat sits on", []),
    ("an emoji of <image> a smiling", ["orange"]),
]
REASONS = {"stop_token": "stop", "stop_string": "stop", "length": "length"}


def _inputs(processor, k):
    text, colours = PROMPTS[k]
    batch = processor([text], [[shape_image(c, "square" if i % 2 else "circle") for i, c in enumerate(colours)]])
    return batch["input_ids"], batch["pixel_values"]


def _configs(model, processor):
    """Greedy with and without stop tokens, seeded sampling, a stop string: one per prompt."""
    configs = []
    for k in range(len(PROMPTS)):
        cfg = GenerationConfig(max_new_tokens=6 + 3 * k, stop_token_ids=() if k % 2 == 0 else None)
        if k in (3, 6):
            cfg = GenerationConfig(max_new_tokens=20, do_sample=True, temperature=1.5, top_p=0.9, seed=k)
        configs.append(cfg)
    # A stop string from the middle of prompt 2's own answer.
    ids, images = _inputs(processor, 2)
    text = generate(model, images, ids, config=configs[2], tokenizer=processor.tokenizer).texts[0]
    configs[2].stop_strings = (text[len(text) // 2 : len(text) // 2 + 2],)
    return configs


def _alone(model, processor, configs):
    """What greedy/seeded generation gives each request of ``configs`` alone."""
    out = []
    for k, cfg in enumerate(configs):
        ids, images = _inputs(processor, k)
        out.append(generate(model, images, ids, config=cfg, tokenizer=processor.tokenizer))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox", "qwen2"])
def test_staggered_requests_get_exactly_their_tokens_alone(trained_model, family, monkeypatch):
    model, processor = trained_model(family)
    tok = processor.tokenizer
    configs = _configs(model, processor)
    alone = _alone(model, processor, configs)
    assert alone[2].finish_reasons == ["stop_string"]
    calls = _feeds(monkeypatch)
    # Four rows at most: later requests wait, then join a batch that is mid-decode.
    engine = Engine(model, tok, EngineConfig(max_concurrent=4, max_queued=8))
    requests, streams, texts = [], [], []
    with engine:
        for k, cfg in enumerate(configs):
            ids, images = _inputs(processor, k)
            requests.append(engine.submit(ids, images, cfg))
            streams.append(requests[-1].outputs(timeout=60))
            # Staggered: the next request arrives once this one has its first token (and,
            # for every other one, a decode step in the batch).
            got = [next(streams[-1])]
            if k % 2 == 0 and not got[-1].finished:
                got.append(next(streams[-1]))
            texts.append([out.text for out in got])
        for events, pieces in zip(streams, texts):
            pieces += [out.text for out in events]
    for k, (request, reference) in enumerate(zip(requests, alone)):
        assert request.tokens == reference.tokens[0], f"request {k}"
        assert request.text == reference.texts[0], f"request {k}"
        assert request.finish_reason == REASONS[reference.finish_reasons[0]], f"request {k}"
        assert "".join(texts[k]) == request.text  # the events add up to the answer
    # They really shared steps: fewer batched steps than rows decoded, text-only requests
    # and image requests in the same steps.
    assert engine.decode_steps < sum(r.decode_steps for r in requests)
    assert any(mixed for _, new, mixed in calls if new == 1)
    assert sum(engine.stats()["finished"].values()) == 8


def test_a_shared_system_prompt_runs_once_and_answers_stay_exact(trained_model, monkeypatch):
    model, processor = trained_model("llama")  # ChatML
    processor = copy.copy(processor)
    processor.system_prompt = "You are a careful assistant. Answer about the shapes, their colours and places."
    questions = [("what colour?", ["red"]), ("hello there", []), ("and this one?", ["blue", "green"])]
    questions += [("how many shapes", []), ("where is it", ["cyan"]), ("is it round", ["red"])]
    inputs = []
    for question, colours in questions:
        batch = processor(
            [processor.chat_segments([(question, None)], num_images=len(colours))], [[shape_image(c) for c in colours]]
        )
        inputs.append((batch["input_ids"], batch["pixel_values"]))
    cfg = GenerationConfig(max_new_tokens=10, stop_token_ids=())
    alone = [generate(model, images, ids, config=cfg).tokens[0] for ids, images in inputs]
    fed = []
    feed = Session.feed

    def counted(self, input_ids, *args, **kwargs):
        fed.append(input_ids.shape[1])
        return feed(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(Session, "feed", counted)
    with Engine(model, processor.tokenizer, EngineConfig(max_concurrent=3)) as engine:
        requests = []
        for ids, images in inputs:
            requests.append(engine.submit(ids, images, cfg))
            next(requests[-1].outputs(timeout=60))
        for request in requests:
            assert request.wait(60)
    assert [r.tokens for r in requests] == alone
    prompts = sorted(ids.shape[1] for ids, _ in inputs)
    prefills = sorted(n for n in fed if n > 1)
    assert sum(prefills) < sum(prompts) - 3 * 16  # most requests ran only what follows the shared part


def test_sessions_of_different_lengths_and_images_decode_as_one_batch(trained_model):
    model, processor = trained_model("llama")
    with torch.inference_mode():
        sessions, alone = [], []
        for k in (0, 1, 3, 5):  # 1, 2, 3 and 1 images; lengths 4 to 9
            ids, images = _inputs(processor, k)
            a, b = Session(model, images), Session(model, images)
            a.feed(ids), b.feed(ids)
            sessions.append(a)
            alone.append(b.feed(torch.tensor([[7]])))  # (1, V)
        batch = Session.concat(sessions)
        assert batch.latents.shape[1] == 3 and batch.attention_mask.min() == 0
        together = batch.feed(torch.tensor([[7]] * 4))
        torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)
        # Rows leave; padding that only they needed goes.
        longest = max(range(4), key=lambda i: sessions[i].length)
        keep = torch.tensor([i for i in range(4) if i != longest])
        batch.keep(keep)
        assert batch.trim_padding() > 0 and bool(batch.attention_mask[:, 0].any())
        again = batch.feed(torch.tensor([[9]] * 3))
        for row, i in enumerate(keep.tolist()):
            ids, images = _inputs(processor, [0, 1, 3, 5][i])
            expected = Session(model, images).feed(torch.cat([ids, torch.tensor([[7, 9]])], dim=1))
            torch.testing.assert_close(again[row : row + 1], expected, rtol=1e-5, atol=1e-5)


def test_sessions_with_and_without_images_decode_as_one_batch(trained_model):
    model, processor = trained_model("llama")
    with torch.inference_mode():
        sessions, alone = [], []
        for k in (2, 1, 4, 0):  # no image, 2 images, no image, 1 image
            ids, images = _inputs(processor, k)
            a, b = Session(model, images), Session(model, images)
            a.feed(ids), b.feed(ids)
            sessions.append(a)
            alone.append(b.feed(torch.tensor([[7]])))  # (1, V)
        batch = Session.concat(sessions)
        assert batch.latents.shape[:2] == (4, 2)
        assert not bool(batch.latents[0].any()) and not bool(batch.latents[2].any())  # zero images
        together = batch.feed(torch.tensor([[7]] * 4))
        torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)
        # The rows with images leave: the image slots go, and the cross-attention blocks stop running.
        batch.keep(torch.tensor([0, 2, 3]))
        batch.trim_padding()
        assert batch.latents.shape[1] == 1  # the 2-image row has gone
        batch.keep(torch.tensor([0, 1]))
        batch.trim_padding()
        assert batch.latents is None and batch.media_kv == {}
        again = batch.feed(torch.tensor([[9]] * 2))
        for row, k in enumerate((2, 4)):
            ids, _ = _inputs(processor, k)
            expected = Session(model, None).feed(torch.cat([ids, torch.tensor([[7, 9]])], dim=1))
            torch.testing.assert_close(again[row : row + 1], expected, rtol=1e-5, atol=1e-5)
        # A prefix copied from a text-only row of a mixed batch is text-only.
        mixed = Session.concat(sessions[:2])
        assert mixed.prefix_copy(2, row=0).latents is None
        assert mixed.prefix_copy(2, row=1).latents.shape[1] == 2


def _feeds(monkeypatch):
    """Records each Session.feed: (rows, new tokens, whether a row without images shared
    the call with rows that have them)."""
    calls = []
    feed = Session.feed

    def spy(self, input_ids, *args, **kwargs):
        mixed = False
        if self.latents is not None:
            ids = input_ids if self.ids is None else torch.cat([self.ids, input_ids], dim=1)
            mixed = bool((~(ids == self.model.image_token_id).any(1)).any())
        calls.append((input_ids.shape[0], input_ids.shape[1], mixed))
        return feed(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(Session, "feed", spy)
    return calls


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox", "qwen2"])
def test_requests_admitted_together_are_prefilled_as_one_batch_and_stay_exact(trained_model, family, monkeypatch):
    model, processor = trained_model(family)
    tok = processor.tokenizer
    configs = _configs(model, processor)
    alone = [out.tokens[0] for out in _alone(model, processor, configs)]
    calls = _feeds(monkeypatch)
    engine = Engine(model, tok, EngineConfig(max_concurrent=8))
    requests = []
    for k, cfg in enumerate(configs):  # all waiting before the engine starts: admitted at one step
        ids, images = _inputs(processor, k)
        requests.append(engine.submit(ids, images, cfg))
    with engine:
        for request in requests:
            assert request.wait(60)
    for k, (request, reference) in enumerate(zip(requests, alone)):
        assert request.tokens == reference, f"request {k}"
    prefills = [c for c in calls if c[1] > 1]
    assert [c[0] for c in prefills] == [8]  # one prefill call for all eight prompts
    decodes = [c for c in calls if c[1] == 1]
    assert len(decodes) == engine.decode_steps
    assert any(mixed for _, _, mixed in decodes)  # text-only and image rows in one step
    # One batch: as many steps as the longest request needed, not one per kind.
    assert engine.decode_steps == max(r.decode_steps for r in requests)


@pytest.mark.parametrize(
    "encode_batch, calls",
    [
        (None, [(1, 1), (1, 1), (1, 1), (1, 2), (1, 3)]),
        (2, [(2, 1), (1, 1), (1, 2), (1, 3)]),
        (8, [(3, 1), (1, 2), (1, 3)]),
    ],
)
def test_images_admitted_together_are_encoded_encode_batch_requests_a_call(
    trained_model, monkeypatch, encode_batch, calls
):
    model, processor = trained_model("llama")
    configs = _configs(model, processor)
    alone = [out.tokens[0] for out in _alone(model, processor, configs)]
    encoded = []
    encode = type(model).encode_images
    monkeypatch.setattr(type(model), "encode_images", lambda self, px: encoded.append(px.shape[:2]) or encode(self, px))
    engine = Engine(model, processor.tokenizer, EngineConfig(max_concurrent=8, encode_batch=encode_batch))
    requests = [engine.submit(*_inputs(processor, k), cfg) for k, cfg in enumerate(configs)]
    with engine:
        for request in requests:
            assert request.wait(60)
    assert [request.tokens for request in requests] == alone
    # (requests, images each) per call. Requests 0, 5 and 7 hold one image each, 1 two and 3
    # three: grouped by image count, then encode_batch requests a call (None on a CPU: one).
    assert [tuple(shape) for shape in encoded] == calls


def test_a_group_prefill_reuses_a_cached_system_prompt_and_stays_exact(trained_model, monkeypatch):
    model, processor = trained_model("llama")  # ChatML
    processor = copy.copy(processor)
    processor.system_prompt = "You are a careful assistant. Answer about the shapes, their colours and places."
    questions = [("what colour?", ["red"]), ("and this one?", ["blue", "green"]), ("where is it", ["cyan"])]
    questions += [("is it round", ["red"]), ("hello there", []), ("how many shapes", [])]
    inputs = []
    for question, colours in questions:
        batch = processor(
            [processor.chat_segments([(question, None)], num_images=len(colours))], [[shape_image(c) for c in colours]]
        )
        inputs.append((batch["input_ids"], batch["pixel_values"]))
    cfg = GenerationConfig(max_new_tokens=6, stop_token_ids=())
    alone = [generate(model, images, ids, config=cfg).tokens[0] for ids, images in inputs]
    calls = _feeds(monkeypatch)
    # Static batches of 3 wait until full: the first one caches the system prompt of each
    # kind (with and without images), the second group is prefilled from it.
    config = EngineConfig(max_concurrent=3, policy="static", batch_window_s=30)
    with Engine(model, processor.tokenizer, config) as engine:
        first = [engine.submit(ids, images, cfg) for ids, images in (inputs[0], inputs[4], inputs[1])]
        assert all(r.wait(60) for r in first)
        second = [engine.submit(ids, images, cfg) for ids, images in (inputs[2], inputs[5], inputs[3])]
        assert all(r.wait(60) for r in second)
    got = {0: first[0], 4: first[1], 1: first[2], 2: second[0], 5: second[1], 3: second[2]}
    assert [got[k].tokens for k in range(6)] == alone
    prefills = [c for c in calls if c[1] > 1]
    assert [c[0] for c in prefills] == [3, 3]
    longest = max(ids.shape[1] for ids, _ in inputs)
    assert prefills[1][1] < longest - 16  # the second group ran only what follows the shared part


def _long(max_new_tokens=200):
    return GenerationConfig(max_new_tokens=max_new_tokens, stop_token_ids=())


def test_a_cancelled_request_stops_using_decode_steps(trained_model):
    model, processor = trained_model("llama")
    ids, images = _inputs(processor, 0)
    with Engine(model, processor.tokenizer) as engine:
        request = engine.submit(ids, images, _long())
        events = request.outputs(timeout=60)
        for _ in range(3):
            next(events)
        request.cancel()
        assert request.wait(30)
        assert request.finish_reason == "cancelled"
        assert request.decode_steps < 50 and len(request.tokens) < 50
        steps = engine.decode_steps
        time.sleep(0.2)
        assert engine.decode_steps == steps  # nothing runs for it any more
        assert engine.stats()["running"] == 0
        # A request cancelled while it waits never runs.
        waiting = Engine(model, processor.tokenizer).submit(ids, images, _long())
        waiting.cancel()


def test_a_full_queue_refuses_with_a_retry_estimate(trained_model):
    model, processor = trained_model("llama")
    ids, images = _inputs(processor, 0)
    engine = Engine(model, processor.tokenizer, EngineConfig(max_concurrent=1, max_queued=1))
    first = engine.submit(ids, images, _long(5))
    second = engine.submit(ids, images, _long(5))
    with pytest.raises(QueueFull) as full:
        engine.submit(ids, images, _long(5))
    assert full.value.retry_after >= 1
    with engine:  # starting it serves the two that were taken
        assert first.wait(60) and second.wait(60)
    assert first.finish_reason == second.finish_reason == "length"


def test_a_request_past_its_deadline_ends_with_timeout(trained_model):
    model, processor = trained_model("llama")
    ids, images = _inputs(processor, 0)
    with Engine(model, processor.tokenizer) as engine:
        request = engine.submit(ids, images, _long(), timeout_s=0.01)
        assert request.wait(60)
    assert request.finish_reason == "timeout" and len(request.tokens) < 200


def test_shutdown_ends_in_flight_work_and_joins_its_thread(trained_model):
    model, processor = trained_model("llama")
    ids, images = _inputs(processor, 1)
    engine = Engine(model, processor.tokenizer, EngineConfig(max_concurrent=2)).start()
    requests = [engine.submit(ids, images, _long()) for _ in range(4)]  # 2 running, 2 waiting
    next(requests[0].outputs(timeout=60))
    engine.shutdown()
    assert all(r.done for r in requests)
    assert {r.finish_reason for r in requests} == {"shutdown"}
    assert not engine.running
    assert not [t for t in threading.enumerate() if t.name == "vlm-engine"]
    with pytest.raises(EngineClosed):
        engine.submit(ids, images, _long())
    # With time to drain, requests in flight finish normally.
    engine = Engine(model, processor.tokenizer, EngineConfig(max_concurrent=2)).start()
    requests = [engine.submit(ids, images, _long(8)) for _ in range(3)]
    engine.shutdown(drain_s=60)
    assert [r.finish_reason for r in requests] == ["length"] * 3


def test_requests_the_engine_cannot_serve_are_refused(trained_model):
    model, processor = trained_model("llama")
    ids, images = _inputs(processor, 1)
    engine = Engine(model, processor.tokenizer)
    with pytest.raises(ValueError, match=r"num_beams must be 1 \(got 2\)"):
        engine.submit(ids, images, GenerationConfig(num_beams=2))
    with pytest.raises(ValueError, match="2 image markers but 1 images"):
        engine.submit(ids, images[:, :1])
    with pytest.raises(ValueError, match="context"):
        engine.submit(torch.ones(1, 300, dtype=torch.long))
    engine.shutdown()


def test_a_repetition_penalty_gives_its_tokens_alone_in_a_batch(trained_model):
    model, processor = trained_model("llama")
    configs = [
        GenerationConfig(max_new_tokens=12, stop_token_ids=(), repetition_penalty=1.5),
        GenerationConfig(max_new_tokens=12, stop_token_ids=()),
        GenerationConfig(max_new_tokens=12, stop_token_ids=(), repetition_penalty=0.7, do_sample=True, seed=3),
    ]
    inputs = [_inputs(processor, k) for k in (1, 2, 6)]
    alone = [generate(model, images, ids, config=cfg).tokens[0] for (ids, images), cfg in zip(inputs, configs)]
    assert alone[0] != generate(model, inputs[0][1], inputs[0][0], config=configs[1]).tokens[0]  # it matters
    engine = Engine(model, processor.tokenizer)
    requests = [engine.submit(ids, images, cfg) for (ids, images), cfg in zip(inputs, configs)]
    with engine:
        assert all(r.wait(60) for r in requests)
    assert [r.tokens for r in requests] == alone


@pytest.mark.skipif(
    not os.path.isdir("/proc/self/task") or "parallel backend: OpenMP" not in torch.__config__.parallel_info(),
    reason="counts threads through Linux's /proc with torch on OpenMP",
)
def test_a_thread_lets_its_openmp_workers_go():
    """A thread that ran parallel work holds OpenMP workers until it lets them go; the
    engine relies on this to keep one team of workers per process (see the function)."""
    from vlm.engine import release_openmp_threads

    seen = {}

    def tasks() -> set[str]:
        return set(os.listdir("/proc/self/task"))

    def work():
        x = torch.randn(600, 600)
        before = tasks()
        x @ x  # a parallel region: this thread gets its workers
        seen["workers"] = tasks() - before
        seen["released"] = release_openmp_threads()
        seen["left"] = seen["workers"] & tasks()
        x @ x  # parallel work still runs, on new workers
        seen["new workers"] = tasks() - before - seen["workers"]
        release_openmp_threads()

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        t = threading.Thread(target=work)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(threads)
    assert len(seen["workers"]) == 1  # two threads: this one and one worker
    assert seen["released"] is True
    assert seen["left"] == set()
    assert len(seen["new workers"]) == 1


def test_conversations_continue_on_the_engine_as_they_would_alone(trained_model, monkeypatch):
    """Chats on the engine (two at once, in two threads) answer every turn as a chat
    without it does; each conversation's images are encoded once, and a later turn runs
    only what its kept session does not hold."""
    import vlm.engine
    from vlm.chat import Chat

    model, processor = trained_model("llama")  # ChatML
    images = {"one": [shape_image("red")], "two": [shape_image("blue", "square"), shape_image("green")]}
    greedy = GenerationConfig(max_new_tokens=6)
    sampled = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.3, seed=3)
    turns = [("what colour?", greedy), ("and the shape?", sampled), ("is it big?", greedy), ("where?", greedy)]
    turns.append(("which is larger?", GenerationConfig(max_new_tokens=5, num_beams=2)))  # beams: not on the engine

    def converse(name, engine=None):
        chat = Chat(model, processor, images[name], engine=engine)
        answers = []
        for k, (question, cfg) in enumerate(turns):
            if k == 3:
                chat.turns.clear()  # a question on its own (the demo's default): the image stays
            streamed = k in (0, 2)  # beams (the last turn) answer whole
            answers.append("".join(chat.ask_stream(question, cfg)).strip() if streamed else chat.ask(question, cfg))
        return answers

    alone = {name: converse(name) for name in images}
    encoded, starts = [], []
    encode, continued = type(model).encode_images, vlm.engine._continued
    monkeypatch.setattr(type(model), "encode_images", lambda self, px: encoded.append(px.shape) or encode(self, px))

    def counted(earlier, ids):
        session, start = continued(earlier, ids)
        starts.append((start, ids.shape[1]))
        return session, start

    monkeypatch.setattr(vlm.engine, "_continued", counted)
    results = {}
    with Engine(model, processor.tokenizer, EngineConfig(max_concurrent=4)) as engine:
        threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, converse(n, engine))) for n in images]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert results == alone
    assert sorted(shape[1] for shape in encoded) == [1, 2]  # once per conversation, not per turn
    # Turns 1 to 3 of both conversations were continued (turn 4's beams ran off the engine):
    # each started from its kept session, and turn 2 from all of turn 1's prompt.
    assert len(starts) == 2 * 3 and all(start > 0 for start, _ in starts)
    prompts = {length for _, length in starts}
    assert sum(start in prompts for start, _ in starts) >= 2


def test_a_continued_session_must_match_the_prompt(trained_model):
    model, processor = trained_model("llama")
    batch = processor([processor.chat_segments([("what colour?", None)])], [[shape_image("red")]])
    cfg = GenerationConfig(max_new_tokens=2)
    with Engine(model, processor.tokenizer) as engine:
        first = engine.submit(batch["input_ids"], batch["pixel_values"], cfg, keep_session=True)
        assert first.wait(60) and first.session is not None and first.session.length == first.prompt_tokens
        with pytest.raises(ValueError, match="already holds its images"):
            engine.submit(batch["input_ids"], batch["pixel_values"], cfg, session=first.session)
        text_only = processor([processor.chat_segments([("hello", None)], num_images=0)], [[]])["input_ids"]
        with pytest.raises(ValueError, match="0 image markers but the session holds 1 images"):
            engine.submit(text_only, None, cfg, session=first.session)
