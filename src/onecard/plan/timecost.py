"""Time to train and what it costs: the `onecard plan` section after the memory budget (pure Python).

Reads top to bottom: speed on the recipe's card (plan/speed.py) -> tokens per epoch from the recipe or flags ->
hours -> deadline check with alternatives -> cost on your card, on each cloud GPU (its own speed and its own fit
verdict, from plan_memory for that card), on managed APIs -> hidden costs and a 12-month comparison.
Rendering (rich) is at the end: render_time_and_cost(result).
"""

from __future__ import annotations

import math

from onecard.catalog.gpus import GPUS
from onecard.plan import cost as money
from onecard.plan.inputs import effective_seq_len
from onecard.plan.speed import claim_check, estimate_throughput

TARGETS_H = ((4.0, "daily iteration (under 4 h)"), (12.0, "overnight (~12 h)"), (60.0, "a weekend (~60 h)"))
_CLI: dict = {}  # options of `onecard plan` that are not recipe fields (set by commands/plan.py per call)


def set_cli_options(*, claim_tokens_per_s: float | None = None, prices_path: str | None = None) -> None:
    _CLI.clear()
    _CLI.update(claim_tokens_per_s=claim_tokens_per_s, prices_path=prices_path)


def cli_overrides(*, epochs=None, examples=None, mean_tokens=None, deadline_hours=None) -> list[str]:
    """`onecard plan` flags that are recipe fields, as --set assignments (validated like the recipe)."""
    pairs = (("training.epochs", epochs), ("data.num_examples", examples),
             ("data.mean_tokens_per_example", mean_tokens), ("plan.deadline_hours", deadline_hours))
    return [f"{k}={v}" for k, v in pairs if v is not None]


def target_name(hours: float) -> str:
    for limit, name in TARGETS_H:
        if hours <= limit:
            return name
    return "longer than a weekend"


def workload(recipe) -> dict:
    """Tokens per epoch and optimizer steps from data.num_examples x data.mean_tokens_per_example."""
    d, t = recipe.data, recipe.training
    n, mean = d.num_examples, d.mean_tokens_per_example
    if not n or not mean:
        return {"known": False, "why": "tokens per epoch unknown: give --examples N --mean-tokens T "
                                      "(or data.num_examples and data.mean_tokens_per_example in the recipe)"}
    per_example = min(float(mean), d.seq_len)  # longer examples are truncated to seq_len
    per_step = t.micro_batch_size * t.grad_accum * t.num_gpus  # sequences per optimizer step
    sequences = math.ceil(n * per_example / d.seq_len) if d.packing else n  # packing fills seq_len-token rows
    steps_per_epoch = math.ceil(sequences / per_step)
    epochs = t.epochs if not t.max_steps else t.max_steps / steps_per_epoch
    return {"known": True, "examples": n, "mean_tokens_per_example": float(mean), "tokens_per_example": per_example,
            "tokens_per_epoch": n * per_example, "epochs": epochs, "sequences_per_epoch": sequences,
            "sequences_per_step": per_step,
            "steps_per_epoch": steps_per_epoch, "total_steps": t.max_steps or math.ceil(steps_per_epoch * epochs),
            "truncated": float(mean) > d.seq_len,
            "note": "padding not counted: pack sequences (data.packing) or the real time is longer"}


def _speed(recipe, gpu_id: str, **overrides):
    """(PlanInputs, MemoryPlan, Throughput) of the recipe on ``gpu_id`` (overrides: PlanInputs fields)."""
    from onecard.plan.inputs import inputs_from_recipe
    from onecard.plan.memory import plan_memory

    inp = inputs_from_recipe(recipe, gpu=gpu_id)
    if overrides:
        inp = inp.with_(**overrides)
    mem = plan_memory(inp)
    tp = estimate_throughput(inp, seq_len=effective_seq_len(recipe), memory_plan=mem)
    from onecard.plan.streaming import as_the_run_streams

    return (inp, *as_the_run_streams(mem, tp))


GRAPH_HINT_GAIN = 1.05  # below this planned gain a graph is not worth its padding and pool


