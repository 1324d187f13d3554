"""Every command the README and docs/ show, tried so that none rots: each is read out of its ```bash
block and given to the script's own argument parser (flags, choices, recipe files, the files it names);
the launch scripts run with a stand-in `deepspeed` that prints the command they would start, which
train.py's parser then reads; the `hf` CLI is asked for its options. The README's quickstart runs for
real, scaled down: generation against the fake OpenAI server in place of the embedded one (the
embedded server is started and stopped by tests/test_chain.py), then build_dataset, training under
ZeRO-2 on the CPU, evaluation and the report. docs/full-scale.md's by-hand reproduction runs too, scaled
down: the fake server for gpt-4o-mini, a tiny model for each 7B base, two CPU ranks for eight GPUs."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDERS = {"PATH": "runs/quick/train", "R": "runs/full", "URL": "http://127.0.0.1:8000/v1",
                "name": "Qwen2.5-7B", "NUM": "4"}


def commands(path: Path, section: str | None = None) -> list[tuple[int, str]]:
    """(line, command) of every command in the file's ```bash blocks (in `section`'s only: the lines from
    its `## ` heading to the next): continuation lines joined, comments and blank lines left out."""
    found, block, start, pending, inside = [], None, 0, "", section is None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if section is not None and line.startswith("## "):
            inside = line == f"## {section}"
        if line.strip().startswith("```"):
            block = "bash" if block is None and line.strip() == "```bash" else None
            continue
        if block != "bash" or not inside:
            continue
        text = line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not text and not pending:
            continue
        if not pending:
            start = number
        pending += text.rstrip("\\").strip() + " "
        if not text.endswith("\\"):
            found.append((start, pending.strip()))
            pending = ""
    return found


def expand(command: str) -> str:
    """Shell variables as placeholders of the right kind ($R/gen -> runs/full/gen)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: PLACEHOLDERS.get(m.group(1), m.group(1)), command)


def split(command: str) -> tuple[dict, list[str]]:
    """(environment assignments in front, the words of the command)."""
    words = shlex.split(expand(os.path.expandvars(command)))  # $PATH from the environment, others placeholders
    env = {}
    while words and re.fullmatch(r"\w+=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


def parse_script(script: str, argv: list[str]) -> None:
    """The script's own parser reads argv (SystemExit on an unknown flag, a bad choice, a missing file)."""
    sys.path.insert(0, str(ROOT))
    name = Path(script).stem
    if name in ("gen_cot", "persona_augment", "reflection"):
        __import__(name).build_parser().parse_args(argv)
    elif name == "build_dataset":
        from personamath.dataset import build_parser

        build_parser().parse_args(argv)
    elif name in ("eval_gsm8k", "eval_math"):
        from personamath.evaluation import build_parser

        build_parser(name.removeprefix("eval_")).parse_args(argv)
    elif name == "evaluate":
        import evaluate

        args, rest = evaluate.build_parser().parse_known_args(argv)
        for task in args.tasks:
            evaluate.task_args(task, args, rest)
    elif name == "train":
        import train

        train.TrainParser().parse_args_into_dataclasses(args=argv)
    elif name == "report":
        import report

        report.build_parser().parse_args(argv)
    elif name == "chain":
        import chain

        chain.parse_args(argv)
    else:
        raise AssertionError(f"no parser known for {script}")


def check(command: str, where: str) -> None:
    env, words = split(command)
    if not words or words[0] == "export":  # a setting for the commands after it
        return
    if words[:2] == ["source", ".venv/bin/activate"]:
        assert (ROOT / ".venv/bin/activate").exists()
    elif words[0] == "make":
        assert re.search(rf"^{words[1]}:", (ROOT / "Makefile").read_text(), re.M), where
    elif words[0] == "hf":
        help_text = subprocess.run([str(ROOT / ".venv/bin/hf"), *words[1:2], "--help"], capture_output=True,
                                   text=True).stdout
        for flag in (w.split("=")[0] for w in words if w.startswith("--")):
            assert flag in help_text, (where, flag)
    elif words[0] == "bash":
        # the launcher with a stand-in deepspeed: the train.py command it would run, read by train.py's parser
        result = subprocess.run(["bash", *words[1:]], cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, **env, "DEEPSPEED": "echo"})
        assert result.returncode == 0, (where, result.stderr)
        launched = shlex.split(result.stdout.strip().splitlines()[-1])
        argv = launched[launched.index("train.py") + 1:]
        # the DeepSpeed config exists; parsed without it (with it, the arguments start a process group)
        config = argv.index("--deepspeed")
        assert (ROOT / argv[config + 1]).is_file(), where
        parse_script("train.py", argv[:config] + argv[config + 2:])
    elif words[0] in ("python", ".venv/bin/python"):
        if words[1] == "-m":
            assert words[2] == "personamath.serve", where
            from personamath.serve import build_parser

            build_parser().parse_args(words[3:])
        else:
            assert (ROOT / words[1]).is_file(), where
            parse_script(words[1], words[2:])
    else:
        raise AssertionError(f"{where}: a command no test knows how to check: {command}")


