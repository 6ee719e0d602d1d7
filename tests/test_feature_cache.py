"""Frozen-encoder feature cache: same losses with and without it; invalidation on any change."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from seechat.models.kinds import build_model
from seechat.data.feature_cache import (
    FeatureCache,
    encoder_key,
    content_key,
    resolve_feature_cache,
    transform_is_deterministic,
)
from seechat.training.loop import run

from conftest import model_config, tiny_recipe

MODES = {"encoder": "frozen", "adapter": "full", "llm": "frozen"}


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]


def test_training_losses_identical_with_and_without_cache(experts, tiny_vqa, tmp_path):
    common = ("train.max_steps=null", "train.epochs=2")
    plain = run(tiny_recipe(experts, tiny_vqa, str(tmp_path / "plain"), *common))
    cache_dir = tmp_path / "cache"
    cached = run(tiny_recipe(experts, tiny_vqa, str(tmp_path / "cached"), *common,
                             f"data.feature_cache={cache_dir}"))
    assert plain["steps"] == cached["steps"] == 14  # 26 samples / batch 4 = 7 per epoch
    assert _losses(tmp_path / "cached") == _losses(tmp_path / "plain")
    # 24 distinct image files in tiny_vqa (the two-image sample reuses two of them)
    [key_dir] = cache_dir.iterdir()
    assert len(FeatureCache(cache_dir, key_dir.name)) == 24
    # a second run over the same data and encoder computes nothing new
    model = build_model(model_config(experts, "hf", "mlp", "qwen2"), MODES)
    cache = FeatureCache(cache_dir, key_dir.name)
    records = json.loads(open(tiny_vqa["train"]).read())
    images = [r["image"] for r in records if "image" in r]
    assert cache.fill(images, model.encoder, tiny_vqa["root"]) == 0


def test_cached_features_equal_encoder_output_and_bf16_round_trips(experts, tiny_vqa, tmp_path):
    model = build_model(model_config(experts), MODES)
    cache = FeatureCache(tmp_path, encoder_key(model.encoder, None))
    assert cache.fill(["images/0.png", "images/1.png", "images/0.png"], model.encoder, tiny_vqa["root"]) == 2
    image = Image.open(f"{tiny_vqa['root']}/images/1.png").convert("RGB")
    with torch.no_grad():
        expected = model.encoder(model.encoder.transform(image)[None])[0]
    assert torch.equal(cache.get(content_key("images/1.png", tiny_vqa["root"])), expected)
    bf16 = FeatureCache(tmp_path, "bf16")
    values = torch.randn(2, 5, 3).to(torch.bfloat16)
    bf16.add(["a", "b"], values)
    assert FeatureCache(tmp_path, "bf16").get("b").dtype == torch.bfloat16
    assert torch.equal(FeatureCache(tmp_path, "bf16").get("b"), values[1])


def test_changed_image_is_recomputed(experts, tiny_vqa, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_vqa["root"], root)
    model = build_model(model_config(experts), MODES)
    cache = FeatureCache(tmp_path / "cache", encoder_key(model.encoder, None))
    assert cache.fill(["images/0.png", "images/1.png"], model.encoder, root) == 2
    Image.new("RGB", (32, 32), "black").save(root / "images" / "0.png")  # same path, new content
    assert cache.fill(["images/0.png", "images/1.png"], model.encoder, root) == 1
    assert len(cache) == 3


def test_encoder_key_changes_with_weights_layer_transform_and_dtype(experts):
    model = build_model(model_config(experts), MODES)
    enc = model.encoder
    base = encoder_key(enc, None)
    assert encoder_key(enc, None) == base
    assert encoder_key(enc, torch.bfloat16) != base
    with torch.no_grad():
        next(enc.parameters()).view(-1)[0] += 1e-3
    changed_weights = encoder_key(enc, None)
    assert changed_weights != base
    enc.feature_layer = -1
    assert encoder_key(enc, None) != changed_weights
    enc.feature_layer = -2
    enc._transform = T.Compose([T.Resize(40), T.CenterCrop(32), T.ToTensor()])
    assert encoder_key(enc, None) != changed_weights


def test_auto_and_explicit_settings(experts, tmp_path):
    model = build_model(model_config(experts), MODES)
    enc = model.encoder
    assert resolve_feature_cache("off", "frozen", enc, None, tmp_path) is None
    assert resolve_feature_cache("auto", "frozen", enc, None, tmp_path).dir.parent == tmp_path
    assert resolve_feature_cache(str(tmp_path / "x"), "frozen", enc, None, tmp_path).dir.parent == tmp_path / "x"
    assert resolve_feature_cache("auto", "lora", enc, None, tmp_path) is None
    with pytest.raises(ValueError, match="encoder trains"):
        resolve_feature_cache(str(tmp_path), "full", enc, None, tmp_path)
    enc._transform = T.Compose([T.RandomResizedCrop(32), T.ToTensor()])
    assert not transform_is_deterministic(enc.transform)
    assert resolve_feature_cache("auto", "frozen", enc, None, tmp_path) is None
    with pytest.raises(ValueError, match="transform is random"):
        resolve_feature_cache(str(tmp_path), "frozen", enc, None, tmp_path)


def test_missing_key_is_named(tmp_path):
    with pytest.raises(KeyError, match="not in the feature cache"):
        FeatureCache(tmp_path, "k").get("0123456789abcdef")


def test_shards_are_append_only_and_reads_hold_no_files(experts, tiny_vqa, tmp_path):

    from seechat.data import feature_cache as fc

    model = build_model(model_config(experts), MODES)
    row_bytes = model.encoder.num_patches * model.encoder.hidden_size * 4  # fp32 features
    cache = FeatureCache(tmp_path, "k", shard_bytes=3 * row_bytes)  # a shard closes at >= 3 rows
    images = [f"images/{i}.png" for i in range(8)]
    assert cache.fill(images[:5], model.encoder, tiny_vqa["root"], batch_size=2) == 5
    shards = sorted(p.name for p in (tmp_path / "k").glob("shard-*.json"))
    assert shards == ["shard-00000.json", "shard-00001.json"]  # rows 4 + 1 (batches of 2)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "k").iterdir()}
    assert cache.fill(images, model.encoder, tiny_vqa["root"], batch_size=2) == 3
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "k").iterdir()}
    assert {name: after[name] for name in before} == before  # nothing written is rewritten
    assert sorted(after) == sorted(before) + ["shard-00002.bin", "shard-00002.claim", "shard-00002.json"]
    fresh = FeatureCache(tmp_path, "k")
    fds = len(os.listdir("/proc/self/fd"))
    with torch.no_grad():
        for name in images:
            image = Image.open(f"{tiny_vqa['root']}/{name}").convert("RGB")
            expected = model.encoder(model.encoder.transform(image)[None])[0]
            assert torch.equal(fc.load_features(fresh, name, tiny_vqa["root"]), expected)
    assert len(os.listdir("/proc/self/fd")) == fds


def test_known_files_are_not_read_again_until_they_change(experts, tiny_vqa, tmp_path, monkeypatch):
    from seechat.data import feature_cache as fc

    root = tmp_path / "data"
    shutil.copytree(tiny_vqa["root"], root)
    model = build_model(model_config(experts), MODES)
    cache = FeatureCache(tmp_path / "cache", "k")
    cache.fill(["images/0.png"], model.encoder, root)
    key = content_key("images/0.png", root)
    hashed = []
    monkeypatch.setattr(fc, "content_key", lambda image, image_root=None: hashed.append(image) or key)
    assert FeatureCache(tmp_path / "cache", "k").key_of("images/0.png", root) == key
    assert hashed == []  # found by path, size and mtime
    path = root / "images" / "0.png"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # touched
    assert FeatureCache(tmp_path / "cache", "k").key_of("images/0.png", root) == key
    assert hashed == ["images/0.png"]  # hashed again: the content decides


def test_a_shard_cut_off_by_a_crash_is_ignored(experts, tiny_vqa, tmp_path):
    model = build_model(model_config(experts), MODES)
    cache = FeatureCache(tmp_path, "k")
    writer = cache._writer()  # a fill killed before its shard was published
    writer.write(["x"], torch.zeros(1, 2, 3), [None])
    writer.file.close()
    assert len(FeatureCache(tmp_path, "k")) == 0
    assert FeatureCache(tmp_path, "k").fill(["images/0.png"], model.encoder, tiny_vqa["root"]) == 1
    assert len(FeatureCache(tmp_path, "k")) == 1


def test_two_fills_of_one_directory_never_share_a_shard(experts, tiny_vqa, tmp_path):
    # Two runs of a sweep share runs/.feature_cache; both opened it before either wrote.
    model = build_model(model_config(experts), MODES)
    a, b = FeatureCache(tmp_path, "k"), FeatureCache(tmp_path, "k")
    assert len(a) == len(b) == 0
    a.fill(["images/0.png"], model.encoder, tiny_vqa["root"])
    b.fill(["images/1.png"], model.encoder, tiny_vqa["root"])  # b still believes the directory empty
    fresh = FeatureCache(tmp_path, "k")
    with torch.no_grad():
        for name in ("images/0.png", "images/1.png"):
            image = Image.open(f"{tiny_vqa['root']}/{name}").convert("RGB")
            expected = model.encoder(model.encoder.transform(image)[None])[0]
            assert torch.equal(fresh.get(fresh.key_of(name, tiny_vqa["root"])), expected)


def test_a_copy_of_a_cached_image_is_hashed_once_and_a_broken_manifest_is_skipped(
        experts, tiny_vqa, tmp_path, monkeypatch, caplog):
    from seechat.data import feature_cache as fc

    root = tmp_path / "data"
    shutil.copytree(tiny_vqa["root"], root)
    shutil.copy(root / "images" / "0.png", root / "images" / "copy.png")  # same content, new path
    model = build_model(model_config(experts), MODES)
    cache = FeatureCache(tmp_path / "cache", "k")
    assert cache.fill(["images/0.png"], model.encoder, root) == 1
    assert cache.fill(["images/copy.png"], model.encoder, root) == 0  # content known: nothing computed
    monkeypatch.setattr(fc, "content_key", lambda *a, **k: pytest.fail("hashed a file already recorded"))
    assert FeatureCache(tmp_path / "cache", "k").key_of("images/copy.png", root) == cache.key_of("images/0.png", root)
    monkeypatch.undo()
    (tmp_path / "cache" / "k" / "shard-00007.json").write_text('{"shard": 7, "rows": [')  # cut off
    assert len(FeatureCache(tmp_path / "cache", "k")) == 1
    assert "ignoring unreadable manifest" in caplog.text
