"""Every key of the recipe schema (`seechat.config.DEFAULTS`) is read by the code: a key that
nothing reads is a setting users change without effect.

Reads are recorded, not grepped: the resolved recipe is wrapped in mappings that note every key
looked up (`[]`, `get`, `in`), and a tiny stitched finetune (LoRA, validation), a random-init
build over a Hugging Face dataset and a native build go through it. Encoder keys are passed on
as keyword arguments, so they count as read when an encoder backend's builder takes them. The
few keys only a caller above training reads, or only a GPU path, are listed in `READ_ELSEWHERE`
with the exact access that reads them.
"""
from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import yaml

from conftest import tiny_recipe
from seechat.config import DEFAULTS, FREE_FORM, RecipeError, load_recipe
from seechat.data.from_recipe import build_dataset
from seechat.inference.evaluate import evaluate_file
from seechat.training.loop import model_for, run

QWEN3 = {"model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16}
PACKAGE = Path(__file__).resolve().parents[1] / "seechat"

# Keys only a caller above training reads, or only a path this CPU test cannot take:
# key -> (module, the expression there that reads it)
READ_ELSEWHERE = {
    "data.test": ("experiments/easyvqa/pipeline.py", 'finetune["data"]["test"]'),
    "model.llm.device_map": ("models/llm.py", 'cfg.get("device_map")'),  # 4-bit (QLoRA) loading: CUDA
}


class Recorded(dict):
    """A recipe mapping that adds the dotted path of every key looked up to `reads`."""

    def __init__(self, data: dict, reads: set[str], path: str = "") -> None:
        super().__init__({k: Recorded(v, reads, f"{path}{k}.") if isinstance(v, dict) else v for k, v in data.items()})
        self.reads, self.path = reads, path

    def _read(self, key) -> None:
        self.reads.add(f"{self.path}{key}")

    def __getitem__(self, key):
        self._read(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._read(key)
        return super().get(key, default)

    def __contains__(self, key) -> bool:
        self._read(key)
        return super().__contains__(key)

    def setdefault(self, key, default=None):
        self._read(key)
        return super().setdefault(key, default)

    def __deepcopy__(self, memo) -> Recorded:  # a copy still reports to the same set
        return Recorded({k: copy.deepcopy(v, memo) for k, v in dict.items(self)}, self.reads, self.path)


def schema_keys(schema: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the schema's leaves (a free-form mapping is one leaf)."""
    keys = []
    for key, value in schema.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and tuple(path.split(".")) not in FREE_FORM:
            keys += schema_keys(value, path + ".")
        else:
            keys.append(path)
    return keys


def encoder_arguments() -> set[str]:
    """model.encoder keys reach the backend's builder as keyword arguments (build_encoder passes
    those its signature accepts): such a key is read when some backend takes it."""
    from seechat.models.registry import ENCODERS

    return {f"model.encoder.{p}" for builder in ENCODERS.values() for p in inspect.signature(builder).parameters}


def unread(reads: set[str]) -> list[str]:
    return [key for key in schema_keys(DEFAULTS) if key not in reads | encoder_arguments() and key not in READ_ELSEWHERE]


@pytest.fixture
def tiny_vq(tmp_path) -> Path:
    import torch

    from seechat.models.native.vq import train_vq

    vq = train_vq(torch.rand(8, 3, 16, 16) * 2 - 1, epochs=1, batch_size=8, channels=8, downsample=2, levels=(5, 5, 5))
    vq.save_pretrained(tmp_path / "vq")
    return tmp_path / "vq"


def test_every_recipe_key_is_read(experts, tiny_vqa, tiny_vq, tmp_path, monkeypatch):
    # the run writes recipe.yaml with yaml.safe_dump, which takes only plain dicts
    monkeypatch.setitem(yaml.SafeDumper.yaml_representers, Recorded, yaml.SafeDumper.represent_dict)
    reads: set[str] = set()
    # finetune with LoRA on encoder and LM, sized by epochs, validating on the way
    stitched = tiny_recipe(experts, tiny_vqa, str(tmp_path / "run"), "stage=finetune", "llm.mode=lora",
                           "encoder.mode=lora", "train.max_steps=null", "train.epochs=1", "train.batch_size=13",
                           f"data.val={tiny_vqa['test']}", "eval.every=1", "eval.max_samples=4", "train.save_every=2")
    summary = run(Recorded(stitched, reads), evaluate=evaluate_file)
    assert summary["steps"] == 2
    # a random-init LM, read through a Hugging Face dataset
    random_init = copy.deepcopy(stitched)
    random_init["model"]["llm"] = {**random_init["model"]["llm"], "name_or_path": None,
                                   "tokenizer": experts["tokenizer"], "config": QWEN3}
    random_init["data"]["format"] = "hf"
    build_dataset(Recorded(random_init, reads), model_for(Recorded(random_init, reads)))
    # the native kind
    native = copy.deepcopy(random_init)
    native["model"] = {**native["model"], "kind": "native", "adapter": {},
                       "encoder": {**native["model"]["encoder"], "mode": None},
                       "llm": {**native["model"]["llm"], "mode": None},
                       "native": {**DEFAULTS["model"]["native"], "vq": str(tiny_vq)}}
    model_for(Recorded(native, reads))
    assert unread(reads) == []


def test_the_check_fails_for_a_key_nothing_reads():
    reads = set(schema_keys(DEFAULTS)) - {"eval.max_samples", "model.encoder.name"}
    assert unread(reads) == ["eval.max_samples"]  # (encoder.name: an argument of every backend)


def test_keys_read_by_callers_are_read_there():
    for key, (module, expression) in READ_ELSEWHERE.items():
        assert expression in (PACKAGE / module).read_text(), (key, module)


@pytest.mark.parametrize("key, hint", [
    ("data.streaming=true", "data.streaming is no longer a recipe key: training reads a map-style dataset"),
    ("eval.split=val", "eval.split is no longer a recipe key: data.val is what training validates on"),
])
def test_removed_keys_say_what_to_do(key, hint):
    with pytest.raises(RecipeError, match=hint):
        load_recipe(None, [key])
