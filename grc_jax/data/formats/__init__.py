"""Converters from public dataset layouts to GRC records, one module per layout."""

from grc_jax.data.formats import beir, hotpotqa, msmarco, nq, records, squad, text
from grc_jax.data.formats.common import Context, Converter, FormatError, Output, Skip

CONVERTERS: dict[str, Converter] = {
    "beir": beir.convert,
    "msmarco": msmarco.convert,
    "squad": squad.convert,
    "hotpotqa": hotpotqa.convert,
    "nq": nq.convert,
    "text": text.convert,
    "records": records.convert,
}

__all__ = ["CONVERTERS", "Context", "Converter", "FormatError", "Output", "Skip"]
