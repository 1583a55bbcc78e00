"""SIGKILL a 2-rank ZeRO-3 run at a few points (mid stage 1, at the stage boundary, mid stage 2), resume
with --resume auto, and require the final trainable weights of an uninterrupted run to 1e-6.
The full random sweep is `python -m ptscale.tools.kill_resume --points 10`."""

import pytest
from safetensors.torch import load_file

from ptscale.tools.kill_resume import check_all_loadable, final_weights, kill_after, launch, max_diff, wait


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    wait(launch(out, "reference"), 900)
    return out, final_weights(out / "reference")


@pytest.mark.slow
# mid stage 1; just after the stage boundary's checkpoint; mid stage 2
@pytest.mark.parametrize("n_checkpoints, delay", [(1, 0.5), (3, 0.0), (4, 0.0)])
def test_killed_run_resumes_exactly(reference, n_checkpoints, delay):
    out, ref = reference
    name = f"killed-{n_checkpoints}"
    at_kill = kill_after(out, name, n_checkpoints, delay)
    assert check_all_loadable(out / name) == at_kill >= n_checkpoints
    wait(launch(out, name, "--resume", "auto"), 900)
    assert max_diff(final_weights(out / name), ref) <= 1e-6
    log = (out / f"{name}.log").read_text()
    assert "resuming from" in log


@pytest.mark.slow
def test_resume_on_one_rank_from_two(reference):
    out, ref = reference
    name = "to-one-rank"
    kill_after(out, name, 2, 0.0)
    wait(launch(out, name, "--resume", "auto", ranks=1), 900)
    weights = final_weights(out / name)
    assert weights.keys() == ref.keys()
    assert all(v.isfinite().all() for v in weights.values())
    assert "saved on 2 ranks, now 1" in (out / f"{name}.log").read_text()
    first = load_file(next((out / name / "checkpoints").glob("ckpt-01-*")) / "tuned.safetensors")
    assert first  # the boundary checkpoint written on one rank is readable


def _losses(run):
    import json

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(x["stage"], x["step"], x["loss"]) for x in lines if x["kind"] == "train"]


@pytest.mark.slow
def test_same_seed_same_loss_curve_step_for_step(reference):
    out, _ = reference
    wait(launch(out, "reference-again"), 900)
    first, again = _losses(out / "reference"), _losses(out / "reference-again")
    assert len(first) == 12 and first == again
