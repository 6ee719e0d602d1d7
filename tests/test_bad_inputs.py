"""The bad-input battery: every kind of broken data or recipe a long run meets, each ending in
a clear error that names the sample/file and the problem, or (data.on_error=skip) a counted,
logged skip - never a crash mid-epoch and never garbage trained on silently. Images of unusual
modes are converted, and the converted pixels are checked.

The README table "Bad inputs tried, how each ends" lists these cases; `test_readme_table_lists_
every_case` keeps the two in step. Unit tests of single functions live in test_data.py; here
each case goes through the path training takes (file -> reader -> dataset -> DataLoader)."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from conftest import tiny_recipe
from seechat.config import REPO_ROOT, RecipeError, load_recipe
from seechat.data import SampleError, TruncationError, VLMCollator, VLMDataset, load_image, read_llava_records
from seechat.models.encoders.base import clip_style_transform
from seechat.experiments.tiny import train_tokenizer
from seechat.training.loop import model_for, run

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

TURNS = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}]
NUM_IMAGE_TOKENS = 4


@pytest.fixture(scope="module")
def tok():
    tokenizer = train_tokenizer(["What colour is it? red green blue. Describe the image."] * 5, vocab_size=300)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return tokenizer


TRANSFORM = clip_style_transform(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def good_png(root: Path, name: str = "ok.png") -> str:
    Image.new("RGB", (12, 10), (200, 20, 20)).save(root / name)
    return name


# --- bad images: each a builder writing the file, and the problem the error must state -------


def _noise(size=(48, 48)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


def missing(root: Path) -> str:
    return "nowhere.png"


def corrupt_png(root: Path) -> str:
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return "corrupt.png"


def truncated_png(root: Path) -> str:
    _noise().save(root / "truncated.png")
    (root / "truncated.png").write_bytes((root / "truncated.png").read_bytes()[:500])
    return "truncated.png"


def truncated_jpg(root: Path) -> str:
    _noise().save(root / "truncated.jpg", quality=95)
    (root / "truncated.jpg").write_bytes((root / "truncated.jpg").read_bytes()[:700])
    return "truncated.jpg"


def zero_byte_png(root: Path) -> str:
    (root / "empty.png").write_bytes(b"")
    return "empty.png"


def zero_byte_jpg(root: Path) -> str:
    (root / "empty.jpg").write_bytes(b"")
    return "empty.jpg"


def text_named_jpg(root: Path) -> str:
    (root / "notes.jpg").write_text("these are my notes, not a photo\n" * 5)
    return "notes.jpg"


def html_named_png(root: Path) -> str:
    (root / "page.png").write_text("<html><body>404 Not Found</body></html>")  # a failed download
    return "page.png"


def decompression_bomb(root: Path) -> str:
    # 9,500 x 9,500 = 90.25 megapixels in a ~12 KB file: over the 89.5 MP limit. 1-bit, so
    # writing it costs little; decoding it as RGB would take 270 MB.
    Image.new("1", (9500, 9500)).save(root / "bomb.png")
    return "bomb.png"


BAD_IMAGES = [
    (missing, "image file not found"),
    (corrupt_png, "cannot read image"),
    (truncated_png, "cannot read image"),
    (truncated_jpg, "cannot read image.*truncated"),
    (zero_byte_png, "cannot read image"),
    (zero_byte_jpg, "cannot read image"),
    (text_named_jpg, "cannot read image"),
    (html_named_png, "cannot read image"),
    (decompression_bomb, "90,250,000 pixels, over the limit of 89,478,485"),
]


def image_records(root: Path, bad_image: str) -> list[dict]:
    ok = good_png(root)
    return [{"id": "good", "image": ok, "conversations": TURNS},
            {"id": "bad", "image": bad_image, "conversations": TURNS}]


@pytest.mark.parametrize("make, problem", BAD_IMAGES, ids=[m.__name__ for m, _ in BAD_IMAGES])
def test_bad_image_raises_naming_sample_and_file(tmp_path, tok, make, problem):
    bad = make(tmp_path)
    dataset = VLMDataset(image_records(tmp_path, bad), tok, TRANSFORM, NUM_IMAGE_TOKENS, image_root=tmp_path)
    assert dataset[0]["pixel_values"].shape == (1, 3, 16, 16)
    with pytest.raises(SampleError) as info:
        dataset[1]
    message = str(info.value)
    assert "sample 'bad'" in message and str(tmp_path / bad) in message, message
    assert re.search(problem, message), message


@pytest.mark.parametrize("make, problem", BAD_IMAGES, ids=[m.__name__ for m, _ in BAD_IMAGES])
def test_bad_image_is_a_counted_logged_skip(tmp_path, tok, make, problem, caplog):
    bad = make(tmp_path)
    dataset = VLMDataset(image_records(tmp_path, bad), tok, TRANSFORM, NUM_IMAGE_TOKENS, image_root=tmp_path,
                         on_error="skip")
    with caplog.at_level(logging.WARNING, logger="seechat.data"):
        batches = list(DataLoader(dataset, batch_size=2, collate_fn=VLMCollator(tok.pad_token_id)))
    assert [b["ids"] for b in batches] == [["good"]]
    assert [sid for sid, _ in batches[0]["skipped"]] == ["bad"]
    assert re.search(problem, batches[0]["skipped"][0][1])
    assert "skipping sample 'bad'" in caplog.text and str(tmp_path / bad) in caplog.text


# --- unusual but valid images: converted, and the converted pixels are right -----------------


def pixels(image: Image.Image) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in row) for row in np.asarray(image).reshape(-1, 3)]


def test_grayscale_is_replicated_to_rgb(tmp_path):
    Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), mode="L").save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    assert image.mode == "RGB" and pixels(image) == [(0, 0, 0), (77, 77, 77), (255, 255, 255)]


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [255, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    # Fully transparent: white, not the red stored under alpha 0; opaque: unchanged; half: blended.
    assert pixels(load_image(tmp_path / "a.png")) == [(255, 255, 255), (0, 0, 255), (255, 127, 127)]


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    image.putdata([0, 1, 2])
    image.save(tmp_path / "p.png", transparency=2)  # palette index 2 (blue) is transparent
    assert pixels(load_image(tmp_path / "p.png")) == [(255, 0, 0), (0, 255, 0), (255, 255, 255)]


def test_cmyk_jpeg(tmp_path):
    cmyk = np.zeros((16, 32, 4), dtype=np.uint8)
    cmyk[:, :16] = (255, 0, 0, 0)  # cyan ink only
    cmyk[:, 16:] = (0, 0, 0, 255)  # black ink only
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.jpg", quality=100)
    rgb = np.asarray(load_image(tmp_path / "c.jpg")).astype(int)
    assert np.abs(rgb[8, 4] - (0, 255, 255)).max() <= 3 and np.abs(rgb[8, 28] - (0, 0, 0)).max() <= 3


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 257 * 100, 1000, 65535]], dtype=np.uint16)).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode == "I;16"
    # PIL's own convert("RGB") gives 255 for every value above 255.
    assert pixels(load_image(tmp_path / "d.png")) == [(0, 0, 0), (100, 100, 100), (4, 4, 4), (255, 255, 255)]


def test_one_by_one_image_trains(tmp_path, tok):
    Image.new("RGB", (1, 1), (255, 0, 0)).save(tmp_path / "dot.png")
    item = VLMDataset([{"id": "dot", "image": "dot.png", "conversations": TURNS}], tok, TRANSFORM,
                      NUM_IMAGE_TOKENS, image_root=tmp_path)[0]
    # Upscaled to the encoder's 16x16 input, every pixel the same red, normalised: (1, -1, -1).
    assert item["pixel_values"].shape == (1, 3, 16, 16)
    assert item["pixel_values"][0, :, 5, 7].tolist() == [1.0, -1.0, -1.0]


def test_exif_rotated_photo_is_upright(tmp_path):
    stored = np.zeros((16, 32, 3), dtype=np.uint8)  # 32 wide, 16 high as stored by the camera
    stored[:, :16] = (255, 0, 0)
    stored[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=100)
    upright = np.asarray(load_image(tmp_path / "photo.jpg")).astype(int)
    assert upright.shape == (32, 16, 3)  # portrait after rotation
    # The stored left half (red) is the top when displayed, the right half (blue) the bottom.
    assert np.abs(upright[4, 8] - (255, 0, 0)).max() <= 3 and np.abs(upright[28, 8] - (0, 0, 255)).max() <= 3


# --- bad records: written to a JSONL file, so errors name the file and line ------------------


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


GOOD = {"id": "good", "image": "ok.png", "conversations": TURNS}
BAD_RECORDS = {
    "missing conversations": ({"id": "bad", "image": "ok.png"}, "'conversations' must be a non-empty list"),
    "empty conversations": ({"id": "bad", "conversations": []}, "'conversations' must be a non-empty list"),
    "conversations is a string": ({"id": "bad", "conversations": "hi"}, "'conversations' must be a non-empty list"),
    "turn is not a dict": ({"id": "bad", "conversations": ["hi", "red"]}, "turn 0 is str, not a dict"),
    "turn value is a number": ({"id": "bad", "conversations": [{"from": "human", "value": 3}, TURNS[1]]},
                               "turn 0 value is int, not str"),
    "id is a list": ({"id": ["bad"], "conversations": TURNS[1:]}, "'id' is a list"),
    "image is a number": ({"id": "bad", "image": 7, "conversations": TURNS}, "image entry 7 is a int"),
    "first turn from the assistant": ({"id": "bad", "conversations": [TURNS[1], TURNS[0], TURNS[1]]},
                                      "first turn .* is from 'gpt'; it must be from 'human'"),
    "unknown role": ({"id": "bad", "conversations": [{"from": "robot", "value": "hi"}, TURNS[1]]},
                     "role 'robot'; valid roles"),
    "no answer": ({"id": "bad", "conversations": TURNS[:1]}, "no 'gpt' turn"),
    "more <image> than images": ({"id": "bad", "image": "ok.png", "conversations": [
        {"from": "human", "value": "<image> <image>"}, TURNS[1]]}, "2 <image> marker.* but 1 image"),
    "<image> without an image": ({"id": "bad", "conversations": TURNS}, "1 <image> marker.* but 0 image"),
    "empty image path": ({"id": "bad", "image": "", "conversations": TURNS}, "empty image entry"),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_bad_record_raises_or_is_skipped(tmp_path, tok, case, caplog):
    good_png(tmp_path)
    bad, problem = BAD_RECORDS[case]
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, bad])
    strict = VLMDataset(read_llava_records(path), tok, TRANSFORM, NUM_IMAGE_TOKENS, image_root=tmp_path)
    with pytest.raises(SampleError) as info:
        strict[1]
    message = str(info.value)
    assert re.search(problem, message) and f"{path}:2" in message, message
    lenient = VLMDataset(read_llava_records(path), tok, TRANSFORM, NUM_IMAGE_TOKENS, image_root=tmp_path,
                         on_error="skip")
    with caplog.at_level(logging.WARNING, logger="seechat.data"):
        batch = next(iter(DataLoader(lenient, batch_size=2, collate_fn=VLMCollator(tok.pad_token_id))))
    assert batch["ids"] == ["good"] and len(batch["skipped"]) == 1
    assert re.search(problem, batch["skipped"][0][1]) and "skipping sample" in caplog.text


def test_image_without_placeholder_goes_first_like_llava(tmp_path, tok):
    """LLaVA's convention (its loader puts the image before the first human turn's text)."""
    good_png(tmp_path)
    record = {"id": "s", "image": "ok.png", "conversations": [{"from": "human", "value": "What colour is it?"},
                                                               TURNS[1]]}
    item = VLMDataset([record], tok, TRANSFORM, NUM_IMAGE_TOKENS, image_root=tmp_path)[0]
    with_marker = VLMDataset([{**record, "conversations": TURNS}], tok, TRANSFORM, NUM_IMAGE_TOKENS,
                             image_root=tmp_path)[0]
    assert item["input_ids"].tolist() == with_marker["input_ids"].tolist()
    assert item["input_ids"].tolist().count(tok.convert_tokens_to_ids("<image>")) == NUM_IMAGE_TOKENS


def test_malformed_json_list_names_file_and_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n {"id": "a", "conversations": []},\n {"id": "b", "conversations": [}\n]\n')
    with pytest.raises(SampleError, match=re.escape(f"{path}:3") + ".*malformed JSON"):
        read_llava_records(path)


def test_malformed_jsonl_line_raises_or_is_skipped(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, '{"id": "half-written", "conver', GOOD])
    with pytest.raises(SampleError, match=re.escape(f"{path}:2") + ".*malformed JSONL line 2"):
        read_llava_records(path)
    result = read_llava_records(path, on_error="skip")
    assert len(result.records) == 2 and result.skipped_ids == [f"{path}:2"]


def test_non_utf8_jsonl_line_raises_or_is_skipped(tmp_path):
    path = tmp_path / "data.jsonl"
    latin1 = json.dumps({"id": "cafe", "conversations": TURNS}).replace("red", "ros\u00e9").encode("latin-1")
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + latin1 + b"\n" + json.dumps(GOOD).encode() + b"\n")
    with pytest.raises(SampleError, match=re.escape(f"{path}:2") + ".*line 2 is not UTF-8 text \\(bytes e9"):
        read_llava_records(path)
    result = read_llava_records(path, on_error="skip")
    assert result.sources == [f"{path}:1", f"{path}:3"] and result.skipped_ids == [f"{path}:2"]


def test_non_utf8_json_list_names_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b'[\n{"id": "a", "conversations": []},\n{"id": "caf\xe9", "conversations": []}\n]\n')
    with pytest.raises(SampleError, match=re.escape(f"{path}:3") + ".*not UTF-8"):
        read_llava_records(path)


def test_sample_longer_than_max_length(tmp_path, tok):
    good_png(tmp_path)
    long = {"id": "long", "image": "ok.png", "conversations": TURNS}
    kwargs = dict(num_image_tokens=64, max_length=32, image_root=tmp_path)
    item = VLMDataset([long], tok, TRANSFORM, **kwargs)[0]  # truncation: drop (default)
    assert item["id"] == "long" and "over max_length=32" in item["skipped"] and "cut through an image" in item["skipped"]
    with pytest.raises(TruncationError, match="sample 'long'.*max_length=32"):
        VLMDataset([long], tok, TRANSFORM, truncation="raise", **kwargs)[0]


def test_duplicated_ids(tmp_path, tok):
    good_png(tmp_path)
    other = {**GOOD, "conversations": [TURNS[0], {"from": "gpt", "value": "blue"}]}
    # Exact copies are oversampling (easy-VQA's balanced split repeats samples): kept.
    path = write_jsonl(tmp_path / "copies.jsonl", [GOOD, GOOD])
    assert VLMDataset(read_llava_records(path), tok, TRANSFORM, NUM_IMAGE_TOKENS, image_root=tmp_path)[1]["id"] == "good"
    # The same id on a different record: an error before training, naming both lines ...
    path = write_jsonl(tmp_path / "clash.jsonl", [GOOD, other])
    with pytest.raises(SampleError, match=re.escape(f"sample 'good': 1 record(s) reuse the id") + ".*"
                       + re.escape(f"at {path}:2, differs from the one at {path}:1")):
        VLMDataset(read_llava_records(path), tok, TRANSFORM, NUM_IMAGE_TOKENS, image_root=tmp_path)
    # ... or the later copy skipped and counted.
    lenient = VLMDataset(read_llava_records(path), tok, TRANSFORM, NUM_IMAGE_TOKENS, image_root=tmp_path,
                         on_error="skip")
    assert "skipped" not in lenient[0]
    assert lenient[1]["skipped"] == f"id already used by a different record at {path}:1"


# --- a whole training run over a file full of the above: it finishes and counts them ---------


def test_training_run_survives_every_bad_input(experts, tiny_vqa, tmp_path):
    root = Path(tiny_vqa["root"])
    rows = json.loads(Path(tiny_vqa["train"]).read_text())[:8]
    bad_rows = []
    for make, _ in BAD_IMAGES:
        if make is decompression_bomb:
            continue  # covered above; writing it again only costs time
        bad_rows.append({"id": f"img-{make.__name__}", "image": str(tmp_path / make(tmp_path)), "conversations": TURNS})
    for i, (case, (record, _)) in enumerate(BAD_RECORDS.items()):
        bad_rows.append({**record, "id": f"rec-{i}"} if isinstance(record.get("id"), str) else record)
    lines = [json.dumps(r) for r in rows[:4]] + [json.dumps(r) for r in bad_rows] + ["{broken"]
    lines += [json.dumps(r) for r in rows[4:]]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    data = {**tiny_vqa, "train": str(path), "root": str(root)}
    summary = run(tiny_recipe(
        experts, data, str(tmp_path / "run"), "data.on_error=skip", "train.max_steps=3", "train.batch_size=16"))
    assert summary["steps"] == 3
    skipped = dict(summary["skipped"])
    assert len(skipped) == len(bad_rows) + 1
    assert {f"img-{m.__name__}" for m, _ in BAD_IMAGES if m is not decompression_bomb} <= set(skipped)
    assert f"{path}:{5 + len(bad_rows)}" in skipped  # the broken JSON line, by file:line


# --- recipe errors ----------------------------------------------------------------------------


def model_from(experts, tiny_vqa, tmp_path, *overrides):
    return model_for(tiny_recipe(experts, tiny_vqa, str(tmp_path / "run"), *overrides))


@pytest.mark.parametrize(
    "override, problem",
    [
        ("encoder.backend=timm", "unknown encoder backend 'timm'; valid encoder backends: hf, open_clip"),
        ("llm.name_or_path=/nonexistent/vicuna-7b", "model.llm.name_or_path='/nonexistent/vicuna-7b': no such file"),
        ("encoder.name=/nonexistent/clip", "model.encoder.name='/nonexistent/clip': no such file"),
        ("adapter.type=perceiver", "unknown adapter type 'perceiver'; valid adapter types: mlp, qformer, resampler"),
    ],
)
def test_unknown_expert_names(experts, tiny_vqa, tmp_path, override, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        model_from(experts, tiny_vqa, tmp_path, override)


def test_unknown_open_clip_model(experts, tiny_vqa, tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Q-99'"):
        model_from(experts, tiny_vqa, tmp_path, "encoder.backend=open_clip", "encoder.name=ViT-Q-99",
                   "encoder.pretrained=null")


@pytest.mark.parametrize(
    "override, suggestion",
    [("train.batch_szie=4", "batch_size"), ("data.max_lenght=64", "max_length"),
     ("encoder.feature_layr=-1", "feature_layer"), ("adapter.projetor=linear", "projector"),
     ("trian.lr=1", "train")],
)
def test_misspelt_key_suggests_the_closest(override, suggestion):
    with pytest.raises(RecipeError, match=f"did you mean '{suggestion}'"):
        load_recipe(REPO_ROOT / "recipes" / "easyvqa_align.yaml", [override])


def test_unknown_adapter_card():
    with pytest.raises(RecipeError, match="unknown adapter card 'mlp3x'; valid cards: .*mlp2x_gelu"):
        load_recipe(REPO_ROOT / "recipes" / "easyvqa_align.yaml", ["adapter=mlp3x"])


def test_adapter_width_that_does_not_match_the_encoder(experts, tiny_vqa, tmp_path):
    """A saved model refers to its frozen encoder by path; if that path now holds an encoder of
    another width, loading names the adapter file and both widths instead of a torch shape dump."""
    from transformers import CLIPVisionModel

    from seechat import load
    from seechat.experiments.tiny import tiny_clip_vision_config

    model = model_from(experts, tiny_vqa, tmp_path)
    model.save_pretrained(tmp_path / "saved")
    CLIPVisionModel(tiny_clip_vision_config(hidden_size=48)).save_pretrained(tmp_path / "wider_clip")
    meta = json.loads((tmp_path / "saved" / "seechat.json").read_text())
    assert "encoder" not in meta["stored"]  # a reference, not weights
    meta["model"]["encoder"]["name"] = str(tmp_path / "wider_clip")
    (tmp_path / "saved" / "seechat.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "saved" / "adapter.safetensors"))
                       + r" does not fit .* encoder gives 48-wide features .* saved \(64, 32\), needed \(64, 48\)"):
        load(tmp_path / "saved")


def test_readme_table_lists_every_case():
    """The bad-inputs table (docs/reliability.md) is checked against this file: every case here has a row."""
    readme = (REPO_ROOT / "docs" / "reliability.md").read_text()
    table = readme.split("### Bad inputs tried, how each ends", 1)[1].split("\n\n", 2)[1]
    names = [m.__name__.replace("_", " ") for m, _ in BAD_IMAGES] + list(BAD_RECORDS)
    names += ["grayscale", "RGBA", "palette", "CMYK", "16-bit", "1x1", "EXIF", "no <image>", "malformed JSON",
              "not UTF-8", "max_length", "duplicated id", "unknown encoder", "unknown LLM", "misspelt key",
              "adapter width"]
    missing_rows = [name for name in names if name.lower() not in table.lower()]
    assert not missing_rows, missing_rows
