"""Money: what a job costs on your card, on cloud GPUs and on managed fine-tuning APIs (pure arithmetic).

Inputs are hours and tokens computed elsewhere (plan/timecost.py) -- each cloud GPU with its *own* speed, never
the user's card's wall-clock -- and prices from catalog/prices.yaml, converted to the file's output currency.
Every amount returned is in that currency; every row keeps the price's date and source.
"""

from __future__ import annotations

from onecard.catalog.prices import HOURS_PER_MONTH, Price, Prices


def _cite(price: Price) -> dict:
    return {"price": price.amount, "currency": price.currency, "date": price.date, "source": price.source,
            "note": price.note}


def own_card_cost(hours_per_job: float, hours_per_epoch: float, monthly: Price, prices: Prices) -> dict:
    """A job's share of a monthly cost: hours / 730 x monthly (the card is yours for the month either way)."""
    per_month = prices.convert(monthly)
    return {"per_job": per_month * hours_per_job / HOURS_PER_MONTH,
            "per_epoch": per_month * hours_per_epoch / HOURS_PER_MONTH,
            "monthly": per_month, "share_of_month": hours_per_job / HOURS_PER_MONTH,
            "jobs_per_month_max": HOURS_PER_MONTH / hours_per_job if hours_per_job > 0 else None,
            "basis": monthly.extra.get("basis", ""), **_cite(monthly)}


def cloud_cost(hours_per_job: float, hours_per_epoch: float, hourly: Price, prices: Prices,
               *, include_setup: bool = True) -> dict:
    """Hours on that cloud GPU x its hourly price (+ setup hours at the blended rate, when asked)."""
    rate = prices.convert(hourly)
    setup = prices.hidden_amount("blended_hourly_rate") * float(prices.hidden.get("setup_hours_per_job", 0) or 0)
    return {"per_hour": rate, "per_job": rate * hours_per_job, "per_epoch": rate * hours_per_epoch,
            "setup_per_job": setup if include_setup else 0.0,
            "per_job_with_setup": rate * hours_per_job + (setup if include_setup else 0.0), **_cite(hourly)}


def managed_rows(prices: Prices, params_b: float) -> list[tuple[str, str, Price]]:
    """Managed offers that apply to a model of ``params_b`` billion parameters (or train their own models)."""
    out = []
    for provider, service, price in prices.managed:
        lo_hi = price.extra.get("params_b")
        if price.extra.get("own_models") or lo_hi is None or (float(lo_hi[0]) < params_b <= float(lo_hi[1])):
            out.append((provider, service, price))
    return out


def managed_cost(tokens_per_epoch: float, epochs: float, price: Price, prices: Prices) -> dict:
    """Billed tokens = tokens in the training file x epochs, at the per-million price."""
    per_m = prices.convert(price)
    return {"per_million_tokens": per_m, "per_epoch": per_m * tokens_per_epoch / 1e6,
            "per_job": per_m * tokens_per_epoch * epochs / 1e6, "billed_tokens": tokens_per_epoch * epochs,
            "own_models": bool(price.extra.get("own_models")), **_cite(price)}


def storage_cost(artifact_bytes: float, prices: Prices, months: float = 1.0) -> dict:
    """Keeping the trained artifact (adapter or full model) in object storage."""
    gb = artifact_bytes / 1e9
    per_gb = prices.hidden_amount("checkpoint_storage_per_gb_month")
    return {"gb": gb, "per_month": gb * per_gb, "months": months, "total": gb * per_gb * months,
            "source": prices.hidden.get("storage_source", "")}


def twelve_month_comparison(own_hours_per_job: float, monthly: Price | None, cloud_rows: list[dict],
                            prices: Prices, jobs_per_month: float | None = None) -> dict:
    """A year of N jobs a month: an owned/dedicated card (its monthly cost + weekly maintenance) against each
    cloud offer that fits (hours on *that* GPU x price + setup per job)."""
    n = float(jobs_per_month if jobs_per_month is not None else prices.hidden.get("jobs_per_month", 4) or 0)
    rate = prices.hidden_amount("blended_hourly_rate")
    maint = float(prices.hidden.get("maintenance_hours_per_week", 0) or 0) * 52 * rate
    out: dict = {"jobs_per_month": n, "currency": prices.output_currency, "cloud": []}
    if monthly is not None:
        fits_month = own_hours_per_job * n <= HOURS_PER_MONTH
        out["own_card"] = {"rent_or_amortisation": 12 * prices.convert(monthly), "maintenance": maint,
                           "total": 12 * prices.convert(monthly) + maint, "hours_per_month": own_hours_per_job * n,
                           "can_run_all_jobs": fits_month}
    for row in cloud_rows:
        per_job = row["cost"]["per_job"] + row["cost"]["setup_per_job"]
        out["cloud"].append({"gpu": row["gpu"], "provider": row["provider"], "per_job": per_job,
                             "total": 12 * n * per_job})
    out["cloud"].sort(key=lambda r: r["total"])
    if "own_card" in out and out["cloud"]:
        best = out["cloud"][0]
        own = out["own_card"]["total"]
        out["cheaper"] = "own card" if own < best["total"] else f"cloud ({best['gpu']}, {best['provider']})"
        out["break_even_jobs_per_month"] = own / (12 * best["per_job"]) if best["per_job"] > 0 else None
    return out
