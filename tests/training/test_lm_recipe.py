"""Language models trained by recipe, as a user runs them: standalone OPT and Llama (grouped-query attention)
from local save_pretrained directories, JSONL data, every stage changing exactly its groups, under ZeRO-3 on
2 ranks; resume after a kill; export. Bad inputs: one line, before the model is built, no run directory."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import ptscale
from ptscale.config import DataConfig
from ptscale.data.text_collate import make_text_collator
from ptscale.runs import load_run
from ptscale.tools.kill_resume import kill_after, launch, max_diff, wait
from tests.launch import TRAIN, assert_one_line, changed_groups, cli, deepspeed
from tests.text_fixtures import reverse_records


def _text_args(lm_dirs, text_data, family):
    train, evals = text_data
    return [f"model.path={lm_dirs[family]}", "data.name=text", f"data.train_file={train}", f"data.eval_file={evals}"]


SHORT = ["methods.prefix.steps=4", "methods.lora.steps=4", "methods.prefix.batch_size=8", "methods.lora.batch_size=8",
         "eval.num_beams=1", "eval.max_new_tokens=4", "eval.batch_size=8"]


def _bad_inputs(tmp_path, lm_dirs, text_data):
    unsupported = tmp_path / "gpt2"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"prompt": "w1",\n')
    columns = tmp_path / "columns.jsonl"
    columns.write_text(json.dumps({"question": "w1", "answer": "w2"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    base = _text_args(lm_dirs, text_data, "opt")
    return {
        "unsupported": ([*base, f"model.path={unsupported}"], 2, ["'gpt2' checkpoint", "opt, llama, qwen2, t5"]),
        "missing": ([*base, f"data.train_file={tmp_path / 'nope.jsonl'}"], 2, ["data.train_file", "does not exist"]),
        "malformed": ([*base, f"data.train_file={malformed}"], 3, [str(malformed), "cannot be read as json"]),
        "column": ([*base, f"data.eval_file={columns}"], 3, [str(columns), "no column 'completion'", "question"]),
        "empty": ([*base, f"data.eval_file={empty}"], 3, [str(empty), "no usable examples"]),
    }


# the data mistakes (exit 3) are found once the tokenizer is loaded (torch in the subprocess): the full suite's
@pytest.mark.parametrize("case", ["unsupported", "missing", *(pytest.param(c, marks=pytest.mark.slow)
                                                             for c in ("malformed", "column", "empty"))])
def test_bad_inputs_one_line_before_the_model_is_built(tmp_path, lm_dirs, text_data, case):
    args, code, needles = _bad_inputs(tmp_path, lm_dirs, text_data)[case]
    out = tmp_path / "runs"
    proc = cli(TRAIN, *args, f"output_dir={out}")
    assert_one_line(proc, code, *needles)
    assert not out.exists()  # nothing written: refused before a run directory (and before any model)
    assert "built" not in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("family,kind", [("opt", "classic"), ("llama", "plus")])
def test_two_rank_zero3_prefix_then_lora(tmp_path, lm_dirs, text_data, family, kind):
    out = deepspeed(2, *_text_args(lm_dirs, text_data, family), *SHORT, "plan=prefix->lora", f"prefix.kind={kind}",
                    f"output_dir={tmp_path}", "run_name=run")
    run = tmp_path / "run"
    assert changed_groups(run / "stage-1-prefix") == {"prefix"}
    assert changed_groups(run / "stage-2-prefix+lora") == {"prefix", "lora"}
    results = json.loads((run / "results.json").read_text())
    points = [e["point"] for e in results["evaluations"]]
    assert points == ["before training", "prefix", "prefix+lora"] and results["world_size"] == 2
    for e in results["evaluations"]:
        m = e["metrics"]
        assert set(m) == {"loss", "perplexity", "exact_match"} and m["perplexity"] == pytest.approx(
            torch.tensor(m["loss"]).exp().item(), rel=1e-6)
    predictions = json.loads((run / "predictions-prefix+lora.json").read_text())
    assert len(predictions) == 16 and all("generated" in r for r in predictions)
    assert "| evaluated" in out and "perplexity" in out  # the results table, printed at the end
    report = cli("-m", "ptscale.cli", "report", str(run))
    assert report.returncode == 0 and "PPL" in report.stdout, report.stderr
    again = cli("-m", "ptscale.cli", "eval", str(run), "--out", str(tmp_path / "eval"))  # one rank, whole model
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["metrics"]
    final = results["evaluations"][-1]["metrics"]
    # the same weights and records, gathered from 2 ranks vs whole on one: float32 reductions in another order
    assert metrics["loss"] == pytest.approx(final["loss"], rel=1e-4)
    # greedy decoding on those logits: a near-tie may flip at most a record or so, never the whole score
    assert metrics["exact_match"] == pytest.approx(final["exact_match"], abs=1 / 16)
    if kind == "classic":  # the run's model exported and reloaded the documented way
        export = cli("-m", "ptscale.cli", "export", str(run), "--merged", str(tmp_path / "merged"))
        assert export.returncode == 0, export.stderr
        trained = load_run(run).model.eval()
        merged = ptscale.from_pretrained(tmp_path / "merged").eval()
        collator = make_text_collator(AutoTokenizer.from_pretrained(lm_dirs[family]),
                                      DataConfig(name="text", max_text_len=32), seq2seq=False)
        batch = collator.train_batch([dict(r, id="0") for r in reverse_records(3, 9)])
        with torch.no_grad():
            # fp32; the export folds the prefix encoder into static keys/values (another summation order)
            torch.testing.assert_close(merged(**batch).logits, trained(**batch).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_killed_llama_run_resumes_to_the_uninterrupted_weights(tmp_path, lm_dirs, text_data):
    extra = (*_text_args(lm_dirs, text_data, "llama"), "prefix.kind=plus", "methods.prefix.batch_size=8",
             "methods.lora.batch_size=8")
    wait(launch(tmp_path, "reference", *extra), 900)
    kill_after(tmp_path, "killed", 4, 0.0, extra=extra)  # mid stage 2
    wait(launch(tmp_path, "killed", *extra, "--resume", "auto"), 900)
    final = "stage-2-prefix+lora/trainable.safetensors"
    assert max_diff(load_file(tmp_path / "killed" / final), load_file(tmp_path / "reference" / final)) <= 1e-6
    assert "resuming from" in (tmp_path / "killed.log").read_text()


@pytest.mark.slow
def test_t5_encoder_decoder_one_rank(tmp_path):
    """An encoder-decoder language model (T5): prompt into the encoder, the completion decoded; Prefix-Tuning+
    in both stacks' self-attention, LoRA on q / v."""
    from tests.text_fixtures import save_lm, write_jsonl

    path = save_lm("t5", tmp_path / "t5")
    train = write_jsonl(tmp_path / "train.jsonl", reverse_records(32, 0))
    evals = write_jsonl(tmp_path / "eval.jsonl", reverse_records(8, 1))
    proc = cli(TRAIN, f"model.path={path}", "data.name=text", f"data.train_file={train}", f"data.eval_file={evals}",
               *SHORT, "plan=prefix->lora", "prefix.kind=plus", f"output_dir={tmp_path}", "run_name=run",
               timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert changed_groups(run / "stage-1-prefix") == {"prefix"}
    assert changed_groups(run / "stage-2-prefix+lora") == {"prefix", "lora"}
    final = json.loads((run / "results.json").read_text())["evaluations"][-1]["metrics"]
    assert set(final) == {"loss", "perplexity", "exact_match"}


@pytest.mark.slow  # a training process that loads torch and builds the model on the meta device
def test_text_default_dry_run_describes_it_without_pre_training(tmp_path):
    """The shipped text default, its backbone not cached yet: checked on the meta device, nothing pre-trained."""
    import os
    import subprocess
    import sys

    from tests.launch import ROOT, user_env

    env = user_env() | {"PTSCALE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, TRAIN, "--recipe", "ptscale/recipes/text-default.yaml", "--dry-run",
                           f"output_dir={tmp_path / 'runs'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run OK" in proc.stdout and "embedded default tiny-llama-text (not pre-trained yet)" in proc.stdout
    assert "data synthetic-text/downstream 1024 train / 128 eval" in proc.stdout
    assert not os.path.exists(tmp_path / "cache") and not os.path.exists(tmp_path / "runs")


@pytest.mark.slow
@pytest.mark.parametrize("extra,stage2,groups", [
    (("plan=prefix->full", "model.gradient_checkpointing=true", "methods.full.steps=4",
      "methods.full.batch_size=8"), "stage-2-prefix+full", {"prefix", "language_model"}),
    (("plan=prefix->lora", "model.quantization=nf4"), "stage-2-prefix+lora", {"prefix", "lora"}),
])
def test_llama_full_fine_tuning_and_quantised_base_one_rank(tmp_path, lm_dirs, text_data, extra, stage2, groups):
    """full = the language model (embeddings and LM head frozen), with gradient checkpointing; an nf4 base."""
    short = [a for a in SHORT if not a.startswith("methods.lora") or "lora" in extra[0]]
    proc = cli(TRAIN, *_text_args(lm_dirs, text_data, "llama"), *short, *extra, f"output_dir={tmp_path}",
               "run_name=run", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert changed_groups(tmp_path / "run" / "stage-1-prefix") == {"prefix"}
    assert changed_groups(tmp_path / "run" / stage2) == groups
