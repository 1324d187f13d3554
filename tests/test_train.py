"""train.py: exact prompt masking, padding-free packing, and real DeepSpeed runs on the CPU through the
launch scripts (ZeRO-2 and ZeRO-3, 1 and 2 ranks) with save, reload and resume."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DATA, ROOT, run_here, run_script
from personamath import sft
from personamath.jsonl import read_jsonl, write_jsonl

STEPS = 10


@pytest.fixture(scope="session")
def tokenizer(embedded_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model)


@pytest.fixture(scope="session")
def real_rows():
    """PersonaMathQA-shaped rows from real GSM8K and MATH solutions."""
    gsm8k = [{"problem": r["question"], "response": r["answer"]} for r in read_jsonl(DATA / "gsm8k/train.jsonl")[:40]]
    math = [{"problem": r["problem"], "response": r["solution"]} for r in read_jsonl(DATA / "math/MATH_train.jsonl")[:40]]
    return gsm8k + math


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, embedded_model):
    from tiny_model import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", tokenizer_dir=embedded_model)


@pytest.fixture(scope="session")
def train_file(tmp_path_factory, real_rows):
    path = tmp_path_factory.mktemp("data") / "PersonaMathQA.jsonl"
    write_jsonl(path, real_rows[:32] + real_rows[40:72])
    return path


@pytest.mark.parametrize("template", sorted(sft.TEMPLATES))
def test_unmasked_tokens_are_exactly_the_response_and_eos(tokenizer, real_rows, template):
    for row in real_rows:
        example = sft.tokenize_example(row["problem"], row["response"], tokenizer, template, max_length=4096)
        ids, labels = example["input_ids"], example["labels"]
        trained = [token for token, label in zip(ids, labels) if label != sft.IGNORE_INDEX]
        assert trained == [label for label in labels if label != sft.IGNORE_INDEX]
        assert tokenizer.decode(trained) == row["response"] + tokenizer.eos_token
        masked = ids[:len(ids) - len(trained)]
        assert labels[:len(masked)] == [sft.IGNORE_INDEX] * len(masked)  # the mask is one prefix
        assert not example["straddled"] and not example["truncated"]
        # The ids are the joint tokenization the model will read, not two tokenizations glued together.
        prompt_name, chat = sft.TEMPLATES[template]
        from personamath.prompts import load_prompt, model_input
        prompt, special = model_input(load_prompt(prompt_name), row["problem"], tokenizer, chat)
        assert ids == tokenizer(prompt + row["response"], add_special_tokens=special).input_ids + [tokenizer.eos_token_id]
        assert tokenizer.decode(masked) == prompt


@pytest.mark.parametrize("template", sorted(sft.TEMPLATES))
def test_reflection_rows_show_the_attempt_they_reflect_on(tokenizer, real_rows, template, tmp_path):
    """A row whose response reflects on a wrong attempt has that attempt in its prompt, never in what is
    trained; a row without one gets the plain prompt. train.py's reader takes both kinds in one file."""
    attempt = "Half of 48 is 20, so the answer is 20."
    response = "Reflection: half of 48 is 24, not 20.\n\nCorrected solution: 48 / 2 = 24. The answer is 24."
    rows = [{"problem": real_rows[0]["problem"], "response": response, "wrong_attempt": attempt},
            {"problem": real_rows[1]["problem"], "response": real_rows[1]["response"], "wrong_attempt": None},
            {"query": real_rows[2]["problem"], "response": real_rows[2]["response"]}]  # the authors' columns
    data = tmp_path / "rows.jsonl"
    write_jsonl(data, rows)
    loaded = sft.load_rows([str(data)])
    assert [r["wrong_attempt"] for r in loaded] == [attempt, None, None]
    dataset = sft.tokenized_dataset(loaded, tokenizer, template, 4096, tmp_path / "cache")
    assert dataset["shows_wrong_attempt"] == [True, False, False]
    assert sft.data_stats(dataset)["shown_a_wrong_attempt"] == 1
    for row, ids, labels in zip(loaded, dataset["input_ids"], dataset["labels"]):
        trained = [t for t, label in zip(ids, labels) if label != sft.IGNORE_INDEX]
        prompt = tokenizer.decode(ids[:len(ids) - len(trained)])
        assert tokenizer.decode(trained) == row["response"] + tokenizer.eos_token
        assert (attempt in prompt) == (row["wrong_attempt"] is not None)
        assert ("### Wrong attempt:" in prompt) == (row["wrong_attempt"] is not None)
    write_jsonl(data, [{**rows[0], "wrong_attempt": 3}])
    with pytest.raises(sft.UserError, match=f"{data}:1: wrong_attempt must be text or null"):
        sft.load_rows([str(data)])


