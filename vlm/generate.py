"""Generation: the LM's own KV cache, media keys/values computed once, beams, streaming.

All per-request state lives in a :class:`Session` that the caller holds: the image
latents, each cross-attention layer's keys/values over them (computed once per
request, not once per step), the LM's ``DynamicCache``, and the tokens fed so far.
A chat about one image keeps its session across turns, so the image is encoded once
and a new turn only runs its new tokens. The model itself is never written to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .model import VLM
from .session import Session

__all__ = ["GenerationConfig", "GenerationResult", "Session", "generate", "stream", "process_logits"]


@dataclass
class GenerationConfig:
    """Decoding settings."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    """Keep the k most likely tokens when sampling (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set whose probability reaches top_p."""
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    """Beam scores are divided by length ** length_penalty."""
    repetition_penalty: float = 1.0
    """CTRL-style: >1 discourages tokens already in the prompt or output."""
    stop_token_ids: tuple[int, ...] | None = None
    """None: the tokenizer's EOS and ``<|endofchunk|>``."""
    stop_strings: tuple[str, ...] = ()
    prompt_lookup: int = 0
    """Greedy, batch of one: draft up to this many tokens by finding the last few tokens
    earlier in the prompt or the output and proposing what followed them there, then check
    all drafts in one forward pass (prompt-lookup decoding). The output is greedy's; pages
    that repeat their own markup need fewer passes. 0: off; larger batches decode as plain greedy."""
    prompt_lookup_ngram: int = 3
    """Longest n-gram matched for a draft (shorter ones are tried when it has no match)."""

    def validate(self) -> GenerationConfig:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.num_beams < 1 or self.repetition_penalty <= 0:
            raise ValueError("top_k must be >= 0, num_beams >= 1 and repetition_penalty > 0")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam search with sampling is not supported; choose num_beams=1 or do_sample=False")
        if self.num_beams > 1 and self.stop_strings:
            raise ValueError("stop_strings work with greedy and sampling only; beam search stops on stop tokens")
        if self.prompt_lookup < 0 or self.prompt_lookup_ngram < 1:
            raise ValueError("prompt_lookup must be >= 0 and prompt_lookup_ngram >= 1")
        if self.prompt_lookup and (self.do_sample or self.num_beams > 1 or self.repetition_penalty != 1.0):
            raise ValueError("prompt_lookup is exact for plain greedy decoding only (no sampling, beams or penalty)")
        return self

    @classmethod
    def supported(cls) -> tuple[str, ...]:
        """The option names, as :func:`generate` takes them."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **overrides: Any) -> GenerationConfig:
        """A copy with ``overrides`` set; an unknown name is an error that lists the options."""
        unknown = sorted(set(overrides) - set(self.supported()))
        if unknown:
            raise TypeError(
                f"unknown generation option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                f"supported: {', '.join(self.supported())}"
            )
        return dataclasses.replace(self, **overrides)


def _resolve(config: GenerationConfig | None, overrides: dict[str, Any]) -> GenerationConfig:
    return (config or GenerationConfig()).replace(**overrides).validate()


# ---------------------------------------------------------------------- logits


def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, cfg: GenerationConfig) -> torch.Tensor:
    """Repetition penalty, temperature, top-k and top-p, in that order. ``logits`` (B, V)."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and seen is not None:
        picked = logits.gather(1, seen)
        picked = torch.where(picked > 0, picked / cfg.repetition_penalty, picked * cfg.repetition_penalty)
        logits = logits.scatter(1, seen, picked)
    if not cfg.do_sample:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def _pick(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ---------------------------------------------------------------------- decoding


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    """New tokens per sample, without the stop token."""
    finish_reasons: list[str]
    """``"stop_token"``, ``"stop_string"`` or ``"length"`` per sample."""
    session: Session
    texts: list[str] | None = None
    scores: list[float] = field(default_factory=list)


def _stop_ids(model: VLM, tokenizer, cfg: GenerationConfig) -> set[int]:
    if cfg.stop_token_ids is not None:
        return set(cfg.stop_token_ids)
    # An answer is text, so it ends where the model starts structure: EOS, <|endofchunk|>
    # and any other special token, e.g. a chat template's <|im_start|> (a new turn the
    # model would write for the user) or <image> (which would also claim an image the
    # request does not have). Decoding drops special tokens, so text after one would
    # otherwise read as part of the answer.
    ids = {model.end_of_chunk_token_id, model.image_token_id}
    if tokenizer is not None:
        ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None:
        eos = getattr(model.lm.config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list | tuple):
        ids.update(eos)
    return ids


def _first_stop_string(text: str, stops: tuple[str, ...]) -> int:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else -1


def sample_steps(
    model: VLM,
    session: Session,
    logits: torch.Tensor,
    cfg: GenerationConfig,
    tokenizer=None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy or sampled decoding. Yields ``(tokens (B,), active (B,))`` per step, where
    ``active`` marks rows whose token belongs to the output."""
    stops = torch.tensor(sorted(_stop_ids(model, tokenizer, cfg)), device=logits.device)
    generator = None
    if cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(device=logits.device).manual_seed(cfg.seed)
    batch = logits.shape[0]
    active = torch.ones(batch, dtype=torch.bool, device=logits.device)
    for step in range(cfg.max_new_tokens):
        seen = session.ids if cfg.repetition_penalty != 1.0 else None
        tokens = _pick(process_logits(logits, seen, cfg), cfg, generator)
        is_stop = torch.isin(tokens, stops)
        yield tokens, active & ~is_stop
        active = active & ~is_stop
        if not bool(active.any()) or step == cfg.max_new_tokens - 1:
            return
        # Finished rows keep running on a pad token; their outputs are ignored.
        fed = torch.where(active, tokens, torch.zeros_like(tokens))
        logits = session.feed(fed[:, None], active[:, None].long())


def _generate_sampled(model, session, logits, cfg, tokenizer) -> GenerationResult:
    batch = logits.shape[0]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    reasons = ["length"] * batch
    done = [False] * batch
    texts: list[str] | None = [""] * batch if (cfg.stop_strings and tokenizer is not None) else None
    for step_tokens, active in sample_steps(model, session, logits, cfg, tokenizer):
        for b in range(batch):
            if done[b]:
                continue
            if not bool(active[b]):
                done[b], reasons[b] = True, "stop_token"
                continue
            tokens[b].append(int(step_tokens[b]))
            if texts is not None:
                text = tokenizer.decode(tokens[b], skip_special_tokens=True)
                cut = _first_stop_string(text, cfg.stop_strings)
                if cut >= 0:
                    texts[b], done[b], reasons[b] = text[:cut], True, "stop_string"
        if all(done):
            break
    if cfg.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    result = GenerationResult(tokens, reasons, session)
    if tokenizer is not None:
        result.texts = [
            texts[b] if reasons[b] == "stop_string" else tokenizer.decode(tokens[b], skip_special_tokens=True)
            for b in range(batch)
        ]
    return result


def lookup_draft(tokens: list[int], ngram: int, count: int) -> list[int]:
    """Up to ``count`` tokens that followed the latest earlier occurrence of the last
    ``ngram`` tokens of ``tokens`` (then of shorter n-grams); [] without a match."""
    for n in range(min(ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest first: nearby markup repeats most
            if tokens[start : start + n] == tail:
                return tokens[start + n : start + n + count]
    return []


def _generate_lookup(model, session, logits, cfg, tokenizer) -> GenerationResult:
    """Greedy decoding for a batch of one with prompt-lookup drafts (see GenerationConfig)."""
    stops = _stop_ids(model, tokenizer, cfg)
    if cfg.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    context = session.ids[0, session.attention_mask[0].bool()].tolist()
    out: list[int] = []
    reason, text = "length", None
    token = int(logits[0].argmax())  # the greedy token after context + out
    while True:
        if token in stops:
            reason = "stop_token"
            break
        out.append(token)
        if cfg.stop_strings:
            decoded = tokenizer.decode(out, skip_special_tokens=True)
            cut = _first_stop_string(decoded, cfg.stop_strings)
            if cut >= 0:
                reason, text = "stop_string", decoded[:cut]
                break
        if len(out) == cfg.max_new_tokens:
            break
        room = cfg.max_new_tokens - len(out)  # drafts accepted beyond it would be thrown away
        draft = lookup_draft(context + out, cfg.prompt_lookup_ngram, min(cfg.prompt_lookup, room - 1))
        fed = torch.tensor([[token, *draft]], device=logits.device)
        predicted = session.feed(fed, every_position=True)[0].argmax(-1).tolist()  # after each fed token
        accepted = 0
        # A draft token is greedy's own when the model, fed everything before it, picks it.
        while accepted < len(draft) and predicted[accepted] == draft[accepted] and draft[accepted] not in stops:
            out.append(draft[accepted])
            accepted += 1
            if (
                cfg.stop_strings
                and _first_stop_string(tokenizer.decode(out, skip_special_tokens=True), cfg.stop_strings) >= 0
            ):
                break
        if accepted < len(draft):
            session.rewind(session.length - (len(draft) - accepted))  # forget the rejected drafts
        if cfg.stop_strings and accepted:
            decoded = tokenizer.decode(out, skip_special_tokens=True)
            cut = _first_stop_string(decoded, cfg.stop_strings)
            if cut >= 0:
                reason, text = "stop_string", decoded[:cut]
                break
        token = predicted[accepted]
    result = GenerationResult([out], [reason], session)
    if tokenizer is not None:
        result.texts = [text if text is not None else tokenizer.decode(out, skip_special_tokens=True)]
    return result


def _generate_beams(model, session, logits, cfg, tokenizer) -> GenerationResult:
    k = cfg.num_beams
    batch, vocab = logits.shape
    stops = _stop_ids(model, tokenizer, cfg)
    prompt_length = session.length
    session.repeat_interleave(k)
    logits = logits.repeat_interleave(k, 0)  # (B*K, V)
    beam_scores = torch.zeros(batch, k, device=logits.device)
    beam_scores[:, 1:] = float("-inf")  # all beams start identical: expand from the first only
    beams: list[list[int]] = [[] for _ in range(batch * k)]
    finished: list[list[tuple[float, list[int], float]]] = [[] for _ in range(batch)]
    done = [False] * batch

    def norm(score: float, length: int) -> float:
        return score / (max(length, 1) ** cfg.length_penalty)

    for step in range(cfg.max_new_tokens):
        seen = session.ids if cfg.repetition_penalty != 1.0 else None
        logp = process_logits(logits, seen, cfg).log_softmax(-1)  # (B*K, V)
        cand = (beam_scores.view(-1, 1) + logp).view(batch, k * vocab)
        top_scores, top_idx = cand.topk(2 * k, dim=1)
        rows, next_tokens, next_scores = [], [], []
        for b in range(batch):
            chosen = 0
            for score, idx in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                beam, tok = divmod(idx, vocab)
                row = b * k + beam
                if done[b]:
                    break
                if tok in stops:
                    if len(finished[b]) < k or norm(score, step + 1) > min(f[0] for f in finished[b]):
                        finished[b].append((norm(score, step + 1), list(beams[row]), score))
                        finished[b].sort(key=lambda f: -f[0])
                        del finished[b][k:]
                    continue
                rows.append(row)
                next_tokens.append(tok)
                next_scores.append(score)
                chosen += 1
                if chosen == k:
                    break
            if done[b] or chosen < k:  # a finished sample keeps dummy beams
                pad = k - (0 if done[b] else chosen)
                rows.extend([b * k] * pad)
                next_tokens.extend([0] * pad)
                next_scores.extend([float("-inf")] * pad)
            best_running = max(next_scores[-k:])
            if len(finished[b]) == k and (
                best_running == float("-inf") or norm(best_running, step + 1) <= finished[b][-1][0]
            ):
                done[b] = True
        if all(done):
            break
        idx = torch.tensor(rows, device=logits.device)
        beams = [beams[r] + [t] for r, t in zip(rows, next_tokens)]
        beam_scores = torch.tensor(next_scores, device=logits.device).view(batch, k)
        session.select(idx)
        if step < cfg.max_new_tokens - 1:
            logits = session.feed(torch.tensor(next_tokens, device=logits.device)[:, None])
    tokens, reasons, scores = [], [], []
    for b in range(batch):
        pool = list(finished[b])
        reason = {id(f): "stop_token" for f in pool}
        if not done[b]:
            for j in range(k):
                s = float(beam_scores[b, j])
                if s != float("-inf"):
                    entry = (norm(s, len(beams[b * k + j])), beams[b * k + j], s)
                    pool.append(entry)
                    reason[id(entry)] = "length"
        best = max(pool, key=lambda f: f[0])
        tokens.append(best[1])
        reasons.append(reason[id(best)])
        scores.append(best[0])
    # Back to one row per sample, holding its prompt: the chosen beam may have finished
    # steps ago and its cache rows are gone, while every beam shares the prompt. A chat's
    # next turn then feeds the chosen answer along with its new question.
    session.rewind(prompt_length)
    session.keep(torch.arange(batch, device=logits.device) * k)
    result = GenerationResult(tokens, reasons, session, scores=scores)
    if tokenizer is not None:
        result.texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return result


@torch.inference_mode()
def generate(
    model: VLM,
    images: torch.Tensor | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    session: Session | None = None,
    tokenizer=None,
    cache_media_kv: bool = True,
    use_cache: bool = True,
    **overrides,
) -> GenerationResult:
    """Generate for a batch (left-padded ``input_ids`` (B, S), ``images`` (B, T, C, H, W)).

    Pass a ``session`` from an earlier call (batch of one) to continue a conversation:
    its images are not encoded again and only tokens beyond the common prefix run.
    Keyword overrides set fields of ``config`` (e.g. ``max_new_tokens=8``);
    ``cache_media_kv``/``use_cache`` select the baselines described on :class:`Session`.
    """
    cfg = _resolve(config, overrides)
    if session is None:
        session = Session(model, images, cache_media_kv=cache_media_kv, use_cache=use_cache)
    elif images is not None:
        raise ValueError("a continuing session already holds its images; pass images=None")
    logits = session.feed(input_ids, attention_mask) if session.length == 0 else session.extend_to(input_ids)
    if cfg.num_beams > 1:
        return _generate_beams(model, session, logits, cfg, tokenizer)
    if cfg.prompt_lookup and logits.shape[0] == 1:
        return _generate_lookup(model, session, logits, cfg, tokenizer)
    return _generate_sampled(model, session, logits, cfg, tokenizer)


@torch.inference_mode()
def stream(
    model: VLM,
    tokenizer,
    images: torch.Tensor | None,
    input_ids: torch.Tensor,
    config: GenerationConfig | None = None,
    session: Session | None = None,
    **overrides,
) -> Iterator[str]:
    """Yield the text of a batch-of-one generation piece by piece as tokens arrive.

    A piece is released only once it is final: never half a multi-byte character (the
    decoder's replacement character at the end means bytes are still missing) and
    never text that might still turn out to start a stop string.
    """
    cfg = _resolve(config, overrides)
    if cfg.num_beams > 1:
        raise ValueError("streaming works with greedy decoding and sampling, not beam search")
    if input_ids.shape[0] != 1:
        raise ValueError("stream takes a batch of one")
    if session is None:
        session = Session(model, images)
    logits = session.feed(input_ids) if session.length == 0 else session.extend_to(input_ids)
    tokens: list[int] = []
    sent = 0
    text = ""
    for step_tokens, active in sample_steps(model, session, logits, cfg, tokenizer):
        if not bool(active[0]):
            break
        tokens.append(int(step_tokens[0]))
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        cut = _first_stop_string(text, cfg.stop_strings)
        if cut >= 0:
            text = text[:cut]
            break
        if text.endswith("\ufffd"):
            continue
        safe = len(text) - _held_back(text, cfg.stop_strings)
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    if len(text) > sent:
        yield text[sent:]


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could be the start of a stop string."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold
