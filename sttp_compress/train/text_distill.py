"""Sentence-embedding distillation for `hf:DIR` encoders: the loss (embeddings and every layer's token states)
and `distill_embeddings`, `finetune` with the text recipe's defaults."""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sttp_compress.errors import UserError
from sttp_compress.train.embedding_metrics import embed, embedding_agreement

__all__ = ["COSINE_WEIGHT", "MSE_WEIGHT", "HIDDEN_WEIGHT", "HIDDEN_END", "TEXT_ADAM_BETA2", "TEXT_SPECTRUM_LR_MULT",
           "TEXT_FREE_CORES", "embedding_distillation_loss", "hidden_state_loss", "relative_sq_error",
           "EmbeddingDistillLoss", "HiddenStates", "distill_embeddings"]

COSINE_WEIGHT = 1.0  # weight of (1 − cos(student, teacher)) in the distillation loss
MSE_WEIGHT = 1.0  # weight of ‖student − teacher‖² / mean ‖teacher‖² (scale-free MSE)
HIDDEN_WEIGHT = 1.0  # weight of the layer-wise hidden-state term (0: sentence embeddings only)
# distill_embeddings' recipe (benchmarks/results/experiments/minilm_recipe.md, MiniLM at ratio 4 on H200s):
HIDDEN_END = 0.0  # the layer-wise weight ramps from HIDDEN_WEIGHT to this by the last step (~+0.001 cosine)
TEXT_ADAM_BETA2 = 0.98  # AdamW's beta2: no loss spike in 8 runs, against 5 of 15 at PyTorch's 0.999
TEXT_SPECTRUM_LR_MULT = 10.0  # spectra and row/column scales at 10x the lr: 0.9455 against 0.9448 (minilm_recipe.md)
TEXT_FREE_CORES = True  # cores trained as free matrices (freecores.py): 0.9512 against 0.9467 in 5 minutes


def embedding_distillation_loss(student_out: Tensor, teacher_out: Tensor, cosine_weight: float = COSINE_WEIGHT,
                                mse_weight: float = MSE_WEIGHT) -> Tensor:
    """cosine_weight·mean(1 − cos(s, t)) + mse_weight·Σ‖s − t‖² / Σ‖t‖², in float32.

    The MSE term is divided by the teacher's mean squared norm so that it does not depend on the
    embedding's scale; for L2-normalized embeddings it equals 2·(1 − cos) and only sharpens the
    cosine term, for unnormalized ones it also matches the norms.
    """
    s, t = student_out.float(), teacher_out.detach().float()
    if s.shape != t.shape:
        raise UserError(f"student embeddings {tuple(s.shape)} differ from the teacher's {tuple(t.shape)}")
    cos = F.cosine_similarity(s, t, dim=-1).mean()
    mse = (s - t).pow(2).sum(-1).mean() / t.pow(2).sum(-1).mean().clamp_min(1e-12)
    return cosine_weight * (1.0 - cos) + mse_weight * mse


def hidden_state_loss(student: tuple[Tensor, ...], teacher: tuple[Tensor, ...], mask: Tensor) -> Tensor:
    """Mean over layers of Σ‖h_s − h_t‖² / Σ‖h_t‖² over the real (unpadded) tokens, in float32."""
    if len(student) != len(teacher):
        raise UserError(f"the student has {len(student)} hidden states, the teacher {len(teacher)}")
    m = mask.unsqueeze(-1).float()
    return torch.stack([relative_sq_error(hs, ht, m) for hs, ht in zip(student, teacher)]).mean()


def relative_sq_error(student: Tensor, teacher: Tensor, weight: Tensor | float = 1.0) -> Tensor:
    """Σ w‖s − t‖² / Σ w‖t‖² in float32, the teacher detached (hidden states under their mask, embedding rows)."""
    s, t = student.float(), teacher.detach().float()
    return ((s - t).pow(2) * weight).sum() / (t.pow(2) * weight).sum().clamp_min(1e-12)