def test_boundary_token_shared_with_the_prompt_is_trained_and_counted(tokenizer):
    # "### Response:" + ":=" tokenizes with ":" and ":=" merged; the shared token is trained and counted.
    example = sft.tokenize_example("Define x.", ":= 3 is the definition.", tokenizer, "alpaca", max_length=4096)
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != sft.IGNORE_INDEX]
    assert tokenizer.decode(trained) == "::= 3 is the definition." + tokenizer.eos_token
    assert example["straddled"]


def test_truncation_is_counted_and_rows_without_response_tokens_are_reported(tokenizer, real_rows, tmp_path):
    rows = real_rows[:4]
    dataset = sft.tokenized_dataset(rows, tokenizer, "alpaca", max_length=64, cache_dir=tmp_path)
    stats = sft.data_stats(dataset)
    assert stats["examples"] == 4 and stats["max_length"] == 64
    assert stats["truncated"] == sum(len(sft.tokenize_example(r["problem"], r["response"], tokenizer, "alpaca",
                                                              4096)["input_ids"]) > 64 for r in rows) > 0
    tiny = sft.data_stats(sft.tokenized_dataset(rows, tokenizer, "alpaca", max_length=8, cache_dir=tmp_path))
    assert tiny["dropped_no_response_tokens"] == 4
    # Tokenized once: a second call reads the cache file instead of writing it again.
    [cache] = tmp_path.glob("sft-alpaca-64-*.arrow")
    written = cache.stat().st_mtime_ns
    assert sft.tokenized_dataset(rows, tokenizer, "alpaca", max_length=64, cache_dir=tmp_path)["length"] == dataset["length"]
    assert cache.stat().st_mtime_ns == written


