"""Messages in our words: a refused pickle is named in one short line that never repeats
torch's advice to allow what was refused (that advice is to run the attacker's code)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipeline.core.errors import DissectError
from pipeline.formats import meta

TORCH_ADVICE = ("add_safe_globals", "safe_globals", "weights_only", "allowlist", "Re-running", "pytorch.org")


class Harmless:
    """A class of this module: a pickle may name it, and it is refused like any code."""

    def __init__(self, value: int = 0) -> None:
        self.value = value


def _calls(function, *args):
    class Payload:
        def __reduce__(self):
            return (function, args)

    return Payload()


@pytest.mark.parametrize(
    "extra, wanted",
    [
        (_calls(eval, "1 + 1"), "eval"),
        (_calls(os.system, "true"), "system"),
        (Harmless(3), "Harmless"),
    ],
)
def test_a_refused_pickle_names_what_it_wanted_in_one_line(tmp_path, extra, wanted):
    torch.save({"tok_embeddings.weight": torch.ones(4, 3), "extra": extra}, tmp_path / "consolidated.00.pth")
    with pytest.raises(DissectError) as error:
        meta.read_embedding(tmp_path)
    message = str(error.value)
    assert "was refused" in message and wanted in message and "\n" not in message
    for advice in TORCH_ADVICE:
        assert advice not in message, message
    assert len(message) < 400


@given(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}(\.[A-Za-z_][A-Za-z0-9_]{0,10}){0,2}", fullmatch=True))
def test_the_reason_keeps_the_name_and_drops_the_advice(name):
    torch_text = (
        "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed.\n"
        f"\tWeightsUnpickler error: Unsupported global: GLOBAL {name} was not an allowed global by default. "
        f"Please use `torch.serialization.add_safe_globals([{name}])` to allowlist this global if you trust it."
    )
    reason = meta._refusal_reason(pickle.UnpicklingError(torch_text))
    assert name in reason
    for advice in TORCH_ADVICE:
        assert advice not in reason


def test_a_reason_without_a_name_is_still_ours():
    reason = meta._refusal_reason(pickle.UnpicklingError("Weights only load failed. weights_only=False would work"))
    assert reason == "it is not a plain state dict"

