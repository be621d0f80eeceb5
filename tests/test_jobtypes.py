from __future__ import annotations

import pytest

from orchestrator.jobtypes import JOB_TYPES, Family, parse_job_type

# CONTRACT §1, copied row by row: type, family, format, quality, credits, w, h, steps,
# guidance, frames, outputs, expected seconds, model variant, bucket cap (MB).
CONTRACT = """
sdxl_image_fast sdxl image fast 1 1024 1024 15 6.0 1 6 30 lustify_sdxl 5
sdxl_image_high sdxl image high 2 1024 1024 25 7.5 1 6 45 lustify_sdxl 10
image_fast wan image fast 1 480 832 25 6.5 1 1 73 wan_2_1_1_3b 5
image_high wan image high 2 480 832 50 7.5 1 1 90 wan_2_1_1_3b 10
video_fast wan video fast 3 480 832 25 6.5 83 1 180 wan_2_1_1_3b 50
video_high wan video high 5 480 832 50 7.5 83 1 280 wan_2_1_1_3b 200
image7b_fast_enhanced wan image fast 2 480 832 25 6.5 1 1 87 wan_2_1_1_3b 20
image7b_high_enhanced wan image high 3 480 832 50 7.5 1 1 104 wan_2_1_1_3b 20
video7b_fast_enhanced wan video fast 4 480 832 25 6.5 83 1 194 wan_2_1_1_3b 100
video7b_high_enhanced wan video high 6 480 832 50 7.5 83 1 294 wan_2_1_1_3b 100
"""


@pytest.mark.parametrize("row", CONTRACT.strip().splitlines())
def test_table_matches_contract(row: str) -> None:
    name, family, fmt, quality, credits, w, h, steps, guide, frames, outs, secs, variant, cap = row.split()
    t = parse_job_type(name)
    assert (t.family, t.format, t.quality) == (Family(family), fmt, quality)
    assert (t.credits, t.width, t.height, t.steps) == (int(credits), int(w), int(h), int(steps))
    assert (t.guidance, t.frames, t.outputs) == (float(guide), int(frames), int(outs))
    assert (t.expected_seconds, t.model_variant) == (float(secs), variant)
    assert t.bucket_cap == int(cap) * 1024 * 1024 and t.bucket == name
    assert t.enhanced == ("7b_" in name)
    assert t.hard_time_limit > t.soft_time_limit > t.expected_seconds


def test_exactly_ten_types_and_unknown_rejected() -> None:
    assert len(JOB_TYPES) == 10
    with pytest.raises(KeyError):
        parse_job_type("video_ultra")


def test_wan_sampler_settings() -> None:
    for t in JOB_TYPES.values():
        expected = ("unipc", 5.0) if t.family is Family.WAN else (None, None)
        assert (t.sample_solver, t.sample_shift) == expected
