"""What the training benchmarks share: choosing contenders from the command line."""
from __future__ import annotations


def choose_contenders(parser, value: str, contenders: dict) -> list[str]:
    """The comma-separated short names in ``value``; a parser error for an unknown one or a
    missing ``fp32`` baseline."""
    chosen = value.split(",")
    unknown = set(chosen) - set(contenders)
    if unknown or "fp32" not in chosen:
        parser.error(f"--contenders: unknown {sorted(unknown)}" if unknown else
                     "--contenders must include fp32, the baseline")
    return chosen