def _graph_hint(recipe, inp, mem, tp) -> str | None:
    """For a host-bound plan that a CUDA graph can hold (plan/cuda_graph.py, sdpa, onecard's kernels): the speed
    ``training.cuda_graph`` would plan, as one line; else None."""
    from onecard.plan.cuda_graph import graph_refusals
    from onecard.plan.streaming import streams_to_fit

    if inp.cuda_graph or inp.kernels != "onecard" or inp.attn != "sdpa" or inp.num_gpus > 1:
        return None
    if graph_refusals(recipe, streams=streams_to_fit(mem) is not None):
        return None
    graphed = estimate_throughput(inp.with_(cuda_graph=True), seq_len=effective_seq_len(recipe), memory_plan=mem)
    gain = graphed.estimate_tokens_per_s / tp.estimate_tokens_per_s
    if gain < GRAPH_HINT_GAIN:
        return None
    return (f"training.cuda_graph: true would replay each micro-batch from one CUDA graph, taking the host's "
            f"dispatch off this step: {graphed.estimate_tokens_per_s:,.0f} tokens/s planned ({gain:.2f}x; "
            "micro-batches are then padded to data.seq_len; measured 1.37x on Qwen 2.5 14B FP8, docs/kernels.md)")


REFUSED_VERDICT = "no FP8 (refused)"  # a table row's verdict where _refusal answers


def _refusal(inp) -> str | None:
    """Why ``inp.gpu`` refuses the run whatever its memory (lint's fp8-base-gpu), or None."""
    from onecard.plan.fp8 import has_fp8

    if inp.quant_base == "fp8" and not has_fp8(inp.gpu):
        return f"{inp.gpu.id} has no FP8 tensor cores, so quant.base fp8 is refused there"
    return None


def _hours(tokens: float, tokens_per_s: float, num_gpus: int = 1) -> float:
    return tokens / (tokens_per_s * num_gpus) / 3600.0


def time_and_cost(recipe, *, gpu: str | None = None, claim_tokens_per_s: float | None = None,
                  deadline_hours: float | None = None, prices_path: str | None = None) -> dict:
    """Speed, time, deadline, claim and cost for ``recipe`` on its card (``gpu`` overrides plan.gpu)."""
    from onecard.catalog.prices import load_prices

    card = gpu or recipe.plan.gpu
    inp, mem, tp = _speed(recipe, card)
    g = recipe.training.num_gpus
    out: dict = {"speed": tp.to_dict(), "claim": None, "deadline": None}
    hint = _graph_hint(recipe, inp, mem, tp)
    if hint:
        out["speed"]["notes"].append(hint)
    if g > 1:
        out["speed"]["notes"].append(f"{g} GPUs: time assumes linear scaling (an upper bound on speed)")
    if claim_tokens_per_s:
        out["claim"] = claim_check(inp, claim_tokens_per_s)  # at the recipe's seq_len: how claims are quoted
        if not mem.fits:
            out["claim"]["memory_note"] = (f"and the plan does not fit {inp.gpu.id} ({mem.total_bytes / 2**30:.1f} GiB "
                                           f"needed): the claim check is about compute only")
    work = workload(recipe)
    time: dict = {**work, "label": tp.label}
    if work["known"]:
        time["hours_per_epoch"] = _hours(work["tokens_per_epoch"], tp.estimate_tokens_per_s, g)
        time["total_hours"] = time["hours_per_epoch"] * work["epochs"]
        time["fastest_possible_hours"] = _hours(work["tokens_per_epoch"] * work["epochs"], tp.ceiling_tokens_per_s, g)
        time["target"] = target_name(time["total_hours"])
    time["memory_verdict"] = mem.verdict
    out["time"] = time
    deadline = deadline_hours or recipe.plan.deadline_hours
    if deadline and work["known"]:
        out["deadline"] = deadline_options(recipe, deadline, time, inp, tp)
    prices = load_prices(prices_path)
    out["cost"] = cost_section(recipe, prices, time, inp, mem)
    return out


