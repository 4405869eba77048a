"""Generation: caches equal full recomputation, batching, beams, sampling, streaming, threads."""

import threading

import pytest
import torch
from conftest import shape_image
from torch import nn

from vlm.chat import Chat
from vlm.generate import GenerationConfig, Session, generate, process_logits, stream
from vlm.quantize import quantize_lm_int8

PROMPTS = ["<image>a red", "the cat <image>sits on <image>the", "<image>what"]


def _images():
    return [[shape_image("red")], [shape_image("blue"), shape_image("green", "square")], [shape_image("cyan")]]


NO_STOP = GenerationConfig(max_new_tokens=12, stop_token_ids=())


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "opt", "gpt_neox"])
def test_cached_greedy_equals_full_recomputation(trained_model, family):
    model, processor = trained_model(family)
    for prompt, images in zip(PROMPTS, _images()):
        batch = processor([prompt], [images])
        reference = model.greedy_generate(batch["pixel_values"], batch["input_ids"], 12)[0].tolist()
        cached = generate(model, batch["pixel_values"], batch["input_ids"], config=NO_STOP).tokens[0]
        media_recomputed = Session(model, batch["pixel_values"], cache_media_kv=False)
        assert cached == reference
        # The two benchmark baselines decode the same tokens too.
        for session in (media_recomputed, Session(model, batch["pixel_values"], use_cache=False)):
            logits = session.feed(batch["input_ids"])
            assert logits.argmax(-1).item() == reference[0]


def test_a_cache_the_lm_does_not_fill_is_an_error(trained_model):
    # What transformers 5.17 did with our cache argument (it was named past_key_values
    # there): it went to **kwargs unread, and cached generation was silently wrong.
    model, processor = trained_model("llama")
    model._cache_kwarg = "unread_cache"
    batch = processor([PROMPTS[0]], [_images()[0]])
    with pytest.raises(RuntimeError, match="did not fill the cache"):
        generate(model, batch["pixel_values"], batch["input_ids"], config=NO_STOP)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_equals_one_by_one_with_left_padding(trained_model, family):
    model, processor = trained_model(family)
    alone = []
    for prompt, images in zip(PROMPTS, _images()):
        batch = processor([prompt], [images])
        alone.append(generate(model, batch["pixel_values"], batch["input_ids"], config=NO_STOP).tokens[0])
    batch = processor(PROMPTS, _images(), padding_side="left")
    assert batch["attention_mask"].min() == 0  # the prompts really have different lengths
    together = generate(model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"], config=NO_STOP)
    assert together.tokens == alone


def test_one_beam_equals_greedy_and_beam_scores_are_consistent(trained_model):
    model, processor = trained_model("llama")
    batch = processor(PROMPTS, _images(), padding_side="left")
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    greedy = generate(model, *args, config=NO_STOP).tokens
    assert generate(model, *args, config=NO_STOP, num_beams=1).tokens == greedy
    beams = generate(model, *args, config=NO_STOP, num_beams=3, length_penalty=0.0)
    assert beams.finish_reasons == ["length"] * 3
    # The reported score is the sequence's log-probability under teacher forcing: this
    # holds only if the LM cache was reordered with the beams at every step.
    for b, tokens in enumerate(beams.tokens):
        one = processor([PROMPTS[b]], [_images()[b]])
        ids = torch.cat([one["input_ids"], torch.tensor([tokens])], dim=1)
        with torch.no_grad():
            logp = model(one["pixel_values"], ids).logits[0].float().log_softmax(-1)
        start = one["input_ids"].shape[1]
        total = sum(logp[start - 1 + i, t].item() for i, t in enumerate(tokens))
        assert beams.scores[b] == pytest.approx(total, abs=1e-3)


def test_sampling_is_repeatable_with_a_seed(trained_model):
    model, processor = trained_model("llama")
    batch = processor([PROMPTS[0]], [_images()[0]])
    args = (batch["pixel_values"], batch["input_ids"])
    cfg = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, stop_token_ids=())
    a = generate(model, *args, config=cfg, seed=7).tokens
    b = generate(model, *args, config=cfg, seed=7).tokens
    others = [generate(model, *args, config=cfg, seed=s).tokens for s in range(3)]
    assert a == b
    assert any(o != a for o in others)
    # top_k=1 sampling is greedy.
    greedy = generate(model, *args, config=NO_STOP).tokens
    assert generate(model, *args, config=NO_STOP, do_sample=True, top_k=1, seed=3).tokens == greedy


