"""Prices: an editable YAML file (prices.yaml beside this module), loaded and checked.

Each price keeps its currency, date and source so the output can say where a number came from; amounts are
converted to the file's ``output_currency`` with its ``exchange_rates``. Users point ``--prices FILE`` at their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from onecard.errors import UserError

DEFAULT_PRICES = Path(__file__).with_name("prices.yaml")
HOURS_PER_MONTH = 8760 / 12


@dataclass(frozen=True)
class Price:
    amount: float          # in ``currency``
    currency: str
    date: str
    source: str
    note: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class Prices:
    output_currency: str
    rates: dict[str, float]
    your_card: dict[str, Price]          # gpu id -> monthly cost
    cloud: list[tuple[str, str, Price]]  # (gpu id, provider, hourly price)
    managed: list[tuple[str, str, Price]]  # (provider, service, per-million-token price; extra: params_b, own_models)
    hidden: dict
    path: str

    def convert(self, price: Price | float, currency: str | None = None) -> float:
        """An amount in the output currency."""
        amount, cur = (price.amount, price.currency) if isinstance(price, Price) else (price, currency)
        cur = cur or self.output_currency
        if cur not in self.rates:
            raise UserError(f"no exchange rate for {cur!r}", where=self.path,
                            fix=f"add exchange_rates.{cur}: {{rate: ...}} ({self.output_currency} per 1 {cur})")
        return amount * self.rates[cur] / self.rates[self.output_currency]

    def hidden_amount(self, key: str) -> float:
        return self.convert(float(self.hidden.get(key, 0) or 0), self.hidden.get("currency", self.output_currency))


def _price(row: dict, amount_key: str, where: str) -> Price:
    missing = [k for k in (amount_key, "currency", "date", "source") if k not in row]
    if missing:
        raise UserError(f"price row lacks {', '.join(missing)}", where=where,
                        fix="every price states its amount, currency, date and source")
    try:
        amount = float(row[amount_key])
    except (TypeError, ValueError):
        raise UserError(f"{amount_key} is not a number: {row[amount_key]!r}", where=where) from None
    if amount < 0:
        raise UserError(f"{amount_key} is negative", where=where)
    known = {amount_key, "currency", "date", "source", "note"}
    return Price(amount, str(row["currency"]), str(row["date"]), str(row["source"]), str(row.get("note", "")),
                 {k: v for k, v in row.items() if k not in known})


def load_prices(path: str | Path | None = None) -> Prices:
    """Read and check a price file (default: the shipped one)."""
    import yaml

    src = Path(path) if path else DEFAULT_PRICES
    if not src.is_file():
        raise UserError("price file not found", where=str(src), fix="check the path given to --prices")
    try:
        raw = yaml.safe_load(src.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"not valid YAML: {exc}", where=str(src)) from None
    if not isinstance(raw, dict) or "output_currency" not in raw:
        raise UserError("a price file is a mapping with output_currency, exchange_rates, cloud, ...", where=str(src),
                        fix=f"start from the shipped file: {DEFAULT_PRICES}")
    rates = {str(k): float((v or {}).get("rate", 0)) for k, v in (raw.get("exchange_rates") or {}).items()}
    out = str(raw["output_currency"])
    if rates.get(out, 0) <= 0:
        raise UserError(f"exchange_rates lacks the output currency {out!r}", where=str(src),
                        fix=f"add exchange_rates.{out}: {{rate: 1.0}}")
    from onecard.catalog.gpus import get_gpu

    def gpu_id(name, where):
        try:
            return get_gpu(str(name)).id
        except UserError:
            raise UserError(f"unknown GPU {name!r}", where=where, fix="use an id from `onecard gpus`") from None

    your = {gpu_id(k, f"{src}: your_card.{k}"): _price(v, "monthly", f"{src}: your_card.{k}")
            for k, v in (raw.get("your_card") or {}).items()}
    cloud = [(gpu_id(r.get("gpu"), f"{src}: cloud[{i}]"), str(r.get("provider", "?")),
              _price(r, "per_hour", f"{src}: cloud[{i}]")) for i, r in enumerate(raw.get("cloud") or [])]
    managed = [(str(r.get("provider", "?")), str(r.get("service", "")),
                _price(r, "per_million_tokens", f"{src}: managed[{i}]")) for i, r in enumerate(raw.get("managed") or [])]
    prices = Prices(out, rates, your, cloud, managed, dict(raw.get("hidden") or {}), str(src))
    for p in [*your.values(), *(c[2] for c in cloud), *(m[2] for m in managed)]:
        prices.convert(p)  # every currency has a rate
    return prices