class EmbeddingDistillLoss:
    """The text distillation loss on `HiddenStates` outputs: embedding_distillation_loss on the sentence
    embeddings + hidden·hidden_state_loss over every layer's token states (plain tensors: the first part).

    With `vocab` > 0 and training batches carrying "vocab_ids" (TokenizedTexts.vocab_rows), it adds
    vocab·‖E_s − E_t‖² / ‖E_t‖² over those token-embedding rows, drawn from the whole vocabulary each
    step: rows of tokens the texts rarely or never hold are trained toward the original's too.

    With `hidden_end` the layer-wise weight moves linearly from `hidden` at the first step to `hidden_end`
    at the last (`set_progress`, which the fine-tune loop calls before each step): the layers' states
    guide the start, the sentence embedding the finish. The weight is a device tensor the loss reads, so
    a step replayed as a CUDA graph sees each step's value.
    """

    def __init__(self, cosine: float = COSINE_WEIGHT, mse: float = MSE_WEIGHT, hidden: float = HIDDEN_WEIGHT,
                 hidden_end: float | None = None, vocab: float = 0.0):
        self.cosine, self.mse, self.hidden, self.hidden_end = cosine, mse, hidden, hidden_end
        self.vocab = vocab  # weight of the token-embedding rows term (needs batches with "vocab_ids")
        self._weight: Tensor | None = None  # the current layer-wise weight (hidden_end given), on the loss's device

    @property
    def layerwise(self) -> bool:
        """Whether the hidden states are needed at any step."""
        return self.hidden > 0 or bool(self.hidden_end)

    def set_progress(self, fraction: float) -> None:
        """The fraction of the fine-tune's steps done (0 at the first step, 1 at the end)."""
        if self.hidden_end is not None and self._weight is not None:
            f = min(max(fraction, 0.0), 1.0)
            self._weight.fill_(self.hidden + f * (self.hidden_end - self.hidden))

    def __call__(self, student_out: Any, teacher_out: Any) -> Tensor:
        both = isinstance(student_out, dict) and isinstance(teacher_out, dict)
        s = student_out["sentence_embedding"] if both else student_out
        t = teacher_out["sentence_embedding"] if both else teacher_out
        loss = embedding_distillation_loss(s, t, self.cosine, self.mse)
        if both and self.layerwise:
            weight: float | Tensor = self.hidden
            if self.hidden_end is not None:
                if self._weight is None or self._weight.device != loss.device:
                    self._weight = torch.tensor(float(self.hidden), device=loss.device)
                weight = self._weight
            loss = loss + weight * hidden_state_loss(student_out["hidden_states"], teacher_out["hidden_states"],
                                                     teacher_out["attention_mask"])
        if both and self.vocab and "vocab_rows" in student_out and "vocab_rows" in teacher_out:
            loss = loss + self.vocab * relative_sq_error(student_out["vocab_rows"], teacher_out["vocab_rows"])
        return loss


class HiddenStates(nn.Module):
    """A view of a SentenceEncoder whose forward returns its `features` dict (embedding first), for distillation."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, vocab_ids: Tensor | None = None) -> dict[str, Any]:
        out = self.encoder.features(input_ids, attention_mask, token_type_ids)
        if vocab_ids is not None:  # rows of the token embedding (EmbeddingDistillLoss's vocab term)
            out["vocab_rows"] = self.encoder._hf.get_input_embeddings()(vocab_ids)
        return out


def distill_embeddings(student: nn.Module, teacher: nn.Module, train_loader: Iterable, val_loader: Iterable | None,
                       cfg: Any, progress: bool = True) -> dict[str, Any]:
    """`finetune` with the text loss (default EmbeddingDistillLoss(hidden_end=HIDDEN_END): sentence embeddings
    and, through HiddenStates views, every layer's token states), AdamW's beta2 at TEXT_ADAM_BETA2 and the
    spectra's lr multiple at TEXT_SPECTRUM_LR_MULT and free cores when every spectrum allows
    (TEXT_FREE_CORES) unless `cfg` sets them, and the student's dropout off; the
    block also gets the beta2, the lr multiple and the layer-wise weights, and the validation texts' mean
    cosine similarity to the teacher, top-1 nearest-neighbour agreement (%) and pair-similarity rank
    correlation (`similarity_spearman`), before and after."""
    from dataclasses import replace

    from sttp_compress.train.loop import finetune, resolve_device
    from sttp_compress.train.freecores import can_release

    cfg = replace(cfg, loss_fn=cfg.loss_fn or EmbeddingDistillLoss(hidden_end=HIDDEN_END),
                  adam_beta2=TEXT_ADAM_BETA2 if cfg.adam_beta2 is None else cfg.adam_beta2,
                  spectrum_lr_mult=TEXT_SPECTRUM_LR_MULT if cfg.spectrum_lr_mult is None else cfg.spectrum_lr_mult,
                  free_cores=TEXT_FREE_CORES and can_release(student) if cfg.free_cores is None else cfg.free_cores)
    rows = getattr(getattr(train_loader, "dataset", None), "vocab_rows", 0) > 0  # batches carry "vocab_ids"
    layerwise = rows or isinstance(cfg.loss_fn, EmbeddingDistillLoss) and cfg.loss_fn.layerwise
    device = resolve_device(cfg.device)
    ref = before = None
    if val_loader is not None:
        teacher.to(device)
        student.to(device)
        ref = embed(teacher, val_loader, device)
        before = embedding_agreement(embed(student, val_loader, device), ref)
    views = (HiddenStates(student), HiddenStates(teacher)) if layerwise else (student, teacher)
    dropouts = [(m, m.p) for m in student.modules() if isinstance(m, nn.Dropout)]
    try:
        for m, _ in dropouts:  # the student matches the teacher's deterministic (eval-mode) function
            m.p = 0.0
        block = finetune(*views, train_loader, val_loader, cfg, progress=progress)
    finally:
        for m, p in dropouts:
            m.p = p
    block["adam_beta2"], block["spectrum_lr_mult"] = cfg.adam_beta2, cfg.spectrum_lr_mult
    if isinstance(cfg.loss_fn, EmbeddingDistillLoss):
        block["hidden_weight"], block["hidden_end"] = cfg.loss_fn.hidden, cfg.loss_fn.hidden_end
    if ref is not None:
        after = embedding_agreement(embed(student, val_loader, device), ref)
        block.update({"val_cosine_before": before["cosine"], "val_cosine_after": after["cosine"],
                      "val_nn_agreement_before": before["nn_agreement"],
                      "val_nn_agreement_after": after["nn_agreement"],
                      "val_similarity_spearman_before": before["similarity_spearman"],
                      "val_similarity_spearman_after": after["similarity_spearman"]})
    return block
