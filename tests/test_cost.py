"""Cost: the price file is checked, money is converted once, each cloud GPU is costed at its own speed and fit."""

from __future__ import annotations

import pytest
import yaml

from onecard.catalog.prices import DEFAULT_PRICES, HOURS_PER_MONTH, Price, load_prices
from onecard.errors import UserError
from onecard.plan import cost as money
from onecard.recipe import load_recipe


def _write(tmp_path, tree) -> str:
    path = tmp_path / "prices.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return str(path)


def _shipped() -> dict:
    return yaml.safe_load(DEFAULT_PRICES.read_text(encoding="utf-8"))


def test_shipped_prices_state_currency_date_and_source():
    p = load_prices()
    rows = [*p.your_card.values(), *(c[2] for c in p.cloud), *(m[2] for m in p.managed)]
    assert rows and all(r.currency and r.date and r.source for r in rows)
    assert p.output_currency in p.rates


def test_price_without_source_is_refused(tmp_path):
    tree = _shipped()
    del tree["cloud"][0]["source"]
    with pytest.raises(UserError, match="source"):
        load_prices(_write(tmp_path, tree))


def test_unknown_currency_and_gpu_are_refused(tmp_path):
    tree = _shipped()
    tree["cloud"][0]["currency"] = "JPY"
    with pytest.raises(UserError, match="JPY"):
        load_prices(_write(tmp_path, tree))
    tree = _shipped()
    tree["cloud"][0]["gpu"] = "voodoo5"
    with pytest.raises(UserError, match="voodoo5"):
        load_prices(_write(tmp_path, tree))


def test_conversion_to_the_output_currency(tmp_path):
    tree = _shipped()
    tree["output_currency"] = "EUR"
    p = load_prices(_write(tmp_path, tree))
    eur_per_usd = tree["exchange_rates"]["USD"]["rate"] / tree["exchange_rates"]["EUR"]["rate"]
    assert p.convert(Price(10.0, "USD", "d", "s")) == pytest.approx(10.0 * eur_per_usd)
    assert p.convert(Price(10.0, "EUR", "d", "s")) == pytest.approx(10.0)


def test_own_card_share_of_month_and_managed_by_size():
    p = load_prices()
    monthly = Price(73.0, "USD", "d", "s")
    own = money.own_card_cost(73.0, 36.5, monthly, p)
    assert own["per_job"] == pytest.approx(73.0 * 73.0 / HOURS_PER_MONTH)
    assert own["per_epoch"] == pytest.approx(own["per_job"] / 2)
    small = {(r[0], r[2].amount) for r in money.managed_rows(p, 8.0)}
    big = {(r[0], r[2].amount) for r in money.managed_rows(p, 70.6)}
    assert small != big and ("OpenAI", 3.0) in small and ("OpenAI", 3.0) in big
    m = money.managed_cost(30e6, 3, Price(0.48, "USD", "d", "s"), p)
    assert m["per_job"] == pytest.approx(0.48 * 90) and m["billed_tokens"] == 90e6


def _recipe(*sets):
    base = ["model.name_or_path=llama-3-8b", "data.num_examples=50000", "data.mean_tokens_per_example=600",
            "data.packing=true", "training.micro_batch_size=1", "training.grad_accum=8"]
    return load_recipe(None, base + list(sets))


def test_each_cloud_gpu_has_its_own_speed_and_fit():
    from onecard.plan.timecost import time_and_cost

    res = time_and_cost(_recipe("model.name_or_path=llama-3-70b", "method=qlora", "training.offload_weights=false"),
                        gpu="rtx4090")
    rows = {r["gpu"]: r for r in res["cost"]["cloud"]}
    assert rows["rtx4090"]["verdict"] == "does not fit" and rows["rtx4090"]["cost"] is None
    assert rows["h200"]["fits"] and rows["h200"]["cost"]["per_job"] > 0
    # hours on each card follow that card's own speed, not the user's card's wall-clock
    for r in rows.values():
        assert r["hours_per_job"] == pytest.approx(res["time"]["tokens_per_epoch"] / r["tokens_per_s"] / 3600, rel=1e-3)
    assert rows["h200"]["hours_per_job"] < rows["a100-80gb"]["hours_per_job"]
    assert res["cost"]["your_card"]["per_job"] is None  # 70B does not fit the user's 4090


