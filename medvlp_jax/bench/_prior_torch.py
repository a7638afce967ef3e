"""PRIOR's losses in PyTorch in the released code's loop form: Python loops over the reports
(and over each report's sentences for the sentence embeddings), each report seen through its
real sentences only, one scipy Hungarian matching per report, autograd for the gradients.

An independent re-derivation from the method's description (../shared/methods.md, PRIOR), not
our JAX code: the reference of tests/test_prior_losses.py and the other side of
`python -m medvlp_jax.bench prior`. Weights are plain tensors (a kernel `[in, out]` as in
Flax, so `x @ kernel + bias`); `torch_heads` converts PRIOR's head parameters.
(The leading underscore keeps it out of the `bench` subcommands.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

Tensor = torch.Tensor
# The six local cross-attention projections: (query, key, value) x (image, text).
LOCAL_PROJECTIONS = ("qi", "ki", "vi", "qt", "kt", "vt")
_FLAX_PROJECTIONS = {
    "qi": "local_attention_query_image",
    "ki": "local_attention_key_image",
    "vi": "local_attention_value_image",
    "qt": "local_attention_query_text",
    "kt": "local_attention_key_text",
    "vt": "local_attention_value_text",
}


def linear(kernel: Tensor, bias: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """x [..., in] -> x @ kernel (+ bias) [..., out]."""
    return lambda x: x @ kernel if bias is None else x @ kernel + bias


def mlp(first: Callable, second: Callable) -> Callable[[Tensor], Tensor]:
    """The SimSiam predictor: second(relu(first(x)))."""
    return lambda x: second(F.relu(first(x)))


def symmetric_infonce(a: Tensor, b: Tensor, scale: Tensor | float) -> Tensor:
    """`[]` mean of CE(scale cos(a, b), diag) row-wise and column-wise; a, b [n, D]."""
    za, zb = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    labels = torch.arange(a.shape[0])
    return 0.5 * (
        F.cross_entropy(scale * zb @ za.T, labels) + F.cross_entropy(scale * za @ zb.T, labels)
    )


def local_losses(
    images: Tensor,
    sentences: Sequence[Tensor],
    proj: dict[str, Callable],
    predict: Callable,
    scale: Tensor | float,
) -> tuple[Tensor, Tensor]:
    """(L_li, L_lt), one report at a time.

    images `[B, N, D]` patch features; `sentences[b]` `[n_b, D]` report b's real sentences
    (n_b may be 0); proj: LOCAL_PROJECTIONS -> callables; predict: the SimSiam predictor.
    L_li is the mean over the reports with a sentence, L_lt the mean over all reports (0 for a
    report with fewer than two sentences).
    """
    image_losses, text_losses = [], []
    for img, text in zip(images, sentences, strict=True):
        n, d = text.shape
        text_loss = torch.zeros(())
        if n:
            a1 = torch.sigmoid(proj["qt"](text) @ proj["ki"](img).T / math.sqrt(d))
            c_t = a1 @ proj["vi"](img)
            a2 = torch.sigmoid(proj["qi"](img) @ proj["kt"](text).T / math.sqrt(d))
            c_i = a2 @ proj["vt"](text)
            cos = lambda p, z: F.cosine_similarity(p, z.detach(), dim=-1).mean()
            image_losses.append(-0.5 * (cos(predict(img), c_i) + cos(predict(c_i), img)))
            text_loss = symmetric_infonce(text, c_t, scale)
        text_losses.append(text_loss)
    return torch.stack(image_losses).mean(), torch.stack(text_losses).mean()


def quantization_loss(q: Tensor, x: Tensor) -> Tensor:
    """L_q = mean |q - x| over rows [M, D] (no stop-gradient)."""
    return (q - x).abs().mean()


def prototype_kl(target: Tensor, pred: Tensor, codebook: Tensor) -> Tensor:
    """KL(softmax(target E^T) || softmax(pred E^T)) summed over prototypes, mean over the
    rows [M, D] (the released call: kl_div on log-probabilities, batchmean, log_target)."""
    return F.kl_div(
        F.log_softmax(pred @ codebook.T, -1),
        F.log_softmax(target @ codebook.T, -1),
        reduction="batchmean",
        log_target=True,
    )


def sentence_embeddings(tokens: Tensor, sentence_ids: np.ndarray, count: int) -> Tensor:
    """One report: tokens [T, E], sentence_ids [T] (-1: none) -> [count, E], sentence by
    sentence the mean of its tokens."""
    rows = [tokens[torch.from_numpy(sentence_ids == s)].mean(0) for s in range(count)]
    return torch.stack(rows) if rows else tokens[:0]


def gumbel_softmax(logits: Tensor, tau: float, noise: Tensor) -> Tensor:
    """Soft Gumbel-softmax with the given Gumbel(0, 1) `noise` (so both sides draw alike)."""
    return F.softmax((logits + noise) / tau, dim=-1)


def attention_pool(x: Tensor, pool: dict[str, Tensor]) -> Tensor:
    """One report [n, E] (n >= 1) -> [E]: the mean of its rows, prepended, attends over the
    mean and the rows with multi-head attention (kernels [E, H, K], out [H, K, E])."""
    seq = torch.cat([x.mean(0, keepdim=True), x])
    q = torch.einsum("d,dhk->hk", seq[0], pool["query_kernel"]) + pool["query_bias"]
    k = torch.einsum("td,dhk->thk", seq, pool["key_kernel"]) + pool["key_bias"]
    v = torch.einsum("td,dhk->thk", seq, pool["value_kernel"]) + pool["value_bias"]
    att = torch.softmax(torch.einsum("hk,thk->ht", q, k) / math.sqrt(q.shape[-1]), dim=-1)
    y = torch.einsum("ht,thk->hk", att, v)
    return torch.einsum("hk,hke->e", y, pool["out_kernel"]) + pool["out_bias"]


def match(slots: Tensor, targets: Tensor) -> Tensor:
    """One report: slots [Q, E], targets [n, E] (n <= Q) -> [n, E], target j's slot under the
    minimum-L1 assignment (scipy on the detached cost)."""
    cost = torch.cdist(slots.detach(), targets.detach(), p=1).numpy()
    rows, cols = linear_sum_assignment(cost)
    return slots[torch.from_numpy(rows[np.argsort(cols)])]


def torch_heads(params: dict) -> dict:
    """PRIOR's head parameters (Flax tree of numpy arrays: local_attention_*, predictor,
    text_pool, codebook, log_scale, local_log_scale) -> {name: float32 leaf tensor with
    requires_grad}, flat: 'qi_kernel', 'p1_bias', 'pool_query_kernel', 'codebook', ..."""
    flat = {"codebook": params["codebook"]}
    flat.update(log_scale=params["log_scale"], local_log_scale=params["local_log_scale"])
    for short, name in _FLAX_PROJECTIONS.items():
        flat.update({f"{short}_{k}": v for k, v in params[name].items()})
    for short, name in (("p1", "fc0"), ("p2", "fc1")):
        flat.update({f"{short}_{k}": v for k, v in params["predictor"][name].items()})
    for part, leaves in params["text_pool"]["attn"].items():
        flat.update({f"pool_{part}_{k}": v for k, v in leaves.items()})
    return {k: torch.tensor(np.asarray(v, np.float32), requires_grad=True) for k, v in flat.items()}


def prior_losses(
    inputs: dict[str, Tensor],
    sentence_ids: np.ndarray,
    counts: Sequence[int],
    heads: dict[str, Tensor],
    noise: dict[str, Tensor],
    *,
    tau: float,
    weights: dict[str, float],
    max_scale: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PRIOR's stage-3 loss set (every term), loop form: (weighted total, {term: value}).

    inputs: local [B, N, E], global_image [B, E], tokens [B, T, E] (projected token
    features), slots [B, Q, E], recon and image [B, H, W, C]. sentence_ids [B, T] (numpy, -1:
    none), counts[b] >= 1 sentences of report b. heads: `torch_heads`. noise: Gumbel noise
    'sentences' [B, S, K] for the bank, 'slots' [B, Q, K] for the matched slots (row j: the
    slot matched to sentence j). weights: {term: weight} for the terms of
    `medvlp_jax.methods.prior.method.TERMS`. max_scale: clamp of both scales (None: none).
    """
    codebook = heads["codebook"]
    proj = {k: linear(heads[f"{k}_kernel"], heads[f"{k}_bias"]) for k in LOCAL_PROJECTIONS}
    predict = mlp(*(linear(heads[f"{k}_kernel"], heads[f"{k}_bias"]) for k in ("p1", "p2")))
    pool = {k[len("pool_") :]: v for k, v in heads.items() if k.startswith("pool_")}
    scale, local_scale = (heads[k].exp() for k in ("log_scale", "local_log_scale"))
    if max_scale is not None:
        scale, local_scale = scale.clamp(max=max_scale), local_scale.clamp(max=max_scale)

    raw, protos, matched = [], [], []
    for b, n in enumerate(counts):
        raw.append(sentence_embeddings(inputs["tokens"][b], sentence_ids[b], n))
        weights_b = gumbel_softmax(raw[b] @ codebook.T, tau, noise["sentences"][b, :n])
        protos.append(weights_b @ codebook)
        matched.append(match(inputs["slots"][b], protos[b]))
    reports = torch.stack([attention_pool(p, pool) for p in protos])
    generated = []
    for b, n in enumerate(counts):
        weights_b = gumbel_softmax(matched[b] @ codebook.T, tau, noise["slots"][b, :n])
        generated.append(attention_pool(weights_b @ codebook, pool))
    local_image, local_text = local_losses(inputs["local"], protos, proj, predict, local_scale)
    terms = {
        "global": symmetric_infonce(reports, inputs["global_image"], scale),
        "local_image": local_image,
        "local_text": local_text,
        "proto": quantization_loss(torch.cat(protos), torch.cat(raw)),
        "image_recon": (inputs["recon"] - inputs["image"]).abs().mean(),
        "spg": (torch.cat(matched) - torch.cat(protos)).abs().mean(),
        "kl": prototype_kl(torch.cat(raw), torch.cat(matched), codebook),
        "gpa": symmetric_infonce(reports, torch.stack(generated), scale),
    }
    total = sum(weights[name] * value for name, value in terms.items())
    return total, terms
