"""Training presets and recipes: the bundled model's recipe against the presets it
replaced, named selections, and the ``tiny`` preset end to end."""

import json

import pytest

from vlm_train import recipe
from vlm_train.config import resolve
from vlm_train.train import main as train_main

# The stage presets the `default` recipe replaced (training/presets/default-*.json before
# the recipe), verbatim: each recipe stage must resolve to the same config but its length.
OLD_PRESETS = {
    "default-gpu": {
        "model": {"preset": "efficientnet-smollm2-320", "init_from": None},
        "data": {
            "sources": [
                {"shards": "data/shards/easy-vqa-train", "kind": "qa", "weight": 4.0},
                {"shards": "data/shards/shapes-train", "kind": "qa", "weight": 2.0},
                {"shards": "data/shards/emoji-train", "kind": "caption", "weight": 1.0},
                {"shards": "data/shards/sketch-train", "kind": "sketch", "weight": 3.0},
            ],
            "batch_size": 64,
            "num_workers": 12,
            "shuffle_buffer": 4000,
            "resampled": True,
            "epoch_batches": 3000,
        },
        "eval": {
            "data": {
                "sources": [{"shards": "data/shards/easy-vqa-test", "kind": "qa"}],
                "batch_size": 64,
                "num_workers": 0,
                "shuffle_buffer": 0,
            },
            "every": 500,
            "max_batches": 10,
        },
        "optim": {"lr": 0.0004, "warmup_steps": 200, "gate_lr_mult": 10.0, "weight_decay": 0.01},
        "precision": "bf16-frozen",
        "steps": 1523,
        "checkpoint": {"dir": "runs/default-gpu", "every": 500, "keep": 2},
        "log_every": 20,
        "seed": 0,
    },
    "default-colour": {
        "extends": "default-gpu",
        "model": {"preset": "default"},
        "data": {
            "sources": [
                {"shards": "data/shards/easy-vqa-train", "kind": "qa", "weight": 5.0},
                {"shards": "data/shards/shapes-train", "kind": "qa", "weight": 1.0},
                {"shards": "data/shards/emoji-train", "kind": "caption", "weight": 1.0},
                {"shards": "data/shards/sketch-train", "kind": "sketch", "weight": 1.0},
            ],
            "batch_size": 16,
            "num_workers": 1,
            "shuffle_buffer": 2000,
            "epoch_batches": 1000,
        },
        "eval": {"data": {"batch_size": 32}, "every": 200},
        "optim": {"lr": 0.0002, "warmup_steps": 50},
        "steps": 1646,
        "checkpoint": {"dir": "runs/default-colour", "every": 100},
        "log_every": 10,
        "seed": 2,
    },
    "default-stage3": {
        "extends": "default-colour",
        "data": {
            "sources": [
                {
                    "shards": "data/shards/easy-vqa-train",
                    "kind": "qa",
                    "weight": 3.0,
                    "select": "color|red|green|blue|yellow|black|gray|brown|teal",
                },
                {"shards": "data/shards/easy-vqa-train", "kind": "qa", "weight": 2.0},
                {"shards": "data/shards/shapes-train", "kind": "qa", "weight": 1.0},
                {"shards": "data/shards/emoji-train", "kind": "caption", "weight": 1.0},
                {"shards": "data/shards/sketch-train", "kind": "sketch", "weight": 1.5},
            ]
        },
        "eval": {"every": 250},
        "optim": {"lr": 0.0001},
        "steps": 1518,
        "checkpoint": {"dir": "runs/default-stage3"},
        "seed": 4,
    },
    "default-stage4": {
        "extends": "default-stage3",
        "data": {
            "sources": [
                {
                    "shards": "data/shards/easy-vqa-train",
                    "kind": "qa",
                    "weight": 4.0,
                    "select": "color|red|green|blue|yellow|black|gray|brown|teal",
                },
                {"shards": "data/shards/easy-vqa-train", "kind": "qa", "weight": 2.0},
                {"shards": "data/shards/shapes-train", "kind": "qa", "weight": 0.75},
                {"shards": "data/shards/emoji-train", "kind": "caption", "weight": 0.75},
                {"shards": "data/shards/sketch-train", "kind": "sketch", "weight": 1.5},
            ]
        },
        "steps": 1230,
        "checkpoint": {"dir": "runs/default-stage4"},
        "seed": 5,
    },
    "default-stage5": {
        "extends": "default-stage4",
        "optim": {"lr": 5e-05, "warmup_steps": 25},
        "steps": 603,
        "checkpoint": {"dir": "runs/default-stage5"},
        "seed": 6,
    },
    "default-stage6": {
        "extends": "default-stage5",
        "data": {
            "sources": [
                {
                    "shards": "data/shards/easy-vqa-train",
                    "kind": "qa",
                    "weight": 5.0,
                    "select": "color|red|green|blue|yellow|black|gray|brown|teal",
                },
                {"shards": "data/shards/easy-vqa-train", "kind": "qa", "weight": 2.0},
                {"shards": "data/shards/shapes-train", "kind": "qa", "weight": 0.5},
                {"shards": "data/shards/emoji-train", "kind": "caption", "weight": 0.5},
                {"shards": "data/shards/sketch-train", "kind": "sketch", "weight": 2.5},
            ]
        },
        "optim": {"lr": 0.0001, "warmup_steps": 50},
        "steps": 1191,
        "checkpoint": {"dir": "runs/default-stage6"},
        "seed": 7,
    },
    "default-stage7": {
        "extends": "default-stage6",
        "data": {
            "sources": [
                {
                    "shards": "data/shards/easy-vqa-train",
                    "kind": "qa",
                    "weight": 4.0,
                    "select": "color|red|green|blue|yellow|black|gray|brown|teal",
                },
                {"shards": "data/shards/easy-vqa-train", "kind": "qa", "weight": 2.0, "select": "brown|red|teal"},
                {"shards": "data/shards/easy-vqa-train", "kind": "qa", "weight": 2.0},
                {"shards": "data/shards/shapes-train", "kind": "qa", "weight": 0.5},
                {"shards": "data/shards/emoji-train", "kind": "caption", "weight": 0.5},
                {"shards": "data/shards/sketch-train", "kind": "sketch", "weight": 2.5},
            ]
        },
        "steps": 1645,
        "checkpoint": {"dir": "runs/default-stage7"},
        "seed": 9,
    },
}

