"""MaskGen-VQ and MaskGIT (ImageBert / UViTBert) training loss: the reference's `MLMLoss`
(modeling/modules/losses.py), which both official trainers use with the same settings.

Cross-entropy with label smoothing over every position, masked positions weighted 1 and
unmasked (visible) ones `unmasked_weight`:

    loss = sum_bn w_bn * CE_ls(logits_bn, target_bn) / sum_bn w_bn,   w = 1 if masked else 0.1

and the accuracy of the argmax prediction on masked positions, averaged per sample then over
the batch (the reference's `correct_tokens`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["masked_token_loss"]


def _check_inputs(logits, targets, masks, label_smoothing, unmasked_weight) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        got = f"{logits.dtype} {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected a float tensor (B, N, K), got {got}")
    b, n, k = logits.shape
    if b == 0 or n == 0 or k == 0:
        raise ValueError(f"logits: expected non-empty (B, N, K), got {tuple(logits.shape)}")
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != (b, n) \
            or targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        got = f"{targets.dtype} {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets: expected integer ids of shape ({b}, {n}), got {got}")
    if not isinstance(masks, torch.Tensor) or tuple(masks.shape) != (b, n) or masks.dtype != torch.bool:
        got = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"masks: expected a bool tensor of shape ({b}, {n}) (True = masked), got {got}")
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing: expected a number in [0, 1), got {label_smoothing!r}")
    if not 0.0 <= float(unmasked_weight):
        raise ValueError(f"unmasked_weight: expected a number >= 0, got {unmasked_weight!r}")


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor,
                      label_smoothing: float = 0.1,
                      unmasked_weight: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted label-smoothed cross-entropy of MaskGen-VQ.

    Args:
        logits: (B, N, K) predictions over the K codes (any float dtype; computed in fp32).
        targets: (B, N) the clean token ids in [0, K).
        masks: (B, N) bool, True where the input token was replaced by the mask token.
        label_smoothing: of the cross-entropy (the configs' `losses.label_smoothing`, 0.1).
        unmasked_weight: weight of visible positions (`losses.loss_weight_unmasked_token`, 0.1).
    Returns:
        (scalar loss, {"loss": detached loss, "masked_accuracy": detached accuracy on masked
        positions, the per-sample mean averaged over the batch}).
    """
    _check_inputs(logits, targets, masks, label_smoothing, unmasked_weight)
    b, n, k = logits.shape
    targets = targets.long()
    ce = F.cross_entropy(logits.float().reshape(b * n, k), targets.reshape(-1), reduction="none",
                         label_smoothing=float(label_smoothing)).view(b, n)  # (B, N)
    m = masks.float()
    w = m + (1.0 - m) * float(unmasked_weight)  # (B, N): 1 masked, unmasked_weight visible
    loss = (ce * w).sum() / w.sum().clamp_min(torch.finfo(torch.float32).tiny)
    with torch.no_grad():
        correct = (logits.argmax(dim=-1) == targets).float() * m  # (B, N)
        # a sample with no masked token counts 0, as the reference's (sum / (0 + 1e-8))
        acc = (correct.sum(dim=1) / m.sum(dim=1).clamp_min(1.0)).mean()
    return loss, {"loss": loss.detach(), "masked_accuracy": acc}
