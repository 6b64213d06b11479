"""``train(recipe)``: the one entry point. It picks the task or strategy; each is a leaf on the spine
(train/spine.py): SFT/pretrain (train/sft.py), DPO/KTO (train/preference.py), one rank of ``--num-gpus N``
(train/distributed_loop.py). None of them imports another, nor this module.
"""

from __future__ import annotations

from typing import Any

from onecard.recipe import Recipe


def train(recipe: Recipe, resume: bool = False, console=None, overwrite: bool = False,
          allow_recipe_change: bool = False) -> dict[str, Any]:
    """Run the recipe; returns the summary also written to ``summary.json``."""
    return train_model(recipe, resume=resume, console=console, overwrite=overwrite,
                       allow_recipe_change=allow_recipe_change)[2]


def train_model(recipe: Recipe, resume: bool = False, console=None, overwrite: bool = False,
                allow_recipe_change: bool = False):
    """:func:`train`, also handing back the trained model and tokenizer in memory: (model, tokenizer, summary).

    ``--resume`` on a finished run changes nothing and returns (None, None, its stored summary); a resume with a
    changed recipe is refused unless ``allow_recipe_change`` (train/resume_policy.py).
    """
    from onecard.train.distributed import is_worker
    from onecard.train.resume_policy import check_resume
    from onecard.train.sinks import require_sinks

    if is_worker():  # rank 0 alone reads the run directory (it may live on rank 0's node only), then tells the rest
        from onecard.train.distributed_loop import train_distributed_model
        from onecard.train.launch import check_task_recipe

        check_task_recipe(recipe)  # a rank of an external launcher has had no parent to check it
        require_sinks(recipe)
        return train_distributed_model(recipe, resume=resume, console=console, overwrite=overwrite,
                                       allow_recipe_change=allow_recipe_change)
    if (done := check_resume(recipe, resume, allow_recipe_change)) is not None:
        return None, None, {**done, "already_finished": True}
    require_sinks(recipe)  # a logging: package missing stops the run here, before any model loads
    if recipe.task in ("dpo", "kto"):
        from onecard.train.preference import train_preference_model

        return train_preference_model(recipe, resume=resume, console=console, overwrite=overwrite)
    from onecard.train.sft import train_sft_model

    return train_sft_model(recipe, resume=resume, console=console, overwrite=overwrite)
