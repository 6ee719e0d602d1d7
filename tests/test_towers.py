"""The vision towers users bring: each encoder's pixels are its own processor's, and
`feature_layer` means what it means in LLaVA (hidden_states[feature_layer], 0 = the embeddings).

Towers are tiny random-init models of the real config classes at the real input geometry
(CLIP ViT-L/14-336: 336 px, patch 14, shortest-edge resize + crop; SigLIP so400m: 384 px,
patch 14, squash; open_clip ViT-L-14 and ViT-bigG-14 built vision-only); nothing is downloaded.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import (AutoImageProcessor, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel,
                          SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel)

from seechat.data.images import load_image
from seechat.errors import UserError
from seechat.models.encoders import HFVisionEncoder, OpenCLIPVisionEncoder
from seechat.models.saved import read_meta
from seechat.tools.clip_convert import open_clip_to_clip
from seechat.tools.export import image_processor_for

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY_OPEN_CLIP = {"embed_dim": 32, "vision_cfg": {"width": 32, "layers": 2, "head_width": 16},
                  "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1}}
# preprocessor_config.json as the Hub checkpoints ship them (openai/clip-vit-large-patch14-336 in
# the legacy int format, google/siglip-so400m-patch14-384).
CLIP_336_PROCESSOR = {"crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                      "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3, "size": 336,
                      "image_mean": [0.48145466, 0.4578275, 0.40821073],
                      "image_std": [0.26862954, 0.26130258, 0.27577711]}
SIGLIP_384_PROCESSOR = {"do_normalize": True, "do_rescale": True, "do_resize": True, "resample": 3,
                        "image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
                        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                        "rescale_factor": 0.00392156862745098, "size": {"height": 384, "width": 384}}


def odd_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)

    def pixels(w, h, c):
        return rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)

    rgba = pixels(70, 45, 4)
    rgba[::3, :, 3] = 0  # transparent rows: composited onto white, never the colour stored under them
    return {"70x45": Image.fromarray(pixels(70, 45, 3)), "45x70": Image.fromarray(pixels(45, 70, 3)),
            "7x5": Image.fromarray(pixels(7, 5, 3)), "rgba": Image.fromarray(rgba, "RGBA"),
            "gray": Image.fromarray(pixels(45, 70, 1), "L"), "91x300": Image.fromarray(pixels(91, 300, 3))}


def hf_tower(tmp_path, arch: str, processor: dict | None):
    if arch == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(image_size=336, patch_size=14, **TINY))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(image_size=384, patch_size=14, **TINY))
    path = tmp_path / arch
    model.save_pretrained(path)
    if processor:
        (path / "preprocessor_config.json").write_text(json.dumps(processor))
    return path


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {"clip-vit-l-14-336": hf_tower(root, "clip", CLIP_336_PROCESSOR),
            "siglip-so400m-384": hf_tower(root, "siglip", SIGLIP_384_PROCESSOR)}


@pytest.mark.parametrize("tower", ["clip-vit-l-14-336", "siglip-so400m-384"])
def test_hf_pixels_equal_the_processors(towers, tower):
    encoder = HFVisionEncoder(str(towers[tower]), pretrained=True)
    processor = AutoImageProcessor.from_pretrained(towers[tower], backend="pil")
    for name, image in odd_images().items():
        ours = encoder.transform(load_image(image))
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert ours.shape == (3, encoder.image_size, encoder.image_size), name
        assert torch.equal(ours, theirs), name  # bit for bit, every image shape and mode


def test_siglip_squashes_clip_crops(towers):
    siglip = HFVisionEncoder(str(towers["siglip-so400m-384"]), pretrained=True)
    clip = HFVisionEncoder(str(towers["clip-vit-l-14-336"]), pretrained=True)
    # a left half red, right half blue image: squashed, both colours reach the edges
    image = Image.new("RGB", (70, 45), (255, 0, 0))
    image.paste((0, 0, 255), (35, 0, 70, 45))
    squashed = siglip.transform(image)
    assert squashed[0, :, 0].min() > 0.9 and squashed[2, :, -1].min() > 0.9  # (x - 0.5) / 0.5 of 1.0
    # the crop keeps the middle 336 of 523 columns; the left edge is still red, but a 7-px wide
    # stripe at the left of the original no longer reaches column 0
    stripe = Image.new("RGB", (70, 45), (0, 0, 0))
    stripe.paste((255, 255, 255), (0, 0, 7, 45))
    assert siglip.transform(stripe)[:, :, 0].min() > 0.9
    assert clip.transform(stripe)[:, :, 0].max() < -1.0  # black, normalised


def test_random_init_towers_get_their_architectures_processor():
    siglip = HFVisionEncoder(pretrained=False, arch="siglip", config={"image_size": 56, "patch_size": 14, **TINY})
    clip = HFVisionEncoder(pretrained=False, arch="clip", config={"image_size": 56, "patch_size": 14, **TINY})
    assert siglip.transform.config["image_processor_type"] == "SiglipImageProcessor"
    assert siglip.transform.config["size"] == {"height": 56, "width": 56} and not siglip.transform.config.get("do_center_crop")
    assert clip.transform.config["size"] == {"shortest_edge": 56} and clip.transform.config["crop_size"] == {"height": 56, "width": 56}
    # a saved model rebuilds the encoder from offline_config: the same processor settings
    rebuilt = HFVisionEncoder(**{k: v for k, v in siglip.offline_config().items() if k != "backend"})
    assert repr(rebuilt.transform) == repr(siglip.transform)


def test_processor_of_another_size_is_refused(tmp_path):
    path = hf_tower(tmp_path, "siglip", {**SIGLIP_384_PROCESSOR, "size": {"height": 224, "width": 224}})
    with pytest.raises(UserError, match=r"makes \(224, 224\) images, the tower reads 384x384"):
        HFVisionEncoder(str(path), pretrained=True)


def open_clip_encoder(name="ViT-L-14", preprocess=None, **kw):
    cfg = {**TINY_OPEN_CLIP, "vision_cfg": {**TINY_OPEN_CLIP["vision_cfg"], "image_size": 56, "patch_size": 14}}
    return OpenCLIPVisionEncoder(name, None, cfg, preprocess=preprocess, **kw), cfg


@pytest.mark.parametrize("mode, interpolation", [("shortest", "bicubic"), ("squash", "bilinear"), ("longest", "bicubic")])
def test_open_clip_pixels_equal_open_clips_preprocess(mode, interpolation):
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    encoder, cfg = open_clip_encoder(preprocess={"size": 56, "resize_mode": mode, "interpolation": interpolation,
                                                 "mean": mean, "std": std})
    kwargs = {k: v for k, v in cfg.items()}
    _, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-L-14", pretrained=None, image_resize_mode=mode, image_interpolation=interpolation,
        image_mean=mean, image_std=std, **kwargs)
    for name, image in odd_images().items():
        rgb = load_image(image)  # (open_clip would resize RGBA before dropping alpha; seechat composites first)
        ours, theirs = encoder.transform(rgb), preprocess(rgb)
        assert ours.shape == (3, 56, 56), name
        assert torch.equal(ours, theirs), name


def test_export_writes_the_towers_processor(towers, tmp_path):
    for tower, cls, crop in (("siglip-so400m-384", SiglipImageProcessor, False), ("clip-vit-l-14-336", CLIPImageProcessor, True)):
        encoder = HFVisionEncoder(str(towers[tower]), pretrained=True)
        processor = image_processor_for(SimpleNamespace(encoder=encoder))
        assert type(processor) is cls and bool(processor.do_center_crop) is crop, tower
        processor.save_pretrained(tmp_path / tower)
        again = AutoImageProcessor.from_pretrained(tmp_path / tower, backend="pil")
        for name, image in odd_images().items():
            assert torch.equal(again(images=image, return_tensors="pt")["pixel_values"][0], encoder.transform(image)), (tower, name)
    # an open_clip tower that squashes: a CLIPImageProcessor without crop; equal up to float order
    # (open_clip divides by 255, transformers multiplies by 1/255 in float64)
    encoder, _ = open_clip_encoder(preprocess={"size": 56, "resize_mode": "squash", "mean": (0.5,) * 3, "std": (0.5,) * 3})
    processor = image_processor_for(SimpleNamespace(encoder=encoder))
    assert type(processor) is CLIPImageProcessor and not processor.do_center_crop
    processor.save_pretrained(tmp_path / "oc")
    again = AutoImageProcessor.from_pretrained(tmp_path / "oc", backend="pil")
    for name, image in odd_images().items():
        diff = again(images=image, return_tensors="pt")["pixel_values"][0] - encoder.transform(load_image(image))
        assert diff.abs().max().item() < 1e-6, name
    longest, _ = open_clip_encoder(preprocess={"size": 56, "resize_mode": "longest"})
    with pytest.raises(ValueError, match="longest"):
        image_processor_for(SimpleNamespace(encoder=longest))


# --- feature_layer: LLaVA's hidden_states[feature_layer] -------------------------------------

LAYERS = [0, 1, 2, -1, -2, -3]  # 2-block towers: 0 = embeddings, 2 = -1 = the last block


@pytest.mark.parametrize("arch", ["clip", "siglip"])
def test_hf_feature_layer_is_llavas(arch):
    config = {"image_size": 28, "patch_size": 14, **TINY}
    torch.manual_seed(0)
    reference = HFVisionEncoder(pretrained=False, arch=arch, config=config).eval()
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        hidden = reference.tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        for layer in LAYERS:
            encoder = HFVisionEncoder(pretrained=False, arch=arch, config=config, feature_layer=layer)
            encoder.tower = reference.tower
            expected = hidden[layer][:, 1:] if arch == "clip" else hidden[layer]
            assert torch.equal(encoder(pixels), expected), layer
    for bad in (3, -4):
        with pytest.raises(ValueError, match=rf"feature_layer={bad} is out of range.*valid: -3\.\.2"):
            HFVisionEncoder(pretrained=False, arch=arch, config=config, feature_layer=bad)


@pytest.mark.parametrize("name", ["ViT-L-14", "ViT-bigG-14"])
def test_open_clip_feature_layer_is_llavas(name):
    torch.manual_seed(0)
    reference, _ = open_clip_encoder(name)
    reference.eval()
    config, state = open_clip_to_clip(reference.tower)  # the same weights as transformers' CLIP
    clip = CLIPVisionModel(config).eval()
    clip.load_state_dict(state, strict=True)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        hidden = clip(pixel_values=pixels, output_hidden_states=True).hidden_states
        for layer in LAYERS:
            for keep_cls in (False, True):
                encoder, _ = open_clip_encoder(name, feature_layer=layer, keep_cls=keep_cls)
                encoder.tower = reference.tower
                expected = hidden[layer] if keep_cls else hidden[layer][:, 1:]
                assert (encoder(pixels) - expected).abs().max().item() < 1e-5, (layer, keep_cls)


def test_saved_non_negative_feature_layer_keeps_its_layer(tmp_path):
    # seechat.json format 2 counted blocks from 0 (feature_layer 0 = block 0's output)
    meta = {"format": 2, "modes": {}, "model": {"encoder": {"feature_layer": 0}, "llm": {}},
            "stored": {"encoder_config": {"feature_layer": 1}}}
    (tmp_path / "seechat.json").write_text(json.dumps(meta))
    read = read_meta(tmp_path)
    assert read["model"]["encoder"]["feature_layer"] == 1 and read["stored"]["encoder_config"]["feature_layer"] == 2
    meta["model"]["encoder"]["feature_layer"] = -2
    (tmp_path / "seechat.json").write_text(json.dumps(meta))
    assert read_meta(tmp_path)["model"]["encoder"]["feature_layer"] == -2


# --- open_clip towers are built vision-only -----------------------------------------------

def test_open_clip_never_builds_the_text_tower(experts, monkeypatch):
    from safetensors.torch import load_file

    def refuse(*args, **kwargs):
        raise AssertionError("the text tower (or the whole CLIP) was built")

    for target in ("open_clip.model._build_text_tower", "open_clip.create_model", "open_clip.factory.create_model"):
        monkeypatch.setattr(target, refuse)
    # the fixture's checkpoint is a whole CLIP (text tower included): only visual.* is read
    encoder = OpenCLIPVisionEncoder(**{k: v for k, v in experts["open_clip_encoder"].items() if k != "backend"})
    state = encoder.tower.state_dict()
    assert not [k for k in state if "token_embedding" in k or k.startswith("text")]
    saved = load_file(experts["open_clip_encoder"]["pretrained"])
    visual = {k[len("visual."):]: v for k, v in saved.items() if k.startswith("visual.")}
    assert state.keys() == visual.keys() and all(torch.equal(state[k], visual[k]) for k in visual)
    # ViT-bigG-14's vision tower, random init: its shapes, and still no text tower
    big = OpenCLIPVisionEncoder("ViT-bigG-14", None, TINY_OPEN_CLIP)
    assert big.grid == (16, 16) and len(big.tower.transformer.resblocks) == 2


# --- the resampler's 2-D sin-cos positions: the closed form at any grid ----------------------

def closed_form(dim: int, side: int, grid: int) -> torch.Tensor:
    """sin/cos of p * 10000^(-i/k) per axis, p the cell centre on the query grid (scalar math)."""
    import math

    k = dim // 4
    rows = []
    for y in range(side):
        for x in range(side):
            row = []
            for p in ((y + 0.5) * grid / side - 0.5, (x + 0.5) * grid / side - 0.5):
                angles = [p * 10000 ** (-i / k) for i in range(k)]
                row += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
            rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def test_resampler_positions_are_the_closed_form_at_any_grid():
    from seechat.models.adapters.resampler import ResamplerAdapter

    adapter = ResamplerAdapter(in_dim=24, out_dim=16, grid_size=4, embed_dim=16, num_heads=2).eval()
    native = closed_form(16, 4, 4)
    assert (adapter.pos_embed - native).abs().max().item() < 1e-6  # queries: integer cells 0..3
    assert (adapter.key_positions(4) - native).abs().max().item() < 1e-6
    for side in (6, 7, 2):  # keys of other patch grids, in the query grid's coordinates
        assert (adapter.key_positions(side) - closed_form(16, side, 4)).abs().max().item() < 1e-6, side
    features = torch.randn(2, 1 + 7 * 7, 24)  # a CLS token, then a 7x7 grid
    assert adapter(features).shape == (2, 16, 16)
    # saved resampler files hold no table (never did): they load strictly, same outputs
    state = adapter.state_dict()
    assert not [k for k in state if "pos_embed" in k or "table" in k]
    again = ResamplerAdapter(in_dim=24, out_dim=16, grid_size=4, embed_dim=16, num_heads=2).eval()
    again.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(again(features), adapter(features))


# --- SigLIP 2 (NaFlex): a fixed square grid -----------------------------------------------

def test_siglip2_naflex_tower_on_a_fixed_grid(tmp_path):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    from seechat.tools.clip_convert import NotExpressibleError, vision_tower_for_export

    tower = Siglip2VisionModel(Siglip2VisionConfig(patch_size=16, num_patches=16, **TINY)).eval()
    tower.save_pretrained(tmp_path / "siglip2")
    (tmp_path / "siglip2" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Siglip2ImageProcessor", "patch_size": 16, "max_num_patches": 64,
         "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    encoder = HFVisionEncoder(str(tmp_path / "siglip2"), pretrained=True, feature_layer=-1).eval()
    assert encoder.image_size == 128 and encoder.grid == (8, 8) and encoder.num_patches == 64
    processor = AutoImageProcessor.from_pretrained(tmp_path / "siglip2", backend="pil")
    rng = np.random.default_rng(1)
    # NaFlex gives a square image the full 8x8 grid: there, its patches are ours exactly
    for side in (7, 70, 300):
        image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        theirs = processor(images=image, return_tensors="pt")
        assert theirs["spatial_shapes"].tolist() == [[8, 8]] and theirs["pixel_attention_mask"].all()
        pixels = encoder.transform(image).unsqueeze(0)
        from seechat.models.encoders.hf import _patches

        assert torch.equal(_patches(pixels, 16)["pixel_values"], theirs["pixel_values"]), side
        with torch.no_grad():
            expected = tower(**theirs, output_hidden_states=True).hidden_states[-1]
            assert (encoder(pixels) - expected).abs().max().item() < 1e-5
    # a 70x45 image: NaFlex keeps the aspect (another grid); seechat squashes to 8x8 (documented)
    wide = processor(images=Image.new("RGB", (70, 45)), return_tensors="pt")["spatial_shapes"].tolist()
    assert wide != [[8, 8]]
    with pytest.raises(NotExpressibleError, match="Siglip2"):
        vision_tower_for_export(encoder)
