"""Safe loading: remote code runs only when the recipe says so, and no seechat code unpickles."""
from __future__ import annotations

import re

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

from conftest import tiny_recipe
from seechat.config import REPO_ROOT
from seechat.training.loop import model_for

LOADERS = {"tokenizer": AutoTokenizer, "llm": AutoModelForCausalLM, "encoder config": AutoConfig,
           "encoder": CLIPVisionModel}


@pytest.fixture()
def remote_code_calls(monkeypatch) -> dict[str, list]:
    """Records the trust_remote_code each from_pretrained call made by seechat receives (calls
    transformers makes inside those are not seechat's), then loads as usual."""
    calls: dict[str, list] = {name: [] for name in LOADERS}
    depth = [0]
    for name, cls in LOADERS.items():
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _name=name, _original=original, **kwargs):
            if depth[0] == 0:
                calls[_name].append(kwargs.get("trust_remote_code", "not passed"))
            kwargs["trust_remote_code"] = False  # the tiny local experts need no remote code
            depth[0] += 1
            try:
                return _original(klass, *args, **kwargs)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


def test_remote_code_is_off_by_default(experts, tiny_vqa, tmp_path, remote_code_calls):
    model_for(tiny_recipe(experts, tiny_vqa, str(tmp_path / "run")))
    assert remote_code_calls == {name: [False] for name in LOADERS}


def test_remote_code_only_when_the_recipe_says_so(experts, tiny_vqa, tmp_path, remote_code_calls):
    model_for(tiny_recipe(experts, tiny_vqa, str(tmp_path / "run"), "llm.trust_remote_code=true",
                          "encoder.trust_remote_code=true"))
    assert remote_code_calls == {name: [True] for name in LOADERS}


def test_open_clip_backend_refuses_trust_remote_code(experts, tiny_vqa, tmp_path):
    with pytest.raises(ValueError, match="encoder.trust_remote_code does not apply to the 'open_clip' backend"):
        model_for(tiny_recipe(experts, tiny_vqa, str(tmp_path / "run"), "encoder.backend=open_clip",
                              "encoder.name=ViT-B-16", "encoder.trust_remote_code=true"))


UNSAFE = [
    (r"torch\.load\((?![^)]*weights_only=True)", "torch.load without weights_only=True"),
    (r"\bpickle\.loads?\(|\bdill\.|\bcloudpickle\.", "unpickling"),
    (r"trust_remote_code\s*=\s*True", "remote code switched on in code"),
    (r"\.bin\b.*from_pretrained|use_safetensors\s*=\s*False", "non-safetensors weights requested"),
]


@pytest.mark.parametrize("pattern, what", UNSAFE, ids=[w for _, w in UNSAFE])
def test_no_unsafe_loading_in_the_library(pattern, what):
    hits = [f"{path.relative_to(REPO_ROOT)}:{i}: {line.strip()}"
            for path in sorted((REPO_ROOT / "seechat").rglob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert not hits, f"{what}: {hits}"