# The --time_budget_s each bundled stage was made with (README, "The bundled model").
BUDGETS = {"gpu": 439, "colour": 5400, "stage3": 6300, "stage4": 5400, "stage5": 1800, "stage6": 4800, "stage7": 4800}


def test_recipe_stages_resolve_to_the_presets_they_replaced(tmp_path):
    for name, data in OLD_PRESETS.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    for stage, budget in BUDGETS.items():
        new = resolve(f"default:{stage}", []).to_dict()
        old = resolve(str(tmp_path / f"default-{stage}.json"), []).to_dict()
        assert new.pop("time_budget_s") == budget and old.pop("time_budget_s") is None
        assert old.pop("steps") == OLD_PRESETS[f"default-{stage}"]["steps"]
        new.pop("steps")
        assert new == old, stage


def test_recipe_stage_names_in_order(capsys):
    assert recipe.main(["default"]) == 0
    assert capsys.readouterr().out.split() == list(BUDGETS)


def test_recipe_errors_name_the_choices(tmp_path):
    with pytest.raises(ValueError, match="default is a recipe: name one of its stages; stages: default:gpu, "):
        resolve("default", [])
    with pytest.raises(ValueError, match="default has no stage 'stage9'"):
        resolve("default:stage9", [])
    with pytest.raises(ValueError, match="tiny is not a recipe"):
        resolve("tiny:model", [])
    with pytest.raises(ValueError, match=r"presets: default:gpu, .*default:stage7, sketch, tiny"):
        resolve("default-stage7", [])
    bad = {"stages": [{"name": "a", "steps": 3}, {"name": "b", "extends": "tiny"}]}
    (tmp_path / "r.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="a stage extends the stage before it"):
        resolve(f"{tmp_path / 'r.json'}:b", [])


def test_stages_extend_the_stage_before_and_name_their_run(tmp_path):
    stages = [
        {"name": "one", "steps": 5, "data": {"sources": [{"shards": "x", "kind": "qa"}], "batch_size": 4}},
        {"name": "two", "optim": {"lr": 5e-4}, "checkpoint": {"every": 2}},
        {"name": "three", "data": {"batch_size": 2}, "checkpoint": {"dir": "mine"}},
    ]
    (tmp_path / "r.json").write_text(json.dumps({"stages": stages}))
    one, two, three = (resolve(f"{tmp_path / 'r.json'}:{s['name']}", []) for s in stages)
    assert one.checkpoint.dir == "runs/r-one" and two.checkpoint.dir == "runs/r-two" and three.checkpoint.dir == "mine"
    assert two.steps == 5 and two.optim.lr == 5e-4 and two.data.batch_size == 4
    assert three.data.batch_size == 2 and three.data.sources == one.data.sources and three.checkpoint.every == 2


def test_named_selections():
    stage7 = resolve("default:stage7", [])
    assert [s.select for s in stage7.data.sources[:3]] == [
        "color|red|green|blue|yellow|black|gray|brown|teal",
        "brown|red|teal",
        None,
    ]
    # On the command line too, with the recipe's selections or a new one.
    sources = json.dumps(
        [{"shards": "x", "kind": "qa", "select": "@brown-red-teal"}, {"shards": "y", "kind": "qa", "select": "@mine"}]
    )
    cfg = resolve("default:stage7", ["--data.sources", sources, "--selections.mine", "circle"])
    assert [s.select for s in cfg.data.sources] == ["brown|red|teal", "circle"]
    assert "selections" not in cfg.to_dict()
    with pytest.raises(
        ValueError,
        match=r"data.sources\[0\].select: unknown selection '@colour'; selections: @brown-red-teal, @colour-questions",
    ):
        resolve("default:stage7", ["--data.sources", '[{"shards": "x", "kind": "qa", "select": "@colour"}]'])
    eval_sources = '{"sources": [{"shards": "x", "kind": "qa", "select": "@nope"}]}'
    with pytest.raises(ValueError, match=r"eval.data.sources\[0\].select: unknown selection '@nope'; selections: none"):
        resolve(None, ["--data.sources", '[{"shards": "x", "kind": "qa"}]', "--eval.data", eval_sources])


def test_tiny_preset_trains_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert train_main(["--preset", "tiny", "--steps", "5", "--checkpoint.dir", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 5 and rows[0]["bad_steps"] == 0 and rows[0]["skipped_samples"] == 0
    assert "eval_loss" in rows[-1]
    assert (run / "step-000005" / "model" / "model.safetensors").is_file()
    saved = json.loads((run / "step-000005" / "train_config.json").read_text())
    workspace = tmp_path / "cache" / "tiny-workspace-v1"
    assert saved["model"]["preset"] == str(workspace / "model")
    assert saved["data"]["sources"][0]["shards"] == str(workspace / "shapes-train")
    with pytest.raises(ValueError, match="unknown tiny workspace part 'tiny:lm'"):
        resolve("tiny", ["--model.preset", "tiny:lm"])


def test_defaults_resolve_unvalidated_for_printing():
    # vlm train --print_config without a preset: the defaults have no data sources yet.
    with pytest.raises(ValueError, match="has no sources"):
        resolve(None, [])
    cfg = resolve(None, ["--steps", "7"], validate=False)
    assert cfg.data.sources == [] and cfg.steps == 7
    with pytest.raises(ValueError, match="unknown fields"):
        resolve(None, ["--optim.lrr", "1"], validate=False)


def test_print_config_without_a_preset_shows_the_defaults(capsys):
    import json

    from vlm_train.train import main

    assert main(["--print-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["data"]["sources"] == [] and shown["model"]["preset"] == "default"
