"""A pretrained text LM grown into a native one: its vocabulary extended by the image codes.

`model.native.init_from` names the text LM (the stitched recipes' own, e.g. the demo's). Its
first `keep` rows - the ids of its tokenizer as saved, which the LM was trained on - stay
bit-identical; everything after them (seechat's `<image>`/boundary/pad tokens, then one row per
code) starts from the statistics of those trained rows: a draw from the Gaussian with their mean
and covariance (the diagonal when the covariance is singular), so a new row has the scale and the
correlations of a real one instead of an initialiser's (Janus, Show-o and Anole all grow a
pretrained text LM like this). transformers' `mean_resizing` draws from the same Gaussian with the
covariance scaled by 1e-9, which makes a thousand code rows nearly one vector: the LM could not
tell the codes apart on its first steps. The head is treated the same way (tied: it is the
embedding). The draw is seeded, so a recipe builds the same model every time.

`model.native.code_init_share` (0 by default) gives the code rows the codebook's geometry: that
share of each row's variance lies along a random linear map of the code's standardised quantised
vector (`VQTokenizer.code_vectors`), so neighbouring codes start as neighbours.

`model.native.code_word_share` (0 by default) starts each code where the words it stands for
are: `native_prepare` counts, over the training images, how often each code occurs in an image
of each color and shape (`VQTokenizer.code_words`: the corpus' describing answers, what the
stitched vision tower is pretrained on), and the code row moves that share of the way to the
weighted mean of those words' rows. The stitched paths' align stage learns the same map (tower
features onto caption words); here it is counted, not learned.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from seechat.models.pretrained import from_pretrained


def trained_rows(name_or_path: str, tokenizer_source: str, trust_remote_code: bool = False) -> int:
    """How many leading rows of the saved LM hold trained text ids: the saved tokenizer's length,
    or the LM's vocabulary if smaller. Rows a checkpoint pads its vocabulary with (Qwen2.5:
    151,665 ids in 151,936 rows) were never trained as anything and are not kept."""
    config = from_pretrained(AutoConfig.from_pretrained, name_or_path, "model.native.init_from", trust_remote_code)
    rows = config.get_text_config().vocab_size
    base = from_pretrained(AutoTokenizer.from_pretrained, tokenizer_source, "model.llm.tokenizer", trust_remote_code)
    return min(rows, len(base))


@torch.no_grad()
def statistical_rows(weight: torch.Tensor, n: int, generator: torch.Generator,
                     features: torch.Tensor | None = None, share: float = 0.0) -> torch.Tensor:
    """`n` rows drawn from N(mean, cov) of `weight`'s rows ([V, D]); diagonal if cov is singular.
    With `features` ([m, k], m <= n, e.g. each code's quantised vector), a `share` of the variance
    of each of the last m rows lies along a random linear map of the standardised features: rows
    of similar codes start similar, with the same marginal statistics."""
    x = weight.detach().double()
    mean = x.mean(0)
    centered = x - mean
    cov = centered.T @ centered / max(x.shape[0] - 1, 1)
    chol, info = torch.linalg.cholesky_ex(cov)

    def randn(rows: int) -> torch.Tensor:
        return torch.randn(rows, x.shape[1], generator=generator, dtype=torch.float64, device="cpu")

    if features is not None and share > 0:  # draws: the shaped rows' noise, the map, then the rest
        f = features.detach().double().cpu()
        own = randn(f.shape[0])
        proj = randn(f.shape[1]) / f.shape[1] ** 0.5
        z = (f - f.mean(0)) / f.std(0).clamp_min(1e-12)
        noise = torch.cat([randn(n - f.shape[0]), share ** 0.5 * (z @ proj) + (1 - share) ** 0.5 * own])
    else:
        noise = randn(n)
    noise = noise.to(x.device)
    if int(info) == 0:
        rows = mean + noise @ chol.T
    else:  # fewer trained rows than dimensions (tiny LMs): per-dimension std
        rows = mean + noise * centered.std(0, unbiased=x.shape[0] > 1)
    return rows.to(weight.dtype)


@torch.no_grad()
def extend_vocabulary(llm: PreTrainedModel, keep: int, vocab_size: int, seed: int = 0,
                      code_features: torch.Tensor | None = None, share: float = 0.0,
                      code_words: tuple[list[list[int]], torch.Tensor] | None = None, word_share: float = 0.0) -> None:
    """Keep the first `keep` rows of the embedding (and untied head), grow both to `vocab_size`
    and fill the new rows from the kept rows' statistics (module docstring); the last rows are the
    codes (vocab.CodeVocab), shaped by `code_features` at `share`. With `code_words` (each word's
    token ids, and a [codes, words] weight matrix: `VQTokenizer.code_words`) each code row moves
    `word_share` of the way to the weighted mean of its words' rows (codes with no weight stay). In place."""
    if not 0 < keep <= vocab_size:
        raise ValueError(f"extend_vocabulary: keep={keep} must lie in (0, vocab_size={vocab_size}]")
    llm.resize_token_embeddings(keep, mean_resizing=False)  # drops padding rows and seechat's tokens
    llm.resize_token_embeddings(vocab_size, mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    embedding, head = llm.get_input_embeddings().weight, llm.get_output_embeddings()
    tied = head is None or head.weight is embedding
    for weight in (embedding,) if tied else (embedding, head.weight):
        weight[keep:] = statistical_rows(weight[:keep], vocab_size - keep, generator, code_features, share)
        if code_words is not None and word_share > 0:
            word_ids, weights = code_words
            words = torch.stack([weight[ids].mean(0) for ids in word_ids])  # [words, D]
            target = weights.to(weight.dtype) @ words  # [codes, D]
            known = weights.sum(1) > 0
            codes = weight[vocab_size - len(weights):]
            codes[known] = (1 - word_share) * codes[known] + word_share * target[known]
    if not tied and getattr(head, "bias", None) is not None:
        head.bias[keep:] = head.bias[:keep].mean()
