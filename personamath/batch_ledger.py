"""Money in batch mode: the batch prices of resources/prices.json ("batch_models"), and the ledger that
prices batch lines at them and the rest (--batch_fallback online) at the standard prices."""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError
from .llm import PRICES_FILE, Ledger, cost_of, is_local


def batch_price_of(model: str, base_url: str, prices_file=PRICES_FILE) -> dict | None:
    """USD per million input/output tokens through a batch; None when unknown. A local runner costs nothing."""
    try:
        prices = json.loads(Path(prices_file).read_text()).get("batch_models", {})
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{prices_file}: not a prices file ({e!r}); see {PRICES_FILE} for the format") from None
    if model in prices:
        return prices[model]
    return {"input": 0.0, "output": 0.0} if is_local(base_url) else None


@dataclass
class BatchLedger(Ledger):
    """The Ledger of a batch-mode run: batch lines at batch prices, the rest (fallback) at online ones.
    prompt_tokens and completion_tokens count both; the batch_* fields the batch share."""
    batch_price: dict | None = None
    batch_lines: int = 0  # lines submitted, resubmissions included (requests counts each request once)
    batch_prompt_tokens: int = 0
    batch_completion_tokens: int = 0

    @property
    def cost(self) -> float | None:
        online_prompt = self.prompt_tokens - self.batch_prompt_tokens
        online_completion = self.completion_tokens - self.batch_completion_tokens
        online = cost_of(self.price, online_prompt, online_completion) if online_prompt or online_completion else 0.0
        batch = cost_of(self.batch_price, self.batch_prompt_tokens, self.batch_completion_tokens)
        return None if online is None or batch is None else online + batch

    def as_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("price", "batch_price")}
        return {**data, "price_per_million_tokens": self.price, "batch_price_per_million_tokens": self.batch_price,
                "cost_usd": self.cost}
