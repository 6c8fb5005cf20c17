"""Evaluation metrics over logits (host arrays).

Every comparison takes ``(logits, reference)``: the model's logits first,
the reference model's second.
"""

import numpy as np
from scipy.special import log_softmax

__all__ = ["topk_accuracy", "agreement", "mean_kl", "output_nmse", "summarize"]


def topk_accuracy(logits, labels, k=1):
    """Fraction of rows whose label is among the ``k`` largest logits.

    Parameters
    ----------
    logits : ndarray (N, K)
    labels : ndarray (N,) of int
    """
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))


def agreement(logits, reference):
    """Top-1 agreement: fraction of rows with the same arg-max as ``reference``."""
    return float(np.mean(np.argmax(logits, axis=1) == np.argmax(reference, axis=1)))


def mean_kl(logits, reference):
    """Mean ``KL(p_ref ‖ p)`` over rows, ``p = softmax(logits)``,
    ``p_ref = softmax(reference)`` (nats)."""
    log_ref = log_softmax(np.asarray(reference, dtype=np.float64), axis=1)
    log_p = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)
    return float(np.mean(np.sum(np.exp(log_ref) * (log_ref - log_p), axis=1)))


def output_nmse(logits, reference):
    """``‖logits − reference‖²_F / ‖reference‖²_F``: the model's output error."""
    reference = np.asarray(reference, dtype=np.float64)
    return float(np.sum((np.asarray(logits, dtype=np.float64) - reference) ** 2) / np.sum(reference**2))


def summarize(logits, labels=None, reference=None):
    """All metrics that the inputs allow, as a JSON-ready dict."""
    out = {"images": int(len(logits))}
    if labels is not None:
        out["top1"] = topk_accuracy(logits, labels, 1)
        out["top5"] = topk_accuracy(logits, labels, 5)
    if reference is not None:
        out["top1_agreement"] = agreement(logits, reference)
        out["mean_kl"] = mean_kl(logits, reference)
        out["output_nmse"] = output_nmse(logits, reference)
    return out
