"""Tiny random backbones for tests and ``--tiny`` benchmarks, built fully offline.

Each LM family gets a few-layer random model and a small byte-level BPE tokenizer
trained here, saved as an ordinary Hugging Face folder, so tests go through the very
same loading path as real checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import CrossAttnConfig, LMConfig, ResamplerConfig, VisionConfig, VLMConfig

FAMILIES = ("gpt2", "llama", "opt", "gpt_neox", "qwen2")

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "a red circle left of a blue square",
    "a green triangle above a yellow star",
    "what colour is the shape? the shape is red.",
    "how many objects are there? there are three objects.",
    "the capital of france is paris. the cat sits on the mat.",
    "question: is there a circle? answer: yes. no. maybe.",
    "an emoji of a smiling face with heart eyes",
    "orange purple pink brown black white grey cyan magenta",
    "<html><body><h1>title</h1><p>text</p><button>ok</button></body></html>",
]


def tiny_tokenizer(vocab_size: int = 400, chat_template: str | None = None):
    """A byte-level BPE tokenizer trained on a few sentences (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def tiny_lm_config(family: str, vocab_size: int, hidden: int = 32, layers: int = 4, init_std: float = 0.3):
    """``init_std`` is well above the usual 0.02: a 32-wide random LM initialised that
    small gives near-uniform next-token distributions that no adapter can sharpen."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, eos_token_id=2, bos_token_id=1, pad_token_id=2, initializer_range=init_std)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=2, n_positions=256, **common)
    if family == "llama":
        return tf.LlamaConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **common,
        )
    if family == "opt":
        return tf.OPTConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            ffn_dim=2 * hidden,
            word_embed_proj_dim=hidden // 2,
            max_position_embeddings=256,
            init_std=init_std,
            **common,
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=256,
            **common,
        )
    if family == "qwen2":
        return tf.Qwen2Config(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=256,
            **common,
        )
    raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")


def make_tiny_lm(folder: str | Path, family: str = "llama", seed: int = 0, chat: bool = False) -> Path:
    """Save a tiny random causal LM of ``family`` with its tokenizer into ``folder``."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    tokenizer = tiny_tokenizer(chat_template=CHATML if chat else None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_lm_config(family, len(tokenizer)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_vision_config(image_size: int = 32) -> VisionConfig:
    """A 2-layer random ViT through open_clip (patch 8 → 16 tokens at 32 px)."""
    return VisionConfig(
        kind="open_clip",
        name="ViT-B-32",
        pretrained=None,
        image_size=image_size,
        model_kwargs=dict(
            embed_dim=16,
            vision_cfg=dict(image_size=image_size, layers=2, width=32, head_width=16, patch_size=8),
            text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
        ),
    )


def tiny_config(lm_folder: str | Path, every: int = 2, only_latest_image: bool = True) -> VLMConfig:
    return VLMConfig(
        vision=tiny_vision_config(),
        lm=LMConfig(name=str(lm_folder)),
        resampler=ResamplerConfig(num_latents=4, depth=1, heads=2, head_dim=8, ff_mult=2, max_images=4),
        cross_attn=CrossAttnConfig(every=every, heads=2, head_dim=8, ff_mult=2, only_latest_image=only_latest_image),
    ).validate()
