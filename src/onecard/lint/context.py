"""What every lint rule reads: the recipe, the model's config and tokenizer, and the plan of the card, computed
once per lint."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable


@dataclass
class LintContext:
    recipe: object
    config: dict | None
    tokenizer: object
    power_reader: Callable[[], list]
    version_reader: Callable[[str], str | None]
    device: str | None = None          # None: the recipe's plan.gpu; "cpu"; or the catalog id of the card in use
    data_tokens: bool = False          # measure token lengths of the data (lint command)
    data_reports: dict = field(default_factory=dict)

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"

    @cached_property
    def inputs(self):
        from onecard.catalog.models import ModelShape, resolve_shape
        from onecard.errors import UserError
        from onecard.plan.inputs import inputs_from_recipe

        if self.on_cpu:
            return None  # a CPU run: no GPU memory to plan against (see memory_not_checked)
        try:
            shape = None
            if self.config is not None and "hidden_size" in self.config:
                shape = ModelShape.from_config(self.config, id=str(self.recipe.model.name_or_path))
            return inputs_from_recipe(self.recipe, gpu=self.device,
                                      shape=shape or resolve_shape(self.recipe.model.name_or_path))
        except UserError:
            return None

    @cached_property
    def stream_plan(self):
        """The streaming ``training.offload_weights`` runs when the recipe's plan does not fit the card, else None."""
        from onecard.plan.streaming import streams_to_fit

        plan = self.plan()
        return None if plan is None or plan.fits else streams_to_fit(plan)

    def plan(self, **changes):
        """The recipe's memory plan (computed once: several rules read it), or a what-if with ``changes``."""
        from onecard.plan.memory import plan_memory

        if not changes:
            return self._recipe_plan
        return None if self.inputs is None else plan_memory(self.inputs.with_(**changes))

    @cached_property
    def _recipe_plan(self):
        from onecard.plan.memory import plan_memory

        return None if self.inputs is None else plan_memory(self.inputs)