def test_logit_processing_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    seen = torch.tensor([[0, 1]])
    out = process_logits(logits, seen, GenerationConfig(repetition_penalty=2.0))
    assert out.tolist() == [[1.0, -2.0, 0.5, 0.0]]
    cfg = GenerationConfig(do_sample=True, top_k=2)
    assert torch.isinf(process_logits(logits, None, cfg)).tolist() == [[False, True, False, True]]
    # probabilities ~ [0.71, 0.04, 0.16, 0.10]: 0.7 is reached by the first token alone,
    # 0.8 needs the two most likely.
    cfg = GenerationConfig(do_sample=True, top_p=0.7)
    assert torch.isinf(process_logits(logits, None, cfg)).tolist() == [[False, True, True, True]]
    cfg = GenerationConfig(do_sample=True, top_p=0.8)
    assert torch.isinf(process_logits(logits, None, cfg)).tolist() == [[False, True, False, True]]


def test_stop_tokens_and_stop_strings(trained_model):
    model, processor = trained_model("llama")
    tok = processor.tokenizer
    batch = processor([PROMPTS[0]], [_images()[0]])
    args = (batch["pixel_values"], batch["input_ids"])
    full = generate(model, *args, config=NO_STOP, max_new_tokens=20, tokenizer=tok)
    text = full.texts[0]
    first = full.tokens[0][0]
    stopped = generate(model, *args, config=NO_STOP, stop_token_ids=(first,), tokenizer=tok)
    assert stopped.tokens == [[]] and stopped.finish_reasons == ["stop_token"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop and stop in text
    cut = generate(model, *args, config=NO_STOP, max_new_tokens=20, stop_strings=(stop,), tokenizer=tok)
    assert cut.texts == [text[: text.find(stop)]] and cut.finish_reasons == ["stop_string"]
    streamed = "".join(stream(model, tok, *args, config=NO_STOP, max_new_tokens=20, stop_strings=(stop,)))
    assert streamed == text[: text.find(stop)]


@pytest.mark.parametrize("seed", range(4))
def test_streaming_concatenates_to_the_full_text(trained_model, seed):
    model, processor = trained_model("llama")
    tok = processor.tokenizer
    batch = processor([PROMPTS[0]], [_images()[0]])
    # Hot sampling over a byte-level vocabulary produces partial UTF-8 sequences too.
    cfg = GenerationConfig(max_new_tokens=24, do_sample=True, temperature=3.0, seed=seed, stop_token_ids=())
    full = generate(model, batch["pixel_values"], batch["input_ids"], config=cfg, tokenizer=tok).texts[0]
    pieces = list(stream(model, tok, batch["pixel_values"], batch["input_ids"], config=cfg))
    assert "".join(pieces) == full
    assert all(not p.endswith("\ufffd") for p in pieces[:-1])


def test_streaming_never_splits_a_multibyte_character(trained_model):
    model, processor = trained_model("llama")
    tok = processor.tokenizer
    byte_tokens = tok("é€", add_special_tokens=False)["input_ids"]
    assert len(byte_tokens) > 2  # several tokens per character in this byte-level vocabulary
    # Make the model emit exactly these tokens: a huge bias on the next one in line.
    batch = processor([PROMPTS[0]], [_images()[0]])
    head = model.head.base
    original = head.forward
    steps = iter(byte_tokens + [2] * 8)

    class Forced(nn.Module):
        def forward(self, hidden):
            out = original(hidden)
            if hidden.ndim == 2:
                out = out.clone()
                out[:, next(steps)] += 1e4
            return out

    model.head.base = Forced()
    try:
        pieces = list(stream(model, tok, batch["pixel_values"], batch["input_ids"], max_new_tokens=len(byte_tokens)))
    finally:
        model.head.base = head
    assert "".join(pieces) == "é€"
    assert all("\ufffd" not in p for p in pieces)


def test_chat_reuses_its_session_and_matches_full_recomputation(trained_model):
    model, processor = trained_model("llama")  # ChatML template
    image = shape_image("red")
    chat = Chat(model, processor, [image])
    cfg = GenerationConfig(max_new_tokens=6)
    first = chat.ask("what colour?", cfg)
    latents = chat.session.latents
    length_after_first = chat.session.length
    second = chat.ask("and the shape?", cfg)
    assert chat.session.latents is latents  # encoded once per conversation
    assert chat.session.length > length_after_first
    segments = processor.chat_segments([("what colour?", first), ("and the shape?", None)])
    batch = processor([segments], [[image]])
    stops = (processor.tokenizer.eos_token_id, processor.end_of_chunk_token_id)
    reference = model.greedy_generate(batch["pixel_values"], batch["input_ids"], 6, stops)[0].tolist()
    reference = [t for t in reference if t not in stops]
    assert second == processor.tokenizer.decode(reference, skip_special_tokens=True).strip()


def test_two_sessions_in_two_threads_match_running_alone(trained_model):
    model, processor = trained_model("llama")
    questions = {"red": ["what colour?", "is it round?"], "blue": ["what shape?", "how many?"]}
    cfg = GenerationConfig(max_new_tokens=8)

    def converse(colour):
        chat = Chat(model, processor, [shape_image(colour, "square" if colour == "blue" else "circle")])
        return [chat.ask(q, cfg) for q in questions[colour]]

    alone = {c: converse(c) for c in questions}
    results = {}
    threads = [threading.Thread(target=lambda c=c: results.__setitem__(c, converse(c))) for c in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


def test_empty_question_and_bad_settings_are_rejected(trained_model):
    model, processor = trained_model("llama")
    with pytest.raises(ValueError, match="the question is empty"):
        Chat(model, processor, [shape_image("red")]).ask("   ")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        GenerationConfig(temperature=0).validate()
    with pytest.raises(ValueError, match="beam search with sampling"):
        GenerationConfig(num_beams=2, do_sample=True).validate()


def test_int8_quantised_copy_keeps_the_adapter_in_float(trained_model):
    model, processor = trained_model("llama")
    quantized = quantize_lm_int8(model)
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    lm_linears = [
        m
        for n, m in quantized.named_modules()
        if n.startswith("lm.") and ".xattn." not in n and isinstance(m, (nn.Linear, Int8Linear))
    ]
    assert lm_linears and all(isinstance(m, Int8Linear) for m in lm_linears)
    assert all(type(m) is nn.Linear for n, m in quantized.named_modules() if ".xattn.to_" in n)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("q_proj", "o_proj")))
    batch = processor([PROMPTS[0]], [_images()[0]])
    out = generate(quantized, batch["pixel_values"], batch["input_ids"], config=NO_STOP)
    assert len(out.tokens[0]) == NO_STOP.max_new_tokens


