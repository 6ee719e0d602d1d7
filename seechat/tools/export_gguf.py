"""Export a stitched seechat model to GGUF for llama.cpp and Ollama (`seechat export --to gguf
OUT/`), written with the `gguf` package from the GGUF format (nothing of llama.cpp's converter):

  OUT/model-<type>.gguf   the LM (llama.cpp architecture `qwen2`) with its tokenizer and chat template
  OUT/mmproj-<type>.gguf  the vision tower + projector, read by llama.cpp's mtmd/clip (`clip`
                          architecture, projector type `mlp`: linear -> GELU -> linear)
  OUT/Modelfile           `ollama create NAME -f OUT/Modelfile`

<type> is f32, f16 or q8_0 (`--gguf-type`; q8_0 quantises the LM's matrices, the mmproj stays f16).
What maps: a transformers SigLIP tower (no CLS token), the `mlp2x_gelu` projector, a Qwen2 LM
with a byte-level BPE tokenizer. What does not, each a `NotExpressibleError` naming the part: a
CLS token (llama.cpp's llava graph appends CLS after the patches and then drops the first
patch, llama.cpp issue 25814, so a CLIP tower would answer differently there), pixel shuffle,
other projectors and adapters, image boundary tokens, other LM architectures.

Run it with llama.cpp's `llama-mtmd-cli -m OUT/model-f16.gguf --mmproj OUT/mmproj-f16.gguf
--image x.png -p "..."`, or llama-cpp-python's `MTMDChatHandler` (docs/serving.md).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from seechat.models.base import SeeChatVLM
from seechat.tools.clip_convert import NotExpressibleError
from seechat.tools.export import EXPORT_MARKER, flattening_template

GGUF_TYPES = ("f32", "f16", "q8_0")
MEDIA_MARKER = "<__media__>"  # where mtmd puts an image's embeddings

# llama-cpp-python's MTMDChatHandler hands images to the chat template as text parts holding the
# media marker: images become "<marker>\n" before the text, as in the Llava export.
_FLATTEN = flattening_template(MEDIA_MARKER, marker_text_is_image=True)


def _np(t: torch.Tensor, kind: str):
    """A tensor as numpy in the file's type (1-D tensors, norms and biases, stay f32)."""
    import gguf

    a = t.detach().float().cpu().numpy()
    if a.ndim == 1 or kind == "f32":
        return a.astype(np.float32), None
    if kind == "f16":
        return a.astype(np.float16), None
    if a.shape[-1] % 32:  # q8_0 blocks are 32 wide
        return a.astype(np.float16), None
    return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def _add(writer, name: str, t: torch.Tensor, kind: str) -> None:
    data, qtype = _np(t, kind)
    writer.add_tensor(name, data, raw_dtype=qtype)


def _file_type(kind: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]


def check_gguf_expressible(model: SeeChatVLM) -> None:
    """Raise NotExpressibleError naming the first part llama.cpp cannot run as seechat does."""
    from seechat.data.tokenization import boundary_ids
    from seechat.models.adapters.mlp import MLPAdapter
    from seechat.models.encoders.hf import HFVisionEncoder

    encoder, adapter = getattr(model, "encoder", None), getattr(model, "adapter", None)
    if encoder is None or adapter is None:
        raise NotExpressibleError(f"{type(model).__name__} has no vision encoder + adapter; GGUF export covers stitched models")
    if not isinstance(encoder, HFVisionEncoder) or encoder.has_cls:
        raise NotExpressibleError(
            f"encoder {type(encoder).__name__} ({getattr(encoder.tower.config, 'model_type', '?')}): GGUF export "
            "needs a transformers SigLIP tower; llama.cpp's llava graph places a CLS token after the patches and "
            "drops the first patch (llama.cpp issue 25814), so a CLIP/open_clip tower would answer differently there")
    act = encoder.tower.config.hidden_act
    if act not in ("gelu_pytorch_tanh", "quick_gelu"):
        raise NotExpressibleError(f"encoder hidden_act {act!r}: llama.cpp's clip has gelu (tanh) and quick_gelu")
    if not isinstance(adapter, MLPAdapter) or adapter.projector != "mlp2x_gelu" or adapter.pixel_shuffle > 1:
        what = (f"pixel_shuffle={adapter.pixel_shuffle}" if isinstance(adapter, MLPAdapter) and adapter.pixel_shuffle > 1
                else f"adapter {type(adapter).__name__} {getattr(adapter, 'projector', '')}".strip())
        raise NotExpressibleError(f"{what}: llama.cpp's 'mlp' projector is linear -> GELU -> linear "
                                  "(adapter mlp2x_gelu, pixel_shuffle 1)")
    if boundary_ids(model.tokenizer) is not None:
        raise NotExpressibleError("the tokenizer wraps images in boundary tokens (llm.image_boundary_tokens), "
                                  "which llama.cpp's mtmd does not write for an 'mlp' projector")
    arch = model.base_llm.config.model_type
    if arch != "qwen2":
        raise NotExpressibleError(f"LM architecture {arch!r}: GGUF export writes llama.cpp's 'qwen2' only")


