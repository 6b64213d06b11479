"""The reference policy of DPO/KTO, without a second copy of the base weights where an adapter is trained.

Three ways, chosen by ``preference.reference`` (``auto`` picks the first that applies):

- *named adapter* (adapter method continuing from ``adapter.init_adapter``, reference ``auto``): the starting
  (SFT) adapter is loaded a second time on the same ``PeftModel`` under the name ``reference``, frozen; reference
  log-probs switch to it with ``set_adapter`` and back. Extra memory: one adapter's weights.
- *adapter disabled* (adapter method, new adapter; or ``reference: adapter-disabled`` explicitly): the same model
  under ``PeftModel.disable_adapter()`` is the base. Extra memory: none.
- *copy* (full fine-tuning, or ``reference: copy``): a frozen deep copy of the starting model. Extra memory: one
  model -- which is why the adapter methods never default to it.

This is what trl does too (``use_adapter`` in trl/trainer/utils.py: ``disable_adapter`` or ``set_adapter("ref")``);
it is restated here because the training loop is onecard's own (see train/preference.py) and trl is absent on the
GPU image. Reference passes run in eval mode, so LoRA dropout does not make the reference noisy and the reference
forward draws no random numbers (a resumed run stays bit-identical).
"""

from __future__ import annotations

import contextlib
import copy

from onecard.errors import UserError
from onecard.recipe import Recipe, resolve_reference

REFERENCE_ADAPTER = "reference"


class Reference:
    """``with reference.active() as module:`` runs ``module`` as the reference policy (call under ``no_grad``)."""

    def __init__(self, model, mode: str, frozen_copy=None):
        self.model = model
        self.mode = mode  # "adapter-disabled" | "named-adapter" | "copy"
        self.frozen_copy = frozen_copy
        self.trainable_adapter = getattr(model, "active_adapter", None) if mode == "named-adapter" else None

    @contextlib.contextmanager
    def active(self):
        if self.mode == "copy":
            yield self.frozen_copy
            return
        with eval_mode(self.model):
            if self.mode == "adapter-disabled":
                with self.model.disable_adapter():
                    yield self.model
                return
            # inference_mode=True: switching must not make the reference adapter trainable (set_adapter would)
            self.model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
            try:
                yield self.model
            finally:
                self.model.set_adapter(self.trainable_adapter)  # trainable again, the reference frozen

    def release(self) -> None:
        """Drop the reference before saving, so ``adapter/`` holds only the trained adapter."""
        if self.mode == "named-adapter" and REFERENCE_ADAPTER in getattr(self.model, "peft_config", {}):
            self.model.delete_adapter(REFERENCE_ADAPTER)
        self.frozen_copy = None


@contextlib.contextmanager
def eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def setup_reference(model, recipe: Recipe) -> Reference:
    """Build the reference for ``model`` as loaded (before any training step and before a checkpoint is restored)."""
    mode = resolve_reference(recipe)
    if mode == "copy":
        frozen = copy.deepcopy(model)
        frozen.eval()
        for param in frozen.parameters():
            param.requires_grad_(False)
        return Reference(model, mode, frozen_copy=frozen)
    if mode == "named-adapter":
        from onecard.train.model import adapter_dir

        path = adapter_dir(recipe.adapter.init_adapter)
        trainable = model.active_adapter
        model.load_adapter(str(path), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        model.set_adapter(trainable)  # keeps the trained adapter active and trainable, the reference frozen
        _check_frozen(model)
    return Reference(model, mode)


def _check_frozen(model) -> None:
    """Invariant: no reference-adapter weight is trainable (else the optimizer would move the reference)."""
    leaked = [n for n, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in n and p.requires_grad]
    if leaked:
        raise RuntimeError(f"reference adapter weights are trainable: {leaked[:3]}")
