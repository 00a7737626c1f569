"""Parity with the original implementation, when a recorded reference run is available.

Set TOKENFLOW_REFERENCE_OUT (an output folder of shared/reference/run_reference.py) and
TOKENFLOW_REFERENCE_MODEL (the model folder it used); the video is shared/data/wolf.mp4 unless
TOKENFLOW_REFERENCE_VIDEO says otherwise. Skipped otherwise (CI has neither).
"""
import importlib.util
import os
from pathlib import Path

import pytest

from .conftest import SHARED_DATA

REF = os.environ.get("TOKENFLOW_REFERENCE_OUT")
MODEL = os.environ.get("TOKENFLOW_REFERENCE_MODEL")
VIDEO = os.environ.get("TOKENFLOW_REFERENCE_VIDEO", str(SHARED_DATA / "wolf.mp4"))


@pytest.mark.skipif(not (REF and MODEL and Path(VIDEO).exists()),
                    reason="set TOKENFLOW_REFERENCE_OUT and TOKENFLOW_REFERENCE_MODEL to a reference harness run")
def test_final_latents_and_correspondences_match_the_original():
    spec = importlib.util.spec_from_file_location("check_parity", Path(__file__).parents[1] / "scripts" / "check_parity.py")
    check_parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_parity)
    report = check_parity.compare(REF, MODEL, VIDEO, threads=1)
    assert report["keyframes_equal"]
    assert report["final_rel_l2"] <= 1e-4 and report["final_max_abs"] <= 1e-2, report
    assert report["nn_agreement"] >= 0.999, report