# Qwen2's split regex (what transformers' Qwen2Tokenizer sets): llama.cpp's "qwen2" pre-tokenizer.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(tok_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer regex."""
    pre = tok_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0]["pattern"].get("Regex") == _QWEN2_SPLIT
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex")):
        return "qwen2"
    raise NotExpressibleError(f"tokenizer pre_tokenizer {pre.get('type')!r}: GGUF export maps byte-level BPE "
                              "with GPT-2's or Qwen2's split regex only")


def _write_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    import gguf

    tok_json = json.loads(tokenizer.backend_tokenizer.to_str())
    if tok_json["model"]["type"] != "BPE":
        raise NotExpressibleError(f"tokenizer model {tok_json['model']['type']!r}: GGUF export maps BPE only")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tok_json))
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in tok_json.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):  # the embedding may have more rows than the tokenizer has tokens
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(False)  # seechat's prompts carry what the chat template writes, no more
    writer.add_chat_template(_FLATTEN + tokenizer.chat_template)


def write_lm_gguf(model: SeeChatVLM, path: Path, kind: str) -> None:
    """The Qwen2 LM (merged, full precision source) as llama.cpp's `qwen2` architecture."""
    import gguf

    llm = model.base_llm
    cfg = llm.config
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("seechat LM")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(_file_type(kind))
    embed = llm.get_input_embeddings().weight
    _write_tokenizer(writer, model.tokenizer, embed.shape[0])
    state = llm.get_decoder().state_dict()
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    _add(writer, "token_embd.weight", embed, kind)
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in names.items():
            for leaf in ("weight", "bias"):
                key = f"layers.{i}.{ours}.{leaf}"
                if key in state:
                    _add(writer, f"blk.{i}.{theirs}.{leaf}", state[key], kind)
    _add(writer, "output_norm.weight", state["norm.weight"], kind)
    if not getattr(cfg, "tie_word_embeddings", False):
        _add(writer, "output.weight", llm.get_output_embeddings().weight, kind)
    _finish(writer)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _hidden_index(encoder) -> int:
    """Which hidden state the encoder hands on (0 = embeddings output, k = after k blocks)."""
    if hasattr(encoder, "hidden_index"):
        return int(encoder.hidden_index)
    return int(encoder.layer_index) + 1


def _image_stats(model: SeeChatVLM) -> tuple[list[float], list[float]]:
    transform = model.encoder.transform
    config = dict(getattr(transform, "config", None) or {})
    for step in getattr(transform, "transforms", []):  # a torchvision Compose
        if type(step).__name__ == "Normalize":
            config = {"image_mean": list(step.mean), "image_std": list(step.std)}
    mean, std = config.get("image_mean"), config.get("image_std")
    if mean is None or std is None:
        raise NotExpressibleError(f"the encoder's transform {model.encoder.transform} names no image_mean/image_std")
    return [float(x) for x in mean], [float(x) for x in std]


