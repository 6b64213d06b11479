"""What the user is told once data and schedule are known, before the first step: nothing only at the end.

One schedule line (examples per step, steps per epoch, how many epochs the steps make), a warning when one
optimizer step already takes the whole data set (then ``max_steps: 20`` means 20 epochs), and the places of
truncated and dropped examples (``file:line``), so a user can fix their data before spending the night on it.
"""

from __future__ import annotations

from onecard.recipe import Recipe

SHOWN_LINES = 5


def schedule_lines(recipe: Recipe, schedule, warmup: int) -> list[tuple[str, str]]:
    """(style, text) lines: the schedule, and a warning when a step covers a whole epoch."""
    t = recipe.training
    per_step = schedule.micro_batch_size * schedule.grad_accum
    epochs = schedule.total_steps / schedule.steps_per_epoch
    out = [("dim", f"schedule: {schedule.n_examples} examples, {per_step} per step (micro_batch_size "
                   f"{schedule.micro_batch_size} x grad_accum {schedule.grad_accum}) -> {schedule.steps_per_epoch} "
                   f"step(s) per epoch; {schedule.total_steps} steps = {epochs:.3g} epoch(s); warm-up {warmup} "
                   f"step(s); checkpoints every {_save_text(t)}")]
    if schedule.steps_per_epoch == 1 and schedule.total_steps > 1:
        out.append(("yellow", f"warning: one optimizer step takes all {schedule.n_examples} examples "
                              f"({per_step} per step), so {schedule.total_steps} steps are {schedule.total_steps} "
                              "epochs over the same data; lower training.grad_accum or micro_batch_size for more, "
                              "smaller steps"))
    return out


def data_lines(stats) -> list[tuple[str, str]]:
    """(style, text) lines naming where examples were truncated to data.seq_len or dropped."""
    out = []
    for count, places, what in ((stats.truncated, stats.truncated_at, "truncated to data.seq_len"),
                                (stats.dropped, stats.dropped_at, "dropped (no trained token left)")):
        if not count:
            continue
        shown = ", ".join(places[:SHOWN_LINES]) + (f" and {count - SHOWN_LINES} more" if count > SHOWN_LINES else "")
        out.append(("yellow", f"{count} of {stats.records} examples {what}: {shown}"))
    return out


def say_before_training(recipe: Recipe, schedule, stats, console) -> None:
    from rich.text import Text

    from onecard.train.optim import warmup_steps

    if console is None:
        return
    warmup = warmup_steps(recipe, schedule.total_steps)
    for style, text in [*data_lines(stats), *schedule_lines(recipe, schedule, warmup)]:
        console.print(Text(text, style=style))  # Text: a path with [brackets] is not read as markup


def _save_text(t) -> str:
    parts = [f"{t.save_every_minutes:g} min"] if t.save_every_minutes else []
    if t.save_every_steps:
        parts.append(f"{t.save_every_steps} steps")
    return " and every ".join(parts) if parts else "- (off: only SIGINT/SIGTERM save)"