def test_pad_token_never_grows_the_vocabulary(embedded_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    size = len(tokenizer)
    assert "own" in sft.choose_pad_token(tokenizer) and tokenizer.pad_token == "<|im_end|>"
    tokenizer.pad_token = None  # as LLaMA-2 and LLaMA-3 ship: no pad token
    assert "unused" in sft.choose_pad_token(tokenizer)
    assert tokenizer.pad_token == tokenizer.unk_token and len(tokenizer) == size


@pytest.mark.parametrize("attention", ["sdpa", "eager", "sdpa_packed"])
def test_packed_examples_do_not_attend_to_each_other(tiny_model, tokenizer, real_rows, attention):
    from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

    import personamath.packed_attention  # noqa: F401 - registers sdpa_packed, which train.py uses with --packing
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention).eval()
    examples = [sft.tokenize_example(r["problem"], r["response"], tokenizer, "alpaca", 4096) for r in real_rows[:3]]
    batch = DataCollatorWithFlattening(return_position_ids=True, separator_id=sft.IGNORE_INDEX)(
        [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    assert batch["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))  # no padding
    with torch.no_grad():
        # As in training: no KV cache (with one, transformers does not look for packed sequences).
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples])
    assert torch.allclose(packed, alone, atol=1e-4)


def test_bad_data_line_is_named_and_nothing_is_trained(tiny_model, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"problem": "1+1?", "response": "2"}\n{"problem": "2+2?"}\n')
    result = run_here("train.py", "--model_name_or_path", tiny_model, "--data_path", data, "--output_dir",
                      tmp_path / "out", "--use_cpu", "True")
    assert result.returncode == 2
    assert f"error: {data}:2: record has no response" in result.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.fixture(scope="session")
def one_row(tmp_path_factory, real_rows):
    path = tmp_path_factory.mktemp("one_row") / "PersonaMathQA.jsonl"
    write_jsonl(path, real_rows[:1])
    return path


def test_a_run_that_cannot_change_the_model_is_refused_before_training(tiny_model, one_row, tmp_path, monkeypatch):
    """One row for one epoch with the defaults (1 x 4 accumulation, warmup 3% of the steps) makes one
    optimizer step, and the cosine schedule's warmup holds it at learning rate 0: refused, with the numbers,
    before the Trainer trains."""
    import transformers

    def train(*args, **kwargs):
        raise AssertionError("the Trainer trained a run that was to be refused")

    monkeypatch.setattr(transformers.Trainer, "train", train)
    out = tmp_path / "out"
    result = run_here("train.py", "--model_name_or_path", tiny_model, "--data_path", one_row, "--output_dir", out,
                      "--use_cpu", "True", "--num_train_epochs", "1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert ("error: training would not change the model: rows 1, global batch 4 (per device 1 x accumulation "
            "steps 4 x data-parallel ranks 1), epochs 1: optimizer steps 1, of them at a learning rate above 0: 0 "
            "(warmup steps 1, learning rate 2e-05, cosine schedule). For a step at a learning rate above 0: lower "
            "--gradient_accumulation_steps") in result.stderr
    assert "--warmup_steps 0" in result.stderr and "--allow_no_update True trains anyway" in result.stderr
    assert not list(out.glob("*"))


def test_allow_no_update_trains_and_records_an_unchanged_model(tiny_model, one_row, tmp_path, caplog):
    """--allow_no_update trains the refused run: its one step, at learning rate 0 as planned, leaves every
    weight as it was, and training_summary.json and the log say so."""
    from safetensors import safe_open

    out = tmp_path / "out"
    result = run_here("train.py", "--model_name_or_path", tiny_model, "--data_path", one_row, "--output_dir", out,
                      "--use_cpu", "True", "--num_train_epochs", "1", "--allow_no_update", "True")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "training_summary.json").read_text())
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [(h["step"], h["learning_rate"]) for h in history if "loss" in h] == [(1, 0.0)]
    assert summary["examples"] == 1 and summary["optimizer_steps"] == summary["planned_optimizer_steps"] == 1
    assert summary["planned_steps_above_zero_lr"] == 0
    assert summary["loss_curve"] == [[1, summary["loss_first"]]] and summary["loss_last"] == summary["loss_first"]
    with safe_open(tiny_model / "model.safetensors", "pt") as base:
        tensors = len(base.keys())
    assert summary["weights"] == {"base": str(tiny_model), "compared": True, "tensors_compared": tensors,
                                  "tensors_changed": 0, "max_abs_change": 0.0, "relative_change": 0.0,
                                  "equals_base": True}
    assert summary["provenance"]["versions"]["transformers"]
    assert "training anyway (--allow_no_update)" in caplog.text
    assert "the trained model EQUALS the base model: no weight changed in 1 optimizer step (0 planned" in caplog.text