def write_mmproj_gguf(model: SeeChatVLM, path: Path, kind: str) -> None:
    """The SigLIP tower + mlp2x_gelu projector as clip.cpp's `mlp` projector (no post-LN: seechat,
    like Llava, reads the hidden states before it)."""
    import gguf

    encoder, adapter = model.encoder, model.adapter
    cfg = encoder.tower.config
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name("seechat vision projector")
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type("mlp")
    writer.add_file_type(_file_type(kind))
    writer.add_uint32("clip.vision.image_size", cfg.image_size)
    writer.add_uint32("clip.vision.patch_size", cfg.patch_size)
    writer.add_uint32("clip.vision.embedding_length", cfg.hidden_size)
    writer.add_uint32("clip.vision.feed_forward_length", cfg.intermediate_size)
    writer.add_uint32("clip.vision.block_count", cfg.num_hidden_layers)
    writer.add_uint32("clip.vision.projection_dim", model.base_llm.config.hidden_size)
    writer.add_uint32("clip.vision.attention.head_count", cfg.num_attention_heads)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", cfg.layer_norm_eps)
    mean, std = _image_stats(model)
    writer.add_array("clip.vision.image_mean", mean)
    writer.add_array("clip.vision.image_std", std)
    writer.add_bool("clip.use_gelu", cfg.hidden_act == "gelu_pytorch_tanh")
    # hidden_states[k] (0 = embeddings): llama.cpp's feature layers count the same way.
    writer.add_array("clip.vision.feature_layer", [_hidden_index(encoder)])
    tower = encoder.tower.vision_model if hasattr(encoder.tower, "vision_model") else encoder.tower
    emb = tower.embeddings
    _add(writer, "v.patch_embd.weight", emb.patch_embedding.weight, kind)
    _add(writer, "v.patch_embd.bias", emb.patch_embedding.bias, kind)
    _add(writer, "v.position_embd.weight", emb.position_embedding.weight, kind)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
             "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
    for i, layer in enumerate(tower.encoder.layers[: _hidden_index(encoder)]):
        for ours, theirs in names.items():
            module = layer.get_submodule(ours)
            _add(writer, f"v.blk.{i}.{theirs}.weight", module.weight, kind)
            _add(writer, f"v.blk.{i}.{theirs}.bias", module.bias, kind)
    first, second = [m for m in adapter.proj if isinstance(m, torch.nn.Linear)]
    for index, linear in ((0, first), (2, second)):
        _add(writer, f"mm.{index}.weight", linear.weight, kind)
        _add(writer, f"mm.{index}.bias", linear.bias, kind)
    _finish(writer)


def modelfile(lm_name: str, mmproj_name: str, tokenizer) -> str:
    """An Ollama Modelfile: the two GGUF files, the chat template (ChatML here) and greedy answers."""
    eos = tokenizer.eos_token
    return (
        f"# ollama create seechat -f Modelfile   (then: ollama run seechat \"what color is the shape? ./shape.png\")\n"
        f"FROM ./{lm_name}\n"
        f"FROM ./{mmproj_name}\n"
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
        '{{ end }}<|im_start|>assistant\n"""\n'
        f'PARAMETER stop "{eos}"\n'
        "PARAMETER temperature 0\n"
    )


def export_gguf(model_dir: str | os.PathLike, out_dir: str | os.PathLike, kind: str = "f16") -> Path:
    """Export the saved model at `model_dir` to `out_dir`: model-<kind>.gguf, mmproj-<kind>.gguf
    (f16 when kind is q8_0), Modelfile. Raises NotExpressibleError before writing anything for
    a model llama.cpp cannot run as seechat does."""
    from seechat.errors import UserError
    from seechat.models.saved import writing_dir
    from seechat.tools.merge import load_unquantised, merge_lora

    if kind not in GGUF_TYPES:
        raise UserError(f"--gguf-type {kind!r}; valid: {', '.join(GGUF_TYPES)}")
    model = load_unquantised(model_dir)
    check_gguf_expressible(model)
    merge_lora(model)
    lm_name, mm_kind = f"model-{kind}.gguf", ("f16" if kind == "q8_0" else kind)
    mm_name = f"mmproj-{mm_kind}.gguf"
    with writing_dir(out_dir, EXPORT_MARKER) as out, torch.no_grad():
        write_lm_gguf(model, out / lm_name, kind)
        write_mmproj_gguf(model, out / mm_name, mm_kind)
        (out / "Modelfile").write_text(modelfile(lm_name, mm_name, model.tokenizer))
        (out / EXPORT_MARKER).write_text(json.dumps(
            {"source": str(model_dir), "format": "gguf", "type": kind, "lm": lm_name, "mmproj": mm_name,
             "image_tokens": model.num_image_tokens}, indent=2))
    return Path(out_dir)


def export_gguf_command(model_dir: str, out_dir: str, kind: str) -> int:
    """`seechat export --to gguf`."""
    out = export_gguf(model_dir, out_dir, kind)
    meta = json.loads((out / EXPORT_MARKER).read_text())
    print(f"exported {model_dir} to {out} (gguf {kind}): llama-mtmd-cli -m {out / meta['lm']} --mmproj "
          f"{out / meta['mmproj']} --image IMAGE -p QUESTION, or ollama create NAME -f {out / 'Modelfile'}")
    return 0
