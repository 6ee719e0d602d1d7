"""seechat's data path, one step per module, each callable on a single sample:

    readers      files / HF datasets  -> raw records
    schema       raw record           -> canonical sample      (normalize_sample)
    template     canonical sample     -> rendered chat text + assistant spans
    tokenization rendered text        -> input_ids + labels, <image> expanded
    images       image reference      -> RGB PIL image
    dataset      raw record           -> model-ready item (all of the above, in DataLoader workers)
    collate      items                -> padded batch
    sampler      lengths              -> length-grouped index order
    from_recipe  a recipe's data section -> dataset (build_dataset)
"""
from seechat.data.collate import VLMCollator
from seechat.data.dataset import IterableVLMDataset, SampleEncoder, VLMDataset
from seechat.data.images import load_image, resolve_image_path
from seechat.data.readers import (
    ReadResult,
    iter_llava_records,
    load_hf_dataset,
    read_llava_json,
    read_llava_records,
)
from seechat.data.sampler import LengthGroupedSampler
from seechat.data.schema import SampleError, normalize_sample
from seechat.data.template import TemplateError, render_conversation, render_prompt, to_chat_messages
from seechat.data.tokenization import (
    IGNORE_INDEX,
    TruncationError,
    check_tokenizer,
    encode_prompt,
    tokenize_conversation,
)

__all__ = [
    "IGNORE_INDEX",
    "IterableVLMDataset",
    "LengthGroupedSampler",
    "ReadResult",
    "SampleEncoder",
    "SampleError",
    "TemplateError",
    "TruncationError",
    "VLMCollator",
    "VLMDataset",
    "check_tokenizer",
    "encode_prompt",
    "iter_llava_records",
    "load_hf_dataset",
    "load_image",
    "normalize_sample",
    "read_llava_json",
    "read_llava_records",
    "render_conversation",
    "render_prompt",
    "resolve_image_path",
    "to_chat_messages",
    "tokenize_conversation",
]
