"""Distances between the original model's next-token distributions and a modified model's, per position.

``js`` is the textbook Jensen-Shannon divergence ``½KL(p‖m) + ½KL(q‖m)``, ``m = (p+q)/2``, summed over the
vocabulary (nats, at most ln 2). FinerCut's released code computes ``½KL(m‖p) + ½KL(m‖q)`` (arguments swapped) and
averages over vocabulary entries as well; that is offered as ``js_reference``. ``kl`` is ``KL(p_original‖q)``;
``l2`` the norm of the logit difference; ``angular`` the angle between logit vectors divided by pi. Every distance
is averaged over positions; the greedy search only compares them, so the vocabulary scaling does not matter.

The original model's side is prepared once (:class:`Reference`): a search computes hundreds of distances against
the same reference, and over a 49k-token vocabulary the elementwise work is a large part of each one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DISTANCES = ("js", "js_reference", "kl", "l2", "angular")


class Reference:
    """The original model's logits for one batch, with what every distance needs from them precomputed."""

    def __init__(self, name: str, logits: torch.Tensor):
        self.name = name
        logits = logits.float()
        if name in ("l2", "angular"):
            self.logits = logits
        else:
            self.log_p = F.log_softmax(logits, -1)
            self.p = self.log_p.exp()
            self.p_log_p = (self.p * self.log_p).sum(-1)

    def distance(self, logits: torch.Tensor) -> float:
        """Mean over positions of the distance from the reference to ``logits``."""
        q_logits = logits.float()
        if self.name == "l2":
            return float((self.logits - q_logits).norm(dim=-1).mean())
        if self.name == "angular":
            cosine = F.cosine_similarity(self.logits, q_logits, dim=-1).clamp(-1, 1)
            return float(torch.arccos(cosine).mean() / math.pi)
        log_q = F.log_softmax(q_logits, -1)
        if self.name == "kl":
            return float((self.p_log_p - (self.p * log_q).sum(-1)).mean())
        q = log_q.exp()
        log_m = torch.log((self.p + q) * 0.5)
        if self.name == "js":  # ½[Σp log p + Σq log q − Σ(p+q) log m]
            return float((0.5 * (self.p_log_p + (q * log_q).sum(-1) - ((self.p + q) * log_m).sum(-1))).mean())
        m = log_m.exp()  # js_reference: ½[KL(m‖p) + KL(m‖q)], averaged over the vocabulary too
        return float((0.5 * (m * (2 * log_m - self.log_p - log_q)).mean(-1)).mean())
