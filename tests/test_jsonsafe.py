"""The one JSON-safe converter every result writer uses."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from icp_lens.jsonsafe import jsonable


def test_jsonable_makes_strict_json() -> None:
    value = {
        1: (np.float32(0.5), np.int64(3), torch.tensor(2.0)),
        "bad": [math.nan, math.inf, -math.inf, np.float64("nan")],
        "ok": {"s": "x", "b": True, "n": None},
    }
    out = jsonable(value)
    assert out == {"1": [0.5, 3, 2.0], "bad": [None, None, None, None], "ok": {"s": "x", "b": True, "n": None}}
    assert type(out["1"][1]) is int
    json.dumps(out, allow_nan=False)  # strict JSON accepts it


def test_result_writers_share_it() -> None:
    from examples.smollm2_case import run as case_run
    from icp_lens.training import result as train_result

    assert train_result.jsonable is jsonable
    assert case_run._jsonable is jsonable
    with pytest.raises(ValueError):
        json.dumps({"x": math.nan}, allow_nan=False)  # why the converter exists