def deadline_options(recipe, deadline_h: float, time: dict, inp, tp) -> dict:
    """Does the job meet ``deadline_h``, and what would (each option with its new time)?"""
    total, per_epoch = time["total_hours"], time["hours_per_epoch"]
    opts: list[dict] = []
    if total > deadline_h:
        epochs = math.floor(deadline_h / per_epoch * 10) / 10
        if epochs >= 0.1:
            opts.append({"change": f"{epochs:g} epochs instead of {time['epochs']:g}", "set": {"training.epochs": epochs},
                         "hours": per_epoch * epochs, "fits_memory": True})
        n = int(time["examples"] * deadline_h / total)
        if n >= 1:
            opts.append({"change": f"{n:,} examples instead of {time['examples']:,}", "set": {"data.num_examples": n},
                         "hours": total * n / time["examples"], "fits_memory": True})
        whatifs = []
        if inp.grad_ckpt:
            whatifs.append(("gradient checkpointing off", {"training.grad_ckpt": False}, inp.gpu.id, {"grad_ckpt": False}))
        if inp.method != "qlora" and inp.method != "full":  # QLoRA's base is NF4, not FP8
            whatifs.append(("QLoRA", {"method": "qlora", "quant.base": "none"}, inp.gpu.id,
                            {"method": "qlora", "quant_base": "none"}))
        for g in sorted(GPUS.values(), key=lambda x: -x.bf16_dense_tflops):
            if g.bf16_dense_tflops > inp.gpu.bf16_dense_tflops:
                whatifs.append((f"a bigger card: {g.id}", {"plan.gpu": g.id}, g.id, {}))
        cards = []
        for change, sets, gpu_id, over in whatifs:
            inp2, mem, t2 = _speed(recipe, gpu_id, **over)
            hours = total * tp.estimate_tokens_per_s / t2.estimate_tokens_per_s
            refused = _refusal(inp2)
            row = {"change": change, "set": sets, "hours": hours, "fits_memory": mem.fits and not refused,
                   "label": t2.label, "memory_verdict": REFUSED_VERDICT if refused else mem.verdict}
            (cards if "plan.gpu" in sets else opts).append(row)
        opts += sorted(cards, key=lambda r: (not r["fits_memory"], r["hours"]))
    for o in opts:
        o["meets"] = o["hours"] <= deadline_h and o["fits_memory"]
    refused = _refusal(inp)
    return {"deadline_hours": deadline_h, "total_hours": total, "meets": total <= deadline_h and not refused,
            "refused": refused,
            "target": target_name(deadline_h), "options": opts}


def cost_section(recipe, prices, time: dict, inp, mem) -> dict:
    """Your card's share of its month, each cloud GPU at its own speed and fit, managed APIs, hidden costs."""
    known = time["known"]
    out: dict = {"currency": prices.output_currency, "prices_file": prices.path, "label": "estimated",
                 "your_card": None, "cloud": [], "managed": []}
    monthly = prices.your_card.get(inp.gpu.id)
    refused = _refusal(inp)
    same_card_cloud = next((c for c in prices.cloud if c[0] == inp.gpu.id), None)
    if known:
        if monthly is not None:
            own = money.own_card_cost(time["total_hours"], time["hours_per_epoch"], monthly, prices)
        elif same_card_cloud is not None:  # no monthly cost given: price the user's card at its cloud rate
            own = money.cloud_cost(time["total_hours"], time["hours_per_epoch"], same_card_cloud[2], prices,
                                   include_setup=False)
            own["basis"] = (f"no your_card.{inp.gpu.id} in the price file: priced at {same_card_cloud[1]}'s "
                            f"hourly rate for the same card")
        else:
            own = None
            out["your_card_note"] = f"no price for {inp.gpu.id} in {prices.path}: add your_card.{inp.gpu.id}"
        if own is not None:
            out["your_card"] = {"gpu": inp.gpu.id, "fits": mem.fits and not refused,
                                "verdict": REFUSED_VERDICT if refused else mem.verdict, "label": "estimated", **own}
            if refused or not mem.fits:  # a job that cannot run has no cost on this card
                why = refused or f"the plan does not fit {inp.gpu.id}"
                out["your_card"].update(per_job=None, per_epoch=None, why=f"{why}: see the cloud rows that fit")
    for gpu_id, provider, hourly in prices.cloud:
        cinp, cmem, ctp = _speed(recipe, gpu_id)
        card_refused = _refusal(cinp)
        row = {"gpu": gpu_id, "provider": provider, "verdict": REFUSED_VERDICT if card_refused else cmem.verdict,
               "fits": cmem.fits and not card_refused,
               "tokens_per_s": round(ctp.estimate_tokens_per_s, 1), "ceiling_tokens_per_s": round(ctp.ceiling_tokens_per_s, 1),
               "speed_label": ctp.label, "hours_per_job": None, "cost": None}
        if known:
            hours_epoch = _hours(time["tokens_per_epoch"], ctp.estimate_tokens_per_s, recipe.training.num_gpus)
            row["hours_per_epoch"] = hours_epoch
            row["hours_per_job"] = hours_epoch * time["epochs"]
            if row["fits"]:
                row["cost"] = money.cloud_cost(row["hours_per_job"], hours_epoch, hourly, prices)
        out["cloud"].append(row)
    out["cloud"].sort(key=lambda r: (r["cost"] is None, r["cost"]["per_job"] if r["cost"] else 0))
    params_b = inp.shape.total_params() / 1e9
    if known:
        for provider, service, price in money.managed_rows(prices, params_b):
            out["managed"].append({"provider": provider, "service": service,
                                   **money.managed_cost(time["tokens_per_epoch"], time["epochs"], price, prices)})
        artifact = (inp.shape.lora_params(inp.rank, inp.targets, dora=inp.method == "dora") * 4 if inp.is_adapter
                    else inp.shape.total_params() * 2)
        out["storage"] = money.storage_cost(artifact, prices)
        fitting = [r for r in out["cloud"] if r["cost"]]
        runs_here = mem.fits and not refused
        out["twelve_months"] = money.twelve_month_comparison(time["total_hours"], monthly if runs_here else None,
                                                             fitting, prices)
        out["hidden"] = {"setup_hours_per_job": prices.hidden.get("setup_hours_per_job", 0),
                         "maintenance_hours_per_week": prices.hidden.get("maintenance_hours_per_week", 0),
                         "blended_hourly_rate": prices.hidden_amount("blended_hourly_rate")}
    return out