CASES = [(f"{path.relative_to(ROOT)}:{line}", command) for path in DOCS for line, command in commands(path)]


def test_the_docs_show_commands():
    assert len(CASES) > 30 and any(where.startswith("README.md") for where, _ in CASES)


@pytest.mark.parametrize("where, command", CASES, ids=[where for where, _ in CASES])
def test_every_command_shown_parses(where, command, monkeypatch):
    monkeypatch.chdir(ROOT)
    if "URL=$(" in command:  # the quickstart's server start: its own parser reads it
        command = command.split("$(", 1)[1].rstrip(")")
    try:
        check(command, where)
    except SystemExit as exit:
        raise AssertionError(f"{where}: {command}: the script's parser refused it (exit {exit.code})") from None


@pytest.mark.slow
def test_the_quickstart_runs(tmp_path, embedded_model):
    """The README's quickstart, command by command, scaled down: its run folder in tmp_path, generation
    against the fake server (every MATH train question's gold known to it) in place of the embedded
    server, 12 questions instead of 36, training stopped after 2 steps, 2 test problems a set."""
    from fake_server import FakeServerConfig, start_in_thread

    from personamath.data import load_problems

    run = tmp_path / "quick"
    problems = load_problems("math", ROOT / "data" / "math" / "MATH_train.jsonl")
    steps = [command for _, command in commands(ROOT / "README.md", "Quickstart")]
    assert any("serve start" in c for c in steps) and any("report.py" in c for c in steps)
    assert not any(c.startswith("make ") for c in steps)  # the set-up's own commands are CI's (.ci/run)
    with start_in_thread(FakeServerConfig(problems=problems)) as server:
        for command in steps:
            if command.startswith("source ") or "personamath.serve" in command:
                continue  # the environment is this one; the server is the fake one
            command = (command.replace("runs/quick", str(run)).replace("$URL", server.url)
                       .replace("--limit 36", "--limit 12").replace("--limit 8", "--limit 2"))
            if "evaluate.py" in command:
                command += " --limit 2"
            if "run_zero2.sh" in command:
                command += " --max_steps 2"
            env, words = split(command)
            if words[0] == "python":
                words[0] = sys.executable
            result = subprocess.run(words, cwd=ROOT, capture_output=True, text=True, timeout=900,
                                    env={**os.environ, **env, "PATH": f"{ROOT / '.venv/bin'}:{os.environ['PATH']}"})
            assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
    assert (run / "dataset" / "PersonaMathQA.jsonl").stat().st_size > 0
    assert (run / "train" / "training_summary.json").exists()
    assert (run / "eval" / "PersonaMath-SmolLM2-135M-Instruct" / "gsm8k" / "summary.json").exists()
    assert "What happened to the data" in (run / "report.md").read_text()


