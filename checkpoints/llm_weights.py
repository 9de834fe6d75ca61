"""Which tensors of an InternVL checkpoint belong to its language model, and their LLM names.

Both layouts store the language model as ``language_model.model.*`` and
``language_model.lm_head.*``; transformers may also write ``model.language_model.*`` and
``lm_head.*``. Everything else (``vision_model.*``, ``vision_tower.*``, ``mlp1.*``…) belongs to
the vision service.
"""

from __future__ import annotations

_RENAMES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
)


def language_model_weight_name(checkpoint_name: str) -> str | None:
    """The plain causal-LM name of a checkpoint tensor, or None if it is not a LLM tensor."""
    for prefix, replacement in _RENAMES:
        if checkpoint_name.startswith(prefix):
            return replacement + checkpoint_name[len(prefix) :]
    return None