def time_cost_section(recipe, inputs, memory_plan) -> tuple[str, dict, list]:
    """The SECTIONS hook of commands/plan.py: ("time_cost", payload, renderables)."""
    result = time_and_cost(recipe, gpu=inputs.gpu.id, claim_tokens_per_s=_CLI.get("claim_tokens_per_s"),
                           prices_path=_CLI.get("prices_path"))
    return "time_cost", result, render_time_and_cost(result)


# --------------------------------------------------------------------------- rendering (rich)


def _h(hours: float | None) -> str:
    if hours is None:
        return "-"
    if hours * 60 < 1:  # small jobs: seconds, not "0 min"
        return f"{hours * 3600:.0f} s" if hours * 3600 >= 1 else "<1 s"
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:,.1f} h"


def _host_bound(speed: dict) -> bool:
    steps = speed["step_s"]
    return speed["label"] != "measured" and steps.get("host_dispatch_s", 0.0) >= steps.get("step_s", float("inf"))


def _tokens(n: float) -> str:
    return f"{n / 1e6:,.1f}M" if n >= 1e5 else f"{n:,.0f}"


def render_time_and_cost(result: dict) -> list:
    """Human output: speed, claim, time, deadline, cost tables (rich renderables)."""
    from rich.table import Table
    from rich.text import Text

    sp, tm, cs = result["speed"], result["time"], result["cost"]
    cur = cs["currency"]
    out: list = []
    t = Table(title=f"Speed on {sp['gpu']} ({sp['method']})", caption=sp["efficiency_source"])
    for col in ("", "tokens/s", "label"):
        t.add_column(col, justify="right" if col == "tokens/s" else "left")
    t.add_row("physical ceiling", f"{sp['ceiling_tokens_per_s']:,.0f}", "physics (peak FLOP/s, bandwidth)")
    t.add_row(Text("estimate", style="bold"), Text(f"{sp['estimate_tokens_per_s']:,.0f}", style="bold"),
              f"{sp['label']} (host-bound)" if _host_bound(sp) else f"{sp['label']} (efficiency {sp['efficiency']:.0%})")
    terms = sp["flops"]["terms"]
    t.add_section()
    for name, term in terms.items():
        if term["flops_per_token"]:
            t.add_row(Text(f"  {name}", style="dim"), Text(f"{term['flops_per_token'] / 1e9:.2f} GFLOP/token", style="dim"),
                      Text(term["kind"], style="dim"))
    out.append(t)
    out += [Text(f"note: {n}", style="dim") for n in sp["notes"]]
    claim = result.get("claim")
    if claim:
        style = "bold green" if claim["physically_possible"] else "bold red"
        out.append(Text(f"claim check: {claim['verdict']}", style=style))
        if claim.get("memory_note"):
            out.append(Text(f"  {claim['memory_note']}", style="yellow"))
    if not tm["known"]:
        out.append(Text(tm["why"], style="yellow"))
    else:
        out.append(Text(f"time ({tm['label']}): {_tokens(tm['tokens_per_epoch'])} tokens/epoch "
                        f"({tm['examples']:,} examples x {tm['tokens_per_example']:,.0f} tokens), "
                        f"{_h(tm['hours_per_epoch'])}/epoch, {_h(tm['total_hours'])} for {tm['epochs']:g} epoch(s), "
                        f"{tm['total_steps']:,} optimizer steps -- {tm['target']}; not under "
                        f"{_h(tm['fastest_possible_hours'])} at the ceiling"))
    dl = result.get("deadline")
    if dl:
        verdict = (f"cannot run: {dl['refused']}" if dl["refused"] else
                   f"{'meets' if dl['meets'] else 'misses'} it ({_h(dl['total_hours'])})")
        out.append(Text(f"deadline {dl['deadline_hours']:g} h ({dl['target']}): {verdict}",
                        style="green" if dl["meets"] else "bold red"))
        if dl["options"]:
            d = Table(title="What would meet the deadline")
            for col in ("change", "new time", "fits", "meets"):
                d.add_column(col)
            for o in dl["options"]:
                d.add_row(o["change"], _h(o["hours"]), "yes" if o["fits_memory"] else "no", "yes" if o["meets"] else "no")
            out.append(d)
    out += _render_cost(cs, cur)
    return out


