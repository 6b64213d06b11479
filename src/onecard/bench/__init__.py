"""``onecard bench``: measured tokens/s and memory on a real GPU, beside the planner's prediction.

Layout (recipe vs components): :mod:`config` (one configuration), :mod:`build` (random preset models on the GPU,
NF4 layer by layer), :mod:`step` (timed optimizer steps, peak memory), :mod:`run` (one configuration or a suite ->
JSON lines), :mod:`predict` (what the planner says for the same configuration), :mod:`compare`
(plan vs measured, for ``onecard train``'s summary) and :mod:`calibrate` (the profile the planner reads).
Nothing here imports torch at module level.
"""
