"""Processor: token layout, label masks, padding and image batching."""

import pytest
import torch
from conftest import shape_image

from vlm.model import IGNORE_INDEX


def trained_text(processor, ids, labels):
    keep = labels != IGNORE_INDEX
    return processor.tokenizer.decode(ids[keep])


def test_caption_labels_cover_caption_and_end_marker_only(make_model):
    _, processor = make_model("gpt2")
    batch = processor([processor.caption_segments("a red circle")], [[shape_image("red")]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert ids[0] == processor.image_token_id and labels[0] == IGNORE_INDEX
    assert trained_text(processor, ids, labels) == "a red circle<|endofchunk|>"
    assert batch["pixel_values"].shape == (1, 1, 3, 32, 32)


def test_chat_template_masks_the_prompt(make_model):
    _, processor = make_model("llama")  # the tiny llama has a ChatML template
    segs = processor.chat_segments([("what colour is the shape?", "red"), ("is it a circle?", "yes")])
    batch = processor([segs], [[shape_image("red")]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    text = processor.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\n<image>what colour is the shape?<|im_end|>\n<|im_start|>assistant\n")
    assert trained_text(processor, ids, labels) == "red<|im_end|>\nyes<|im_end|>\n"
    # Inference form: ends with the assistant prompt, nothing trained.
    prompt = processor([processor.chat_segments([("what colour?", None)])], [[shape_image("red")]])
    assert processor.tokenizer.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n")
    assert torch.all(prompt["labels"] == IGNORE_INDEX)


def test_plain_question_answer_format_without_template(make_model):
    _, processor = make_model("gpt2")
    batch = processor([processor.chat_segments([("what shape?", "circle")])], [[shape_image("red")]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert processor.tokenizer.decode(ids) == "<image>Question: what shape? Answer: circle<|endofchunk|>"
    assert trained_text(processor, ids, labels) == " circle<|endofchunk|>"


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_and_mixed_image_counts(make_model, side):
    _, processor = make_model("gpt2")
    samples = ["<image>a red circle<|endofchunk|>", "<image>one<|endofchunk|><image>two<|endofchunk|>"]
    images = [[shape_image("red")], [shape_image("blue"), shape_image("green")]]
    batch = processor(samples, images, padding_side=side)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert batch["pixel_values"].shape[:2] == (2, 2)
    assert torch.all(batch["pixel_values"][0, 1] == 0)  # the missing second image is zero padding
    short = int(mask[0].sum())
    assert short < ids.shape[1]
    pad = slice(0, ids.shape[1] - short) if side == "left" else slice(short, None)
    assert torch.all(mask[0, pad] == 0) and torch.all(labels[0, pad] == IGNORE_INDEX)
    assert torch.all(labels[ids == processor.image_token_id] == IGNORE_INDEX)
    assert torch.all(labels[mask.bool() & (ids != processor.image_token_id)] != IGNORE_INDEX)


def test_bad_inputs_are_named(make_model):
    _, processor = make_model("gpt2")
    with pytest.raises(ValueError, match="sample 0 has 1 <image> markers but 2 images"):
        processor(["<image>x"], [[shape_image("red"), shape_image("red")]])
    with pytest.raises(TypeError, match="sample 0, image 0: expected a PIL image, got str"):
        processor(["<image>x"], [["not an image"]])
    with pytest.raises(ValueError, match="at least one"):
        processor.chat_segments([])


def test_prompt_helpers_for_inference(make_model):
    _, processor = make_model("gpt2")
    decode = processor.tokenizer.decode
    images = [shape_image(c) for c in ("red", "blue", "green")]
    caption = processor([processor.caption_prompt("a photo of")], [images[:1]])
    assert decode(caption["input_ids"][0]) == "<image>a photo of"
    shots = processor.few_shot_segments([("what colour?", "red"), ("what colour?", "blue")], "what colour?")
    batch = processor([shots], [images])
    assert decode(batch["input_ids"][0]) == (
        "<image>Question: what colour? Answer: red<|endofchunk|>"
        "<image>Question: what colour? Answer: blue<|endofchunk|>"
        "<image>Question: what colour? Answer:"
    )
    assert batch["pixel_values"].shape[:2] == (1, 3)
    plain = processor.few_shot_segments([("", "a red circle")], "", style="caption")
    assert decode(processor([plain], [images[:2]])["input_ids"][0]) == "<image>a red circle<|endofchunk|><image>"


def test_few_shot_with_a_chat_template_puts_one_image_in_each_user_turn(make_model):
    _, processor = make_model("llama")
    shots = processor.few_shot_segments([("what colour?", "red")], "what colour?")
    text = processor.tokenizer.decode(processor([shots], [[shape_image("red")] * 2])["input_ids"][0])
    assert text == (
        "<|im_start|>user\n<image>what colour?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\n<image>what colour?<|im_end|>\n<|im_start|>assistant\n"
    )