@pytest.mark.slow
def test_the_full_scale_cost_shown_is_what_the_command_prints(tmp_path):
    """docs/full-scale.md's one figure for the paper's whole run is what `chain.py --recipe paper-v2
    --dry_run` prints today (no key, nothing sent)."""
    text = (ROOT / "docs" / "full-scale.md").read_text()
    row = re.search(r"^\| \*\*the whole run\*\* \|(.*)\|$", text, re.M).group(1)
    shown = [cell.strip(" *").replace(",", "") for cell in row.split("|")]
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    result = subprocess.run([sys.executable, "chain.py", "--recipe", "paper-v2", "--runs_dir", str(tmp_path),
                             "--dry_run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    total = next(line for line in result.stdout.splitlines() if line.startswith("chain --dry_run: total"))
    assert total.replace(",", "").split()[-4:] == shown, (total, shown)


def scaled_down(command: str, model: Path) -> str:
    """A full-scale command as it runs here: a handful of questions, the tiny model for each 7B base, two
    CPU ranks for 8 GPUs, two optimizer steps, one engine shard, two test problems of 32 tokens."""
    if command.startswith(("python gen_cot.py", "python persona_augment.py", "python reflection.py")):
        command += " --limit 10"
    if "bash run_zero" in command:
        command = re.sub(r"MODEL_PATH=\S+", f"MODEL_PATH={model}", command).replace("NUM_GPUS=8", "NUM_GPUS=2")
        command += " --max_steps 2"
    if "--tensor_parallel_size 4" in command:
        command = command.replace("--tensor_parallel_size 4", "--tensor_parallel_size 1") + " --limit 2 --max_tokens 32"
    return command


@pytest.mark.slow
def test_the_full_scale_commands_run_scaled_down(tmp_path, embedded_model):
    """docs/full-scale.md's by-hand reproduction, command by command, as bash runs them (the run folder
    $R in tmp_path), scaled down: generation against the fake server standing in for gpt-4o-mini (it knows
    every train question's gold; it gets some wrong, so reflection has work), the tiny model for each base.
    The three launches are one command once scaled down (the base models all become the tiny one) but for
    the output folder: the one the evaluation commands read runs."""
    from fake_server import FakeServerConfig, start_in_thread
    from tiny_model import make_tiny_llama

    from personamath.data import TRAIN_FILES, load_problems

    tiny = make_tiny_llama(tmp_path / "tiny", tokenizer_dir=embedded_model)
    run = tmp_path / "full"
    steps = [scaled_down(command, tiny) for _, command in commands(ROOT / "docs" / "full-scale.md",
                                                                    "Reproducing the paper at full scale")]
    assert steps[:2] == ["export OPENAI_API_KEY=...", "R=runs/full"], steps[:2]
    launches = [c for c in steps[2:] if "bash run_zero" in c]
    assert len(launches) == 3 and len({re.sub(r"OUTPUT_DIR=\S+", "", c) for c in launches}) == 1, launches
    evaluated = re.search(r"--model (\S+)", next(c for c in steps if "eval_gsm8k.py" in c))[1]
    problems = [p for source, path in TRAIN_FILES.items() for p in load_problems(source, ROOT / path)]
    with start_in_thread(FakeServerConfig(model="gpt-4o-mini", problems=problems)) as server:
        env = {**os.environ, "R": str(run), "OPENAI_API_KEY": "sk-fake", "OPENAI_BASE_URL": server.url,
               "PATH": f"{ROOT / '.venv/bin'}:{os.environ['PATH']}"}
        for command in steps[2:]:
            if "bash run_zero" in command and "OUTPUT_DIR=" + evaluated not in command:
                continue
            result = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=900,
                                    env=env)
            assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
    for stage in ("cot", "persona", "reflection", "reflection_persona"):
        assert (run / "gen" / f"{stage}.jsonl").exists(), stage
    assert (run / "dataset" / "PersonaMathQA.jsonl").stat().st_size > 0
    assert (run / "train" / "PersonaMath-Qwen2.5-7B" / "training_summary.json").exists()
    for task in ("gsm8k", "math"):
        assert (run / "eval" / "PersonaMath-Qwen2.5-7B" / task / "summary.json").exists(), task
    assert "PersonaMath-Qwen2.5-7B" in (run / "report.md").read_text()
