"""The bundled sketch adapter (vlm/weights/sketch) on the first test sketches, alone and on
the bundled model's backbones."""

import pytest
import torch

from vlm.factory import TASK_CHECKPOINTS, load_model
from vlm.generate import generate
from vlm.tasks import SKETCH
from vlm_train.data import builders
from vlm_train.data.cli import write
from vlm_train.data.decode import decode_sample
from vlm_train.data.shards import iter_tar
from vlm_train.eval.html_metrics import is_valid, structure_exact

pytestmark = pytest.mark.slow
N_SKETCHES = 20  # the first 20 of the test split, not hand-picked
MIN_EXACT = 16


@pytest.fixture(scope="module")
def sketch_model():
    folder = TASK_CHECKPOINTS["sketch"]
    assert (folder / "config.json").is_file(), f"the bundled sketch adapter is missing from {folder}"
    return load_model(task="sketch", verbose=False)


@pytest.fixture(scope="module")
def test_sketches(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sketch_test")
    write(builders.sketches("test", N_SKETCHES), str(folder), "s", 100, 1 << 26)
    examples = [decode_sample(raw, "sketch") for raw in iter_tar(next(folder.glob("*.tar")))]
    assert len(examples) == N_SKETCHES
    return examples


def pages(model, processor, examples) -> list[str]:
    batch = processor([SKETCH.prompt(processor)] * len(examples), [ex.images for ex in examples], padding_side="left")
    out = generate(model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                   config=SKETCH.generation_config(model), tokenizer=processor.tokenizer)  # fmt: skip
    return [text.strip() for text in out.texts]


def test_first_test_sketches_give_pages_of_the_drawn_structure(sketch_model, test_sketches):
    written = pages(*sketch_model, test_sketches)
    assert all(is_valid(page) for page in written), [p for p in written if not is_valid(p)]
    exact = [structure_exact(p, ex.text) for p, ex in zip(written, test_sketches)]
    assert sum(exact) >= MIN_EXACT, (sum(exact), [i for i, ok in enumerate(exact) if not ok])


def test_on_the_bundled_models_backbones_it_writes_the_same_pages(sketch_model, test_sketches):
    default = load_model(verbose=False)
    shared, processor = load_model(task="sketch", verbose=False, share=default)
    assert shared.lm.get_input_embeddings().weight is default[0].lm.get_input_embeddings().weight
    tower = dict(default[0].vision.named_parameters())
    assert all(p is tower[name] for name, p in shared.vision.named_parameters())
    assert shared.config.vision.fold_stride == 16 and default[0].config.vision.fold_stride is None
    alone = sketch_model[0]
    mine, theirs = shared.state_dict(), alone.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert pages(shared, processor, test_sketches[:4]) == pages(*sketch_model, test_sketches[:4])


def test_the_apps_load_it_onto_the_bundled_model_converted_for_inference(test_sketches):
    # What the demo does: the bundled model with lm_weights "auto" (fp16 LM weights on x86
    # CPUs, the head too), then the sketch adapter on its backbones, converted the same way.
    default = load_model(verbose=False, lm_weights="auto")
    shared, processor = load_model(task="sketch", verbose=False, share=default, lm_weights="auto")
    assert shared.head.tied and shared.lm.get_input_embeddings().weight is default[0].lm.get_input_embeddings().weight
    alone = load_model(task="sketch", verbose=False, lm_weights="auto")
    assert pages(shared, processor, test_sketches[:4]) == pages(*alone, test_sketches[:4])