def _render_cost(cs: dict, cur: str) -> list:
    from rich.table import Table
    from rich.text import Text

    out: list = []
    own = cs.get("your_card")
    if own and own["per_job"] is None:
        out.append(Text(f"your {own['gpu']}: no cost -- {own['why']}", style="yellow"))
    elif own and "share_of_month" in own:
        out.append(Text(f"your {own['gpu']}: {own['per_job']:,.2f} {cur} per job, {own['per_epoch']:,.2f} per epoch "
                        f"({own['share_of_month']:.1%} of {own['monthly']:,.2f} {cur}/month; {own['basis']})"))
    elif own:
        out.append(Text(f"your {own['gpu']}: {own['per_job']:,.2f} {cur} per job, {own['per_epoch']:,.2f} per epoch "
                        f"({own['basis']})"))
    c = Table(title=f"Cloud GPUs (each at its own estimated speed), {cur}", caption=f"prices: {cs['prices_file']}")
    for col in ("gpu", "provider", "fits", "tokens/s", "hours/job", "per hour", "per job", "price date"):
        c.add_column(col)
    for r in cs["cloud"]:
        cost = r["cost"]
        c.add_row(r["gpu"], r["provider"], r["verdict"], f"{r['tokens_per_s']:,.0f} ({r['speed_label']})",
                  _h(r.get("hours_per_job")), f"{cost['per_hour']:.2f}" if cost else "-",
                  f"{cost['per_job']:,.2f}" if cost else "-", cost["date"] if cost else "")
    out.append(c)
    if cs["managed"]:
        m = Table(title=f"Managed fine-tuning APIs (tokens x epochs), {cur}")
        for col in ("provider", "service", "per 1M tokens", "per job", "note"):
            m.add_column(col)
        for r in cs["managed"]:
            m.add_row(r["provider"], r["service"], f"{r['per_million_tokens']:.2f}", f"{r['per_job']:,.2f}",
                      "trains the provider's own model" if r["own_models"] else r["note"])
        out.append(m)
    tw = cs.get("twelve_months")
    if tw and tw.get("own_card") and tw["cloud"]:
        best = tw["cloud"][0]
        out.append(Text(f"12 months at {tw['jobs_per_month']:g} jobs/month: own card {tw['own_card']['total']:,.0f} {cur} "
                        f"(incl. maintenance {tw['own_card']['maintenance']:,.0f}) vs cloud {best['gpu']} "
                        f"{best['total']:,.0f} {cur} (incl. setup) -> {tw['cheaper']} is cheaper"))
    if cs.get("storage"):
        st = cs["storage"]
        out.append(Text(f"storage: {st['gb']:.2f} GB artifact, {st['per_month']:.3f} {cur}/month", style="dim"))
    return out