def test_int8_calibration_keeps_inaccurate_layers_in_float(trained_model):
    model, processor = trained_model("llama")
    everything = quantize_lm_int8(model, processor.tokenizer, max_error=float("inf"))
    nothing = quantize_lm_int8(model, processor.tokenizer, max_error=0.0)
    some = quantize_lm_int8(model, processor.tokenizer, max_error=0.05)
    assert len(everything.int8_layers) == len(
        [n for n, m in model.named_modules() if n.startswith("lm.") and type(m) is nn.Linear and ".xattn." not in n]
    )
    assert nothing.int8_layers == []
    assert set(some.int8_layers) <= set(everything.int8_layers)
    modules = dict(some.named_modules())
    assert all(type(modules[n]) is not nn.Linear for n in some.int8_layers)
    assert all(type(modules[n]) is nn.Linear for n in set(everything.int8_layers) - set(some.int8_layers))


def test_lookup_draft_takes_the_latest_match_and_falls_back_to_shorter_ngrams():
    from vlm.generate import lookup_draft

    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert lookup_draft(tokens, 3, 2) == [7, 8]  # the latest earlier "1 2 3", not the first
    assert lookup_draft([4, 5, 6, 5], 3, 3) == [6, 5]  # no "5 6 5" or "6 5" before: then "5"
    assert lookup_draft([1, 2, 3], 3, 4) == [] and lookup_draft([7], 3, 4) == []


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "opt", "gpt_neox"])
def test_prompt_lookup_gives_greedy_tokens_in_fewer_passes(trained_model, family, monkeypatch):
    model, processor = trained_model(family)
    passes = []
    feed = Session.feed

    def counted(self, *args, **kwargs):
        passes.append(1)
        return feed(self, *args, **kwargs)

    monkeypatch.setattr(Session, "feed", counted)
    saved = 0
    for prompt, images in zip(PROMPTS, _images()):
        batch = processor([prompt], [images])
        args = (batch["pixel_values"], batch["input_ids"])
        for max_new in (1, 40):
            passes.clear()
            greedy = generate(model, *args, config=NO_STOP, max_new_tokens=max_new, tokenizer=processor.tokenizer)
            plain = len(passes)
            for draft in (1, 10):
                passes.clear()
                fast = generate(
                    model, *args, config=NO_STOP, max_new_tokens=max_new, prompt_lookup=draft,
                    tokenizer=processor.tokenizer,
                )  # fmt: skip
                assert fast.tokens == greedy.tokens and fast.texts == greedy.texts
                assert fast.finish_reasons == greedy.finish_reasons
                assert len(passes) <= plain
                saved += plain - len(passes)
    assert saved > 0  # drafts were accepted, not only checked