def test_a_recipe_that_streams_is_timed_and_priced_as_it_will_run():
    """offload_weights auto (the default): 70B QLoRA on a 4090 streams, so it has a verdict, hours and a cost at the
    streamed speed (plan/streaming.py), where with streaming off it has none."""
    from onecard.plan.timecost import time_and_cost

    res = time_and_cost(_recipe("model.name_or_path=llama-3-70b", "method=qlora"), gpu="rtx4090")
    rows = {r["gpu"]: r for r in res["cost"]["cloud"]}
    assert rows["rtx4090"]["verdict"] == "fits with streaming" and rows["rtx4090"]["cost"]["per_job"] > 0
    assert res["time"]["memory_verdict"] == "fits with streaming" and "streaming" in res["time"]["label"]
    assert res["cost"]["your_card"]["per_job"] > 0
    off = time_and_cost(_recipe("model.name_or_path=llama-3-70b", "method=qlora", "training.offload_weights=false"),
                        gpu="rtx4090")
    assert res["time"]["hours_per_epoch"] >= off["time"]["hours_per_epoch"]  # copies never make it faster


def test_own_card_cost_and_twelve_months():
    from onecard.plan.timecost import time_and_cost

    res = time_and_cost(_recipe())
    own, hours = res["cost"]["your_card"], res["time"]["total_hours"]
    assert own["per_job"] == pytest.approx(own["monthly"] * hours / HOURS_PER_MONTH)
    tw = res["cost"]["twelve_months"]
    assert tw["own_card"]["total"] > 12 * own["monthly"]  # maintenance hours are added
    cheapest = tw["cloud"][0]
    assert cheapest["total"] == pytest.approx(12 * tw["jobs_per_month"] * cheapest["per_job"])
    assert tw["cheaper"]
    assert res["cost"]["storage"]["gb"] < 1  # a LoRA adapter, not a model


def test_user_price_file_is_used(tmp_path):
    from onecard.plan.timecost import time_and_cost

    tree = _shipped()
    tree["your_card"]["rtx4090"]["monthly"] = 730.0  # 1 USD per hour
    res = time_and_cost(_recipe(), prices_path=_write(tmp_path, tree))
    assert res["cost"]["your_card"]["per_job"] == pytest.approx(res["time"]["total_hours"])


def test_deadline_says_what_would_meet_it():
    from onecard.plan.timecost import time_and_cost

    res = time_and_cost(_recipe("training.epochs=5"), deadline_hours=12)  # ~19 h planned (calibrated 2026-11-28)
    dl = res["deadline"]
    assert dl["meets"] is False and dl["total_hours"] > 12 and dl["target"] == "overnight (~12 h)"
    changes = {o["change"].split(":")[0].split(" instead")[0]: o for o in dl["options"]}
    fewer = next(o for o in dl["options"] if "epochs" in o["change"])
    assert fewer["hours"] <= 12 and fewer["meets"]
    assert any(o["change"].startswith("a bigger card") and o["meets"] for o in dl["options"])
    assert "QLoRA" in changes
    easy = time_and_cost(_recipe("data.num_examples=100"), deadline_hours=4)["deadline"]
    assert easy["meets"] and easy["options"] == []


def test_an_fp8_base_is_priced_only_on_cards_that_run_it():
    """quant.base fp8 fits an A100's or RTX 3090's memory, but lint refuses the run there (no FP8 tensor cores): no
    cost, no own-card year, no deadline met, and no what-if card that would refuse it; FP8 cards keep their costs."""
    from onecard.plan.timecost import REFUSED_VERDICT, time_and_cost

    res = time_and_cost(_recipe("quant.base=fp8", "training.epochs=5"), gpu="rtx3090", deadline_hours=1000)
    rows = {r["gpu"]: r for r in res["cost"]["cloud"]}
    for gpu in ("rtx3090", "a100-80gb"):
        assert rows[gpu]["verdict"] == REFUSED_VERDICT and not rows[gpu]["fits"] and rows[gpu]["cost"] is None
    assert rows["rtx4090"]["fits"] and rows["rtx4090"]["cost"]["per_job"] > 0
    own = res["cost"]["your_card"]
    assert own["per_job"] is None and "no FP8 tensor cores" in own["why"]
    assert "own_card" not in res["cost"]["twelve_months"]
    dl = res["deadline"]
    assert dl["total_hours"] < 1000 and dl["meets"] is False and "rtx3090" in dl["refused"]
    on_4090 = time_and_cost(_recipe("quant.base=fp8", "training.epochs=5"), gpu="rtx4090", deadline_hours=1)
    cards = {o["set"]["plan.gpu"]: o for o in on_4090["deadline"]["options"] if "plan.gpu" in o["set"]}
    assert cards["a100-80gb"]["memory_verdict"] == REFUSED_VERDICT and not cards["a100-80gb"]["fits_memory"]
    assert cards["h200"]["fits_memory"]
    qlora = next(o for o in on_4090["deadline"]["options"] if o["change"] == "QLoRA")
    assert qlora["set"] == {"method": "qlora", "quant.base": "none"}
