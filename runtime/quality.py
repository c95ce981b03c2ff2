"""The figures of `molmocap export --check` in a model's manifest: what they say, and when they call for a warning.

The check compares the export's next-token predictions with a higher-precision reference's over teacher-forced
positions (export/check.py). Below `POOR_AGREEMENT` top-1 agreement, answers will often differ from the
reference's within a few tokens, which the CLI says once on stderr when it loads such a model.
"""

from __future__ import annotations

POOR_AGREEMENT = 0.9


def summary(check: dict) -> str:
    """One phrase: `next-token agreement 97.2%, logit cosine 0.9933 against int8 (144 positions)`."""
    return (f"next-token agreement {check['top1_agreement']:.1%}, logit cosine {check['cosine_mean']:.4f} against "
            f"{check['reference']} ({check['positions']} positions)")


def is_poor(check: dict | None) -> bool:
    return check is not None and check["top1_agreement"] < POOR_AGREEMENT


def poor_check_notice(check: dict | None) -> str | None:
    """The warning for a model whose check found it far from its reference; None when it was not (or not checked)."""
    if not is_poor(check):
        return None
    return (f"warning: this model's export check measured {summary(check)}: its answers often differ from the "
            "reference's (molmocap info shows the check; a higher-precision --quant is closer)")