def test_prompt_lookup_keeps_stops_and_refuses_what_it_cannot_match(trained_model):
    model, processor = trained_model("llama")
    tok = processor.tokenizer
    batch = processor([PROMPTS[0]], [_images()[0]])
    args = (batch["pixel_values"], batch["input_ids"])
    text = generate(model, *args, config=NO_STOP, max_new_tokens=30, tokenizer=tok).texts[0]
    for stop in (text[5:8], text[20:22]):
        plain = generate(model, *args, config=NO_STOP, max_new_tokens=30, stop_strings=(stop,), tokenizer=tok)
        fast = generate(
            model, *args, config=NO_STOP, max_new_tokens=30, stop_strings=(stop,), prompt_lookup=6, tokenizer=tok
        )
        assert (fast.tokens, fast.texts, fast.finish_reasons) == (plain.tokens, plain.texts, plain.finish_reasons)
    first_tokens = generate(model, *args, config=NO_STOP, max_new_tokens=30).tokens[0]
    stop_id = first_tokens[len(first_tokens) // 2]
    plain = generate(model, *args, config=NO_STOP, stop_token_ids=(stop_id,), max_new_tokens=30)
    fast = generate(model, *args, config=NO_STOP, stop_token_ids=(stop_id,), max_new_tokens=30, prompt_lookup=6)
    assert fast.tokens == plain.tokens and fast.finish_reasons == plain.finish_reasons == ["stop_token"]
    # A batch of several decodes as plain greedy.
    many = processor(PROMPTS, _images(), padding_side="left")
    both = [
        generate(
            model, many["pixel_values"], many["input_ids"], many["attention_mask"], config=NO_STOP, prompt_lookup=k
        )
        for k in (0, 5)
    ]
    assert both[0].tokens == both[1].tokens
    for bad in ({"do_sample": True}, {"num_beams": 2}, {"repetition_penalty": 1.2}):
        with pytest.raises(ValueError, match="prompt_lookup"):
            generate(model, *args, config=NO_STOP, prompt_lookup=4, **bad)


def test_a_session_takes_its_media_state_from_the_model(trained_model, monkeypatch):
    # One computation of which image each position follows: the model's, with its check.
    model, processor = trained_model("llama")
    batch = processor([processor.caption_prompt("a")], [[shape_image("red")]])
    calls = []
    real = type(model).media_state

    def media_state(self, latents, input_ids, last=None, kv=None):
        calls.append((input_ids.shape[1], last))
        return real(self, latents, input_ids, last=last, kv=kv)

    monkeypatch.setattr(type(model), "media_state", media_state)
    out = generate(model, batch["pixel_values"], batch["input_ids"], max_new_tokens=3, stop_token_ids=())
    length = batch["input_ids"].shape[1]
    assert calls[0] == (length, length) and calls[1] == (length + 1, 1)  # the prompt, then one new token a step
    session = out.session
    extra = torch.tensor([[model.image_token_id]])
    with pytest.raises(ValueError, match="images were given"):
        session.feed(extra)  # a second <image> with one image in the session
