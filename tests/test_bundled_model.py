"""The bundled default model (vlm/weights/default), on fixed held-out samples."""

import pytest

from training.data.decode import decode_sample
from training.data.shards import iter_tar
from training.eval.html_metrics import is_valid
from training.eval.text_metrics import exact_match
from vlm.factory import DEFAULT_CHECKPOINT, load_model
from vlm.generate import generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundled():
    assert (DEFAULT_CHECKPOINT / "config.json").is_file(), "the bundled checkpoint is missing"
    return load_model(None, verbose=False)


def _easy_vqa_test(n):
    from training.data import builders

    out = []
    for sample, _ in builders.easy_vqa("test"):
        ex = decode_sample(sample, "qa")
        out.append((ex.images[0], *ex.turns[0]))
        if len(out) == n:
            return out
    return out


def test_answers_the_first_easy_vqa_test_questions(bundled):
    model, processor = bundled
    items = _easy_vqa_test(16)  # the first 16 of the test split, not hand-picked
    batch = processor(
        [processor.chat_segments([(q, None)]) for _, q, _ in items], [[img] for img, _, _ in items], padding_side="left"
    )
    out = generate(model, batch["images"], batch["input_ids"], batch["attention_mask"], max_new_tokens=6,
                   tokenizer=processor.tokenizer)  # fmt: skip
    correct = sum(exact_match(p, a) for p, (_, _, a) in zip(out.texts, items))
    assert correct >= 13, list(zip(out.texts, [a for _, _, a in items]))


def test_a_test_sketch_becomes_valid_html(bundled, tmp_path):
    from training.data import builders
    from training.data.cli import write

    model, processor = bundled
    write(builders.sketches("test", 1), str(tmp_path), "s", 10, 1 << 26)
    raw = next(iter_tar(next(tmp_path.glob("*.tar"))))
    ex = decode_sample(raw, "sketch")
    batch = processor([processor.chat_segments([("Write the HTML for this sketch.", None)])], [ex.images])
    out = generate(model, batch["images"], batch["input_ids"], max_new_tokens=400, tokenizer=processor.tokenizer)
    html = out.texts[0].strip()
    # The interim checkpoint writes well-formed pages (30 of 30 test sketches) but does not
    # yet follow the sketch's structure; a structure check comes with the fully trained one.
    assert is_valid(html), html
