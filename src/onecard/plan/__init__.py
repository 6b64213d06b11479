"""Pure-Python planner (no torch import): memory, speed/cost (plan/flops.py, speed.py, cost.py).

Entry points: :func:`onecard.plan.memory.plan_memory` with :class:`onecard.plan.inputs.PlanInputs`
(build them with :func:`onecard.plan.inputs.inputs_from_recipe`), :func:`onecard.plan.suggest.suggest_fixes`,
:func:`onecard.plan.scope.scope_table`.
"""