def test_weight_change_reads_sharded_folders_tensor_by_tensor(tiny_model, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from personamath.training_check import weight_change

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.save_pretrained(tmp_path / "base", max_shard_size="500KB")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 0.5
    model.save_pretrained(tmp_path / "trained", max_shard_size="5MB")  # shards split elsewhere
    base_shards, trained_shards = (sorted((tmp_path / name).glob("*.safetensors")) for name in ("base", "trained"))
    assert len(base_shards) > len(trained_shards) > 1
    base = {k: v for shard in base_shards for k, v in load_file(shard).items()}
    trained = {k: v for shard in trained_shards for k, v in load_file(shard).items()}
    norm = torch.cat([t.flatten() for t in base.values()]).double().norm().item()
    step = (trained["model.layers.1.mlp.down_proj.weight"] - base["model.layers.1.mlp.down_proj.weight"]).abs().max()

    change = weight_change(tmp_path / "base", tmp_path / "trained")
    assert change["compared"] and not change["equals_base"]
    assert change["tensors_compared"] == len(base) and change["tensors_changed"] == 1
    assert change["max_abs_change"] == step.item() == pytest.approx(0.5)
    assert change["relative_change"] == pytest.approx(step.item() / norm, rel=1e-5)
    same = weight_change(tiny_model, tmp_path / "base")  # one file against shards
    assert same["equals_base"] and same["max_abs_change"] == 0 and same["tensors_compared"] == len(base)
    hub = weight_change("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path / "trained")
    assert not hub["compared"] and "not a local folder of safetensors weights" in hub["why"]
    (tmp_path / "empty").mkdir()
    assert "holds no tensor named as one in" in weight_change(tmp_path / "base", tmp_path / "empty")["why"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(zero: int, ranks: int, model, data, out: Path, *extra: str, timeout: float = 600, check: bool = True):
    """run_zero{2,3}.sh as a user runs it, on `ranks` CPU ranks; with `check`, it must succeed."""
    env = {**os.environ, "MODEL_PATH": str(model), "DATA_PATH": str(data), "OUTPUT_DIR": str(out),
           "NUM_GPUS": str(ranks), "MASTER_PORT": str(_free_port()), "PER_DEVICE_BATCH_SIZE": "4",
           "GRAD_ACCUM": "1", "MAX_LENGTH": "256", "SAVE_STEPS": "5",
           "DEEPSPEED": str(Path(sys.executable).parent / "deepspeed"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("OMP_NUM_THREADS", None)
    result = subprocess.run(["bash", f"run_zero{zero}.sh", *extra], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0 or not check, result.stdout[-3000:] + result.stderr[-5000:]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{env['MASTER_PORT']}_*"))  # cleaned up
    return result


def losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def logits(model_dir, state_dict=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 50, 300, 7000, 12, 4095]])).logits


@pytest.fixture(scope="session")
def zero3_two_ranks(tmp_path_factory, tiny_model, train_file):
    out = tmp_path_factory.mktemp("zero3x2") / "out"
    launch(3, 2, tiny_model, train_file, out, "--max_steps", str(STEPS), "--learning_rate", "1e-3")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("zero,ranks", [(2, 1), (2, 2), (3, 1), (3, 2)])
def test_training_lowers_loss_and_saves_the_trained_weights(zero, ranks, tmp_path, tiny_model, train_file,
                                                            zero3_two_ranks):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    out = zero3_two_ranks if (zero, ranks) == (3, 2) else tmp_path / "out"
    if out != zero3_two_ranks:
        launch(zero, ranks, tiny_model, train_file, out, "--max_steps", str(STEPS), "--learning_rate", "1e-3",
               "--packing", "False" if ranks == 1 else "True")
    curve = losses(out)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert sum(curve[s] for s in (8, 9, 10)) < sum(curve[s] for s in (1, 2, 3)) - 0.3
    epoch = json.loads((out / "trainer_state.json").read_text())["log_history"][0]["epoch"]
    assert epoch == pytest.approx(4 * ranks / 64)  # every rank took its own 4 of the 64 examples
    stats = json.loads((out / "train_data_stats.json").read_text())
    assert stats["examples"] == 64 and stats["truncated"] > 0
    # training_summary.json: the steps the plan counted are the steps the Trainer made, at the rates it
    # logged, and the weight change is the one between the saved files.
    summary = json.loads((out / "training_summary.json").read_text())
    rates = [h["learning_rate"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
             if "loss" in h]
    assert summary["examples"] == 64 - stats["dropped_no_response_tokens"]  # the rows trained on
    assert summary["optimizer_steps"] == summary["planned_optimizer_steps"] == STEPS
    assert summary["planned_steps_above_zero_lr"] == sum(rate > 0 for rate in rates) == STEPS - 1  # warmup: 1 step
    assert summary["loss_curve"] == [[step, curve[step]] for step in sorted(curve)]
    assert (summary["loss_first"], summary["loss_last"]) == (curve[1], curve[STEPS])
    weights = summary["weights"]
    assert weights["compared"] and not weights["equals_base"] and 0 < weights["tensors_changed"]
    saved, base = load_file(out / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    assert weights["tensors_compared"] == len(base)
    assert weights["max_abs_change"] == max((saved[k] - base[k]).abs().max().item() for k in base)
    # The consolidated model reloads in this (fresh) process with the weights DeepSpeed trained: the
    # fp32 master weights rebuilt from the last checkpoint's partitions give the same logits.
    trained = get_fp32_state_dict_from_zero_checkpoint(str(out / f"checkpoint-{STEPS}"))
    assert torch.equal(logits(out), logits(tiny_model, trained))
    assert not torch.allclose(logits(out), logits(tiny_model), atol=1e-3)


@pytest.mark.slow
def test_ranks_under_zero3_refuse_a_run_that_cannot_change_the_model(tmp_path, tiny_model, one_row):
    """Each rank plans the same steps from its own dataloader and refuses, before DeepSpeed starts: the
    launch fails at once, with no rank left waiting for another."""
    result = launch(3, 2, tiny_model, one_row, tmp_path / "out", "--num_train_epochs", "1", timeout=300, check=False)
    assert result.returncode != 0
    assert ("error: training would not change the model: rows 1, global batch 8 (per device 4 x accumulation "
            "steps 1 x data-parallel ranks 2), epochs 1: optimizer steps 1, of them at a learning rate above 0: 0"
            ) in result.stderr
    assert not list((tmp_path / "out").glob("*"))


@pytest.mark.slow
def test_resume_continues_the_same_loss_curve(tmp_path, tiny_model, train_file, zero3_two_ranks):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(zero3_two_ranks / "checkpoint-5", out / "checkpoint-5")
    result = launch(3, 2, tiny_model, train_file, out, "--max_steps", str(STEPS), "--learning_rate", "1e-3",
                    "--resume_from_checkpoint", str(out / "checkpoint-5"), "--log_level", "info")
    assert "Resuming training from checkpoint with epoch 0 and global step 5" in result.stdout + result.stderr
    resumed, straight = losses(out), losses(zero3_two_ranks)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # steps 1-5 restored from the checkpoint's state
    for step in resumed:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-4), step
    assert torch.allclose(logits(out), logits(zero3_two_ranks), atol=1e-5)


@pytest.mark.slow
def test_vllm_loads_the_trained_model_with_its_logits(zero3_two_ranks):
    """vLLM's log-probabilities of a prompt under the saved model equal the HF model's. The engine is the
    eval scripts' own (make_llm, in this process, shut down before exit): an engine in its own process
    left vLLM's output thread freeing tensors as Python exited, and 1 run in 8 aborted there
    ("terminate called without an active exception")."""
    script = (
        "import json, sys\n"
        "from vllm import SamplingParams\n"
        "from personamath.inference import make_llm\n"
        "llm = make_llm(sys.argv[1], dtype='float32', in_process=True)\n"
        "out = llm.generate([{'prompt_token_ids': [1, 50, 300, 7000, 12, 4095]}],"
        " SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0))\n"
        "llm.llm_engine.engine_core.shutdown()\n"
        "print('LOGPROBS', json.dumps([next(iter(d.values())).logprob for d in out[0].prompt_logprobs[1:]]))\n")
    result = run_script("-c", script, str(zero3_two_ranks), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    [line] = [line for line in result.stdout.splitlines() if line.startswith("LOGPROBS ")]
    vllm_logprobs = json.loads(line.removeprefix("LOGPROBS "))
    ids = [1, 50, 300, 7000, 12, 4095]
    hf = torch.log_softmax(logits(zero3_two_ranks)[0], -1)
    expected = [hf[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert vllm_logprobs == pytest.approx(expected, abs=1e-3)


@pytest.mark.slow
def test_embedded_model_trains_under_zero2(tmp_path, embedded_model, train_file):
    out = tmp_path / "out"
    launch(2, 1, embedded_model, train_file, out, "--max_steps", "3", "--per_device_train_batch_size", "2",
           "--save_strategy", "no", "--learning_rate", "1e-4")
    assert len(losses(out)) == 3
    assert not torch.equal(logits(out), logits(embedded_model))


def launched_arguments(tmp_path, zero: int, env: dict, *extra: str) -> list[str]:
    """What run_zero{2,3}.sh hands train.py: a stand-in `deepspeed` records its arguments."""
    recorder = tmp_path / "deepspeed"
    recorder.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "argv"}\n')
    recorder.chmod(0o755)
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "MODEL_PATH": "m",
            "DATA_PATH": "d.jsonl", "OUTPUT_DIR": str(tmp_path / "out"), "DEEPSPEED": str(recorder)}
    subprocess.run(["bash", f"run_zero{zero}.sh", *extra], cwd=ROOT, env={**base, **env}, check=True, timeout=60)
    argv = (tmp_path / "argv").read_text().splitlines()
    return argv[argv.index("train.py") + 1:]


def parsed(argv: list[str]):
    """train.py's three argument dataclasses as dicts, the DeepSpeed config left out (the launcher's own:
    parsing it here would set up DeepSpeed in the test process)."""
    import train

    if "--deepspeed" in argv:
        i = argv.index("--deepspeed")
        argv = argv[:i] + argv[i + 2:]
    # distributed_state: a process-state object, made anew by each parse
    return [{k: v for k, v in vars(a).items() if k != "distributed_state"}
            for a in train.TrainParser().parse_args_into_dataclasses(args=argv)[:3]]


@pytest.mark.parametrize("zero", [2, 3])
def test_launch_scripts_hold_no_training_default(tmp_path, zero):
    """Every training setting is train.py's: run_zero{2,3}.sh with no knob set hands train.py no training
    flag, so `bash run_zero2.sh` and `python train.py` with the same arguments train alike; a knob set is
    passed on as its flag, and arguments after the script come last (they win)."""
    assert launched_arguments(tmp_path, zero, {"MODEL_PATH": "", "DATA_PATH": "", "OUTPUT_DIR": ""}) == [
        "--deepspeed", f"configs/ds_zero{zero}.json"]  # fp32 on the CPU: no precision flag either
    argv = launched_arguments(tmp_path, zero, {}, "--seed", "7")
    assert argv == ["--deepspeed", f"configs/ds_zero{zero}.json", "--model_name_or_path", "m", "--output_dir",
                    str(tmp_path / "out"), "--data_path", "d.jsonl", "--seed", "7"]
    by_hand = parsed(["--model_name_or_path", "m", "--data_path", "d.jsonl", "--output_dir", str(tmp_path / "out"),
                      "--seed", "7"])
    assert parsed(argv) == by_hand
    assert by_hand[2]["learning_rate"] == 2e-5 and by_hand[2]["gradient_accumulation_steps"] == 4
    knobs = {"LR": ("--learning_rate", "1e-4"), "PACKING": ("--packing", "True"), "SEED": ("--seed", "3"),
             "GRAD_ACCUM": ("--gradient_accumulation_steps", "2"), "MAX_LENGTH": ("--model_max_length", "512")}
    argv = launched_arguments(tmp_path, zero, {k: v for k, (_, v) in knobs.items()}, "--seed", "9")
    for flag, value in knobs.values():
        assert argv[argv.index(flag) + 1] == value
    assert parsed(argv)[2]["seed"] == 9 and parsed(argv)[1]["packing"] is True
    launchers = [(ROOT / name).read_text() for name in ("scripts/launch_train.sh", "run_zero2.sh", "run_zero3.sh")]
    assert not any(re.search(rf"\${{{knob}:-[^}}]", text) for knob in [*knobs, "MODEL_PATH", "DATA_PATH", "OUTPUT_DIR"]
                   for text in launchers)  # a default such as ${LR:-2e-5}


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs/recipes").glob("*.yaml")))
def test_a_recipe_trains_alike_by_hand_and_through_the_launchers(tmp_path, recipe):
    """`python train.py --config R` and `bash run_zero{2,3}.sh --config R` parse to the same arguments, and
    each value of the recipe's train section is the one train.py trains with: no launcher, default or
    rename stands between the recipe and the Trainer."""
    import yaml

    path = ROOT / "configs/recipes" / recipe
    section = yaml.safe_load(path.read_text())["train"]
    paths = ["--model_name_or_path", "m", "--data_path", "d.jsonl", "--output_dir", str(tmp_path / "out")]
    by_hand = parsed(["--config", str(path), *paths])
    for zero in (2, 3):
        launched = launched_arguments(tmp_path, zero, {}, "--config", str(path))
        assert parsed(launched) == by_hand
    values = {k: v for group in by_hand for k, v in group.items()}
    for key, value in section.items():
        if key != "model_name_or_path" and value is not None:
            assert values[key] == value, key
