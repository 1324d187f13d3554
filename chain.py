"""The whole PersonaMath chain in one command, each stage run as its own script, as a user runs it:

    slice GSM8K + MATH train -> [start the LLM server] -> gen_cot -> persona_augment -> reflection
    -> [stop the server] -> build_dataset -> train (run_zero2.sh) -> eval_gsm8k / eval_math of the base
    and the trained model -> report.py

Everything goes under runs/NAME/ (logs/ holds each step's output). A step that finished is marked
done and skipped on a rerun, so after a failure the same command resumes where it stopped. Sizes are
flags: the defaults fit the embedded SmolLM2-135M on a 2-core CPU; the same command scales up, and
--llm_url points the generation stages at any OpenAI-compatible server instead of the embedded one.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from personamath.data import records
from personamath.embedded_model import DEFAULT_DIR as EMBEDDED_MODEL
from personamath.errors import UserError, exit_on_user_error
from personamath.jsonl import write_jsonl
from personamath.precision import CHOICES, ENV_VAR

ROOT = Path(__file__).resolve().parent
TRAIN_FILES = {"gsm8k": ROOT / "data/gsm8k/train.jsonl", "math": ROOT / "data/math/MATH_train.jsonl"}
GEN_OUTPUTS = ["cot", "persona", "reflection", "reflection_persona"]
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


RECIPES_DIR = ROOT / "configs" / "recipes"
NULLS = ("none", "null", "")


def optional(convert):
    """An argparse type that also takes none/null (a recipe's YAML null) for "not set"."""
    def parse(text: str):
        return None if text.strip().lower() in NULLS else convert(text)
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def count(text: str) -> int | None:
    """A number of items, or `all` (None)."""
    return None if text.strip().lower() == "all" else int(text)


def boolean(text: str) -> bool:
    if text.strip().lower() in ("true", "1", "yes"):
        return True
    if text.strip().lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"not true or false: {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """The chain's options. Those in the `generation`, `training` and `evaluation` groups are the
    recipe's settings: each has its value from the recipe (--recipe) or the command line, never a default
    here, so that every setting the chain passes on is written down in one file."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--recipe", default="embedded",
                   help=f"a recipe: NAME of {RECIPES_DIR}/NAME.yaml, or a YAML file; flags given here override its "
                        "settings (default: embedded, the CPU demo)")
    p.add_argument("--name", default=None, help="run folder: RUNS_DIR/NAME (default: the recipe's name)")
    p.add_argument("--runs_dir", type=Path, default=ROOT / "runs")
    p.add_argument("--dtype", choices=CHOICES, default=None,
                   help=f"vLLM dtype of the embedded server and the evaluations (default: ${ENV_VAR}, else bf16 "
                        "where the CPU computes it natively, else float32; on a GPU the model's own)")
    p.add_argument("--progress_interval", type=float, default=30, help="seconds between progress lines of a step")
    g = p.add_argument_group("generation")
    g.add_argument("--llm_url", type=optional(str), help="the OpenAI-compatible server of the generation stages "
                                                         "(none: start the embedded one; the key from $OPENAI_API_KEY)")
    g.add_argument("--llm_model", type=optional(str), help="model name at --llm_url")
    g.add_argument("--slice", choices=["easy", "first"],
                   help="easy: the questions with the shortest reference solutions (GSM8K: fewest steps; MATH: "
                        "level 1), where a small model has a chance; first: the files' first questions")
    g.add_argument("--n_gsm8k", type=count, help="GSM8K train questions in the slice (a number, or all)")
    g.add_argument("--n_math", type=count, help="MATH train questions in the slice (a number, or all)")
    g.add_argument("--num_samples", type=int, help="gen_cot attempts per question")
    g.add_argument("--k1", type=int, help="persona rewrites per solved question")
    g.add_argument("--k2", type=int, help="persona rewrites per question corrected by reflection")
    g.add_argument("--persona_source", choices=["builtin", "llm"], help="where personas come from (the stages' flag)")
    g.add_argument("--reflect_limit", type=int, help="reflect on at most this many failed questions (0: all)")
    g.add_argument("--reflection_format", choices=["solution", "reflection"],
                   help="what a reflection row's response holds (reflection.py --format)")
    g.add_argument("--answer_format", choices=["boxed", "stated"],
                   help="boxed: the final answer must be in \\boxed{}; stated also accepts a closing \"The final "
                        "answer is X\" (the embedded 135M model rarely boxes its answer)")
    g.add_argument("--temperature", type=float)
    g.add_argument("--max_tokens", type=int, help="per generation request")
    g.add_argument("--concurrency", type=int)
    g.add_argument("--stall_timeout", type=float,
                   help="a generation stage stops (resumable) when the server answers nothing for this long")
    g.add_argument("--decontam_judge", choices=["off", "llm"],
                   help="who decides build_dataset's contamination candidates: the rule (off), or the --llm_url "
                        "model as judge (llm; needs --llm_url: the embedded model is too weak to judge)")
    t = p.add_argument_group("training")
    t.add_argument("--base_model", type=optional(str),
                   help="model to fine-tune and evaluate (none: the embedded SmolLM2-135M-Instruct)")
    t.add_argument("--zero_stage", type=int, choices=[2, 3], help="run_zero2.sh or run_zero3.sh")
    t.add_argument("--ranks", type=int, help="DeepSpeed ranks: GPUs, or CPU ranks without a GPU")
    t.add_argument("--batch_size", type=int, help="per rank")
    t.add_argument("--grad_accum", type=int, help="gradient accumulation steps")
    t.add_argument("--epochs", type=float)
    t.add_argument("--lr", type=float)
    t.add_argument("--warmup", type=float, help="warmup, as a share of the steps")
    t.add_argument("--scheduler", help="learning-rate schedule (a transformers lr_scheduler_type)")
    t.add_argument("--weight_decay", type=float)
    t.add_argument("--max_length", type=int, help="model_max_length: longer rows are truncated (and counted)")
    t.add_argument("--packing", type=boolean, help="padding-free batches")
    t.add_argument("--gradient_checkpointing", type=boolean)
    t.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on a GPU that has it, fp16 on one that has not, fp32 on the CPU")
    t.add_argument("--save_steps", type=int, help="a checkpoint every N optimizer steps")
    t.add_argument("--save_total_limit", type=int, help="checkpoints kept")
    t.add_argument("--seed", type=int)
    t.add_argument("--prompt_template", choices=["alpaca", "chat"], help="train.py --prompt_template")
    t.add_argument("--train_args", help="more train.py arguments, e.g. '--max_steps 2'")
    e = p.add_argument_group("evaluation")
    e.add_argument("--protocol", choices=["authors", "ours"], help="the eval scripts' --protocol")
    e.add_argument("--eval_gsm8k", type=count, help="GSM8K test items (the first N, or all)")
    e.add_argument("--eval_math", type=count, help="MATH test items (the first N of --math_test_file, or all)")
    e.add_argument("--gsm8k_test_file", type=Path)
    e.add_argument("--math_test_file", type=Path,
                   help="MATH-500 (its order mixes subjects and levels, so a slice is a fair sample), or "
                        "data/MATH_test.jsonl, the 5000-problem test set of the published table")
    e.add_argument("--eval_max_tokens", type=optional(int), help="none: the protocol's own")
    e.add_argument("--tensor_parallel_size", type=int)
    e.add_argument("--eval_args", help="more eval_*.py arguments")
    return p


def recipe_dests(parser: argparse.ArgumentParser) -> list[str]:
    return [a.dest for g in parser._action_groups if g.title in ("generation", "training", "evaluation")
            for a in g._group_actions]


def load_recipe(spec: str) -> tuple[Path, dict]:
    path = Path(spec) if spec.endswith((".yaml", ".yml")) else RECIPES_DIR / f"{spec}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise UserError(f"recipe {spec}: no file {path} (recipes: {known})")
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("settings"), dict):
        raise UserError(f"{path}: a recipe is a mapping with `settings` (and `description`, `notes`)")
    return path, recipe


def parse_args(argv=None) -> argparse.Namespace:
    """The recipe's settings, overridden by the flags given; every recipe setting must end up set."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    dests = recipe_dests(parser)
    spec = parser.parse_known_args(argv)[0].recipe
    path, recipe = load_recipe(spec)
    unknown = sorted(set(recipe["settings"]) - set(dests))
    if unknown:
        raise UserError(f"{path}: unknown settings {', '.join(unknown)} (known: {', '.join(dests)})")
    # The recipe as flags before the user's: argparse keeps the last value, so the user's win, and each
    # recipe value goes through the same type and choice checks as a flag.
    as_flags = [f"--{key}={'none' if value is None else value}" for key, value in recipe["settings"].items()]
    def recipe_error(message):  # a bad value in the recipe is named with its file
        hint = " (YAML reads an unquoted off/no/yes as a boolean: quote it)" if "'False'" in message else ""
        raise UserError(f"{path}: {message}{hint}")
    parser.error = recipe_error
    from_recipe = vars(parser.parse_args(as_flags))
    del parser.error
    args = parser.parse_args(as_flags + argv)
    missing = [d for d in dests if not hasattr(args, d)]
    if missing:
        raise UserError(f"{path}: settings missing, and not given as flags: {', '.join(missing)}")
    if args.decontam_judge == "llm" and not args.llm_url:
        parser.error("--decontam_judge llm needs --llm_url: the embedded model is too weak to judge contamination")
    args.recipe_file, args.recipe_description = path, recipe.get("description", "")
    args.recipe_notes = recipe.get("notes") or {}
    args.overridden = sorted(d for d in dests if getattr(args, d) != from_recipe.get(d))
    args.name = args.name or path.stem
    # Steps run from the repository root: local paths given from elsewhere are made absolute (a hub
    # name such as Qwen/Qwen2.5-7B is left as it is).
    for name in ("math_test_file", "gsm8k_test_file"):
        setattr(args, name, (ROOT / getattr(args, name)).resolve())
    args.base_model = args.base_model or str(EMBEDDED_MODEL)
    if Path(args.base_model).exists():
        args.base_model = str(Path(args.base_model).resolve())
    return args


def write_resolved_recipe(args: argparse.Namespace, run_dir: Path) -> Path:
    """run_dir/recipe.yaml: every setting as the chain uses it, which ones the command line changed, and
    the recipe's notes (where each setting comes from)."""
    settings = {}
    for dest in recipe_dests(build_parser()):
        value = getattr(args, dest)
        settings[dest] = str(value) if isinstance(value, Path) else value
    resolved = {"recipe": str(args.recipe_file), "description": args.recipe_description, "settings": settings,
                "overridden_on_the_command_line": args.overridden, "notes": args.recipe_notes}
    path = run_dir / "recipe.yaml"
    path.write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True, width=110))
    return path


class Chain:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.run_dir = args.runs_dir.resolve() / args.name
        self.logs = self.run_dir / "logs"
        self.done_dir = self.run_dir / ".done"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.done_dir.mkdir(exist_ok=True)
        self.server_state = self.run_dir / "server.json"
        self.rerun_rest = False

    def signature(self, command: list[str], env: dict | None) -> str:
        """What a step is, for its done marker: its command and settings, less the server's address
        (the embedded server gets a new port each time)."""
        words = [str(w) for w in command]
        if "--base_url" in words:
            del words[words.index("--base_url") + 1]
        return json.dumps([words, env or {}])

    def is_done(self, name: str, command: list[str], env: dict | None = None) -> bool:
        marker = self.done_dir / name
        return not self.rerun_rest and marker.exists() and marker.read_text() == self.signature(command, env)

    def step(self, name: str, command: list[str], env: dict | None = None, ok_codes=(0,), hint: str = "") -> None:
        """Run one step unless it is done with the same settings; its output goes to logs/NAME.log, and
        its latest progress line to the console every --progress_interval seconds. Once a step runs,
        every later one runs too (its inputs may have changed). `hint` is added to a failure's message."""
        if self.is_done(name, command, env):
            print(f"[chain] {name}: done before, skipped")
            return
        self.rerun_rest = True
        log = self.logs / f"{name}.log"
        print(f"[chain] {name}: running (log: {log})", flush=True)
        started = time.time()
        with log.open("w") as out:
            out.write("$ " + " ".join(command) + "\n")
            out.flush()
            process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
            code = self.watch(name, process, log, started)
        if code not in ok_codes:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise UserError(f"step {name} failed (exit {code}) after {time.time() - started:.0f} s; the last lines "
                            f"of {log}:\n{tail}\n{hint}Everything finished so far is kept under {self.run_dir}; "
                            f"fix the cause and run the same command again to resume from {name}.")
        (self.done_dir / name).write_text(self.signature(command, env))
        print(f"[chain] {name}: done in {time.time() - started:.0f} s", flush=True)

    def watch(self, name: str, process: subprocess.Popen, log: Path, started: float) -> int:
        """Wait for a step's process, printing its latest progress line every --progress_interval seconds."""
        try:
            while True:
                try:
                    return process.wait(timeout=self.args.progress_interval)
                except subprocess.TimeoutExpired:
                    quiet = time.time() - log.stat().st_mtime
                    note = f" (no output for {quiet:.0f} s)" if quiet > self.args.progress_interval else ""
                    print(f"[chain] {name}: {time.time() - started:.0f} s{note}: {latest_line(log)}", flush=True)
        except BaseException:  # Ctrl-C or a crash here: the step must not run on unwatched
            process.kill()
            process.wait()
            raise

    def py(self, script: str, *args) -> list[str]:
        return [sys.executable, script, *map(str, args)]

    # --- generation -----------------------------------------------------------------------------
    def write_slices(self) -> list[Path]:
        slices = []
        for task, count in (("gsm8k", self.args.n_gsm8k), ("math", self.args.n_math)):
            if count == 0:
                continue
            rows = [record for _, record in records(TRAIN_FILES[task])]
            if self.args.slice == "easy":
                rows = easiest(task, rows)
            path = self.run_dir / "inputs" / f"{task}_train_slice.jsonl"
            write_jsonl(path, rows[:count])  # count None: all
            slices.append(path)
        if not slices:
            raise UserError("--n_gsm8k and --n_math are both 0: nothing to generate from")
        return slices

    def stage_args(self, url: str) -> list[str]:
        a = self.args
        # A local server answers a request once those before it in its batch are done: it may take as
        # long as the stall watchdog allows, where a request re-sent on a shorter timeout would start over.
        timeout = [] if a.llm_url else ["--timeout", a.stall_timeout]
        return ["--base_url", url, "--model", self.llm_model(), "--temperature", a.temperature, "--max_tokens",
                a.max_tokens, "--concurrency", a.concurrency, "--answer_format", a.answer_format, "--stall_timeout",
                a.stall_timeout, *timeout]

    def persona_args(self, k: int) -> list:
        return ["--k", k, "--persona_source", self.args.persona_source]

    def generation_steps(self, slices: list[Path], url: str) -> list[tuple[str, list[str], tuple]]:
        """(name, command, exit codes that count as success) of each generation stage."""
        a, gen = self.args, self.run_dir / "gen"
        limit = ["--limit", a.reflect_limit] if a.reflect_limit else []
        return [
            # gen_cot exits 1 when it keeps nothing; the chain goes on and judges the dataset as a
            # whole (a question gen_cot misses may still be corrected by reflection).
            ("gen_cot", self.py("gen_cot.py", "--output_dir", gen, "--inputs", *slices, "--num_samples",
                                a.num_samples, *self.stage_args(url)), (0, 1)),
            ("persona_augment", self.py("persona_augment.py", "--output_dir", gen, *self.persona_args(a.k1),
                                        *self.stage_args(url)), (0,)),
            ("reflection", self.py("reflection.py", "--output_dir", gen, *self.persona_args(a.k2), *limit,
                                   "--format", a.reflection_format,
                                   *self.stage_args(url)), (0,))]

    def generate(self) -> None:
        gen = self.run_dir / "gen"
        slices = self.write_slices()
        # The server's address is not part of a step's signature, so "done?" is asked before starting one.
        planned = self.generation_steps(slices, url="")
        if all(self.is_done(name, command) for name, command, _ in planned):
            for name, _, _ in planned:
                print(f"[chain] {name}: done before, skipped")
        else:
            url, hint = self.start_llm()
            try:
                for name, command, ok_codes in self.generation_steps(slices, url):
                    self.step(name, command, ok_codes=ok_codes, hint=hint)
            finally:
                self.stop_llm()
        dataset = self.run_dir / "dataset"
        judge = (["--judge", "llm", "--judge_model", self.llm_model(), "--judge_base_url", self.args.llm_url]
                 if self.args.decontam_judge == "llm" else [])
        self.step("build_dataset", self.py("build_dataset.py", "--output_dir", dataset,
                                           "--inputs", *[gen / f"{name}.jsonl" for name in GEN_OUTPUTS], *judge),
                  ok_codes=(0, 1))
        rows = json.loads((dataset / "stats.json").read_text())["kept"]["total"] if (dataset / "stats.json").exists() else 0
        if not rows:
            (self.done_dir / "build_dataset").unlink(missing_ok=True)  # so that a rerun judges again
            raise UserError(f"the generation stages kept no row, so there is nothing to train on (yields in "
                            f"{gen}/*.stats.json). Raise --num_samples, --n_gsm8k or --n_math, or use a "
                            f"stronger --llm_url; finished requests are cached, so a rerun only sends new ones.")

    def start_llm(self) -> tuple[str, str]:
        """The generation server's URL (--llm_url, or the embedded server, started now) and what to say
        about it when a stage fails."""
        if self.args.llm_url:
            return self.args.llm_url, ""
        from personamath.serve import start

        print("[chain] starting the embedded LLM server", flush=True)
        # On the port it had before, when free: the stages' cache is keyed by the server's URL, so a
        # resumed run finds the answers of the one before.
        port_file = self.run_dir / "server.port"
        port = int(port_file.read_text()) if port_file.exists() else None
        info = start(state=self.server_state, dtype=self.args.dtype, port=port)
        port_file.write_text(info["url"].split(":")[-1].removesuffix("/v1"))
        print(f"[chain] embedded LLM server at {info['url']} in {info['dtype']} ({info['dtype_reason']})", flush=True)
        return info["url"], (f"The embedded server served in {info['dtype']} ({info['dtype_reason']}; --dtype "
                             f"overrides it); its log: {info['log']}\n")

    def llm_model(self) -> str:
        from personamath.serve import SERVED_NAME

        if self.args.llm_url and not self.args.llm_model:
            raise UserError(f"--llm_url {self.args.llm_url} needs --llm_model (the model's name there)")
        return self.args.llm_model or SERVED_NAME

    def stop_llm(self) -> None:
        if not self.args.llm_url:
            from personamath.serve import stop

            stop(self.server_state)
            print("[chain] embedded LLM server stopped", flush=True)

    # --- training and evaluation -------------------------------------------------------------------
    def train(self) -> Path:
        out = self.run_dir / "train"
        a = self.args
        # Every knob of scripts/launch_train.sh, from the recipe: none of its defaults is relied on.
        settings = {"MODEL_PATH": a.base_model, "DATA_PATH": self.run_dir / "dataset/PersonaMathQA.jsonl",
                    "OUTPUT_DIR": out, "NUM_GPUS": a.ranks, "PER_DEVICE_BATCH_SIZE": a.batch_size,
                    "GRAD_ACCUM": a.grad_accum, "EPOCHS": a.epochs, "LR": a.lr, "WARMUP": a.warmup,
                    "SCHEDULER": a.scheduler, "WEIGHT_DECAY": a.weight_decay, "MAX_LENGTH": a.max_length,
                    "PROMPT_TEMPLATE": a.prompt_template, "PACKING": a.packing,
                    "GRADIENT_CHECKPOINTING": a.gradient_checkpointing, "PRECISION": a.precision,
                    "SAVE_STEPS": a.save_steps, "SAVE_TOTAL_LIMIT": a.save_total_limit, "SEED": a.seed,
                    "DEEPSPEED": Path(sys.executable).parent / "deepspeed",
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        env = {key: str(value) for key, value in settings.items()}
        self.step("train", ["bash", f"run_zero{a.zero_stage}.sh", *shlex.split(a.train_args)], env=env)
        return out

    def evaluate(self, role: str, model) -> None:
        """Evaluate under eval/LABEL/, LABEL spelled as the published table names the model (the base
        model's name, and PersonaMath-NAME once trained), so that report.py puts the two side by side."""
        a = self.args
        name = Path(a.base_model.rstrip("/")).name
        label = name if role == "base" else f"PersonaMath-{name}"
        for task, count, data in (("gsm8k", a.eval_gsm8k, a.gsm8k_test_file), ("math", a.eval_math, a.math_test_file)):
            if count == 0:
                continue
            limit = [] if count is None else ["--limit", count]
            max_tokens = [] if a.eval_max_tokens is None else ["--max_tokens", a.eval_max_tokens]
            self.step(f"eval_{role}_{task}", self.py(f"eval_{task}.py", "--model", model, "--data_file", data, *limit,
                                                     "--protocol", a.protocol, *max_tokens, "--tensor_parallel_size",
                                                     a.tensor_parallel_size, "--output_dir",
                                                     self.run_dir / "eval" / label / task, *self.dtype_args(),
                                                     *shlex.split(a.eval_args)))

    def dtype_args(self) -> list[str]:
        """--dtype as given: without one, each vLLM engine chooses by the same rule, and says why."""
        return ["--dtype", self.args.dtype] if self.args.dtype else []

    def run(self) -> None:
        started = time.time()
        recipe = write_resolved_recipe(self.args, self.run_dir)
        changed = f"; changed on the command line: {', '.join(self.args.overridden)}" if self.args.overridden else ""
        print(f"[chain] recipe {self.args.recipe_file.stem}{changed}; every setting in {recipe}", flush=True)
        self.generate()
        trained = self.train()
        self.evaluate("base", self.args.base_model)
        self.evaluate("trained", trained)
        subprocess.run(self.py("report.py", "--run_dir", self.run_dir), cwd=ROOT, check=True)
        print(f"[chain] finished in {time.time() - started:.0f} s; everything is under {self.run_dir}")


def latest_line(log: Path, limit: int = 240) -> str:
    """The last line a step wrote (a progress bar's latest state: bars redraw with carriage returns)."""
    with log.open("rb") as f:
        f.seek(max(0, log.stat().st_size - 8192))
        text = f.read().decode(errors="replace")
    lines = [line.strip() for line in re.split(r"[\r\n]", ANSI_ESCAPE.sub("", text)) if line.strip()]
    return lines[-1][:limit] if lines else "(no output yet)"


def easiest(task: str, rows: list[dict]) -> list[dict]:
    """Rows ordered from easiest: GSM8K by the number of calculation steps of the reference solution,
    then its length; MATH level 1 first, then by the length of the solution. Stable, so reproducible."""
    if task == "gsm8k":
        return sorted(rows, key=lambda r: (r["answer"].count("<<"), len(r["answer"])))
    return sorted(rows, key=lambda r: (r.get("level") != "Level 1", len(r["solution"])))


def main(argv=None) -> None:
    with exit_on_user_error():
        Chain(parse_args(argv)).run()


if __name__ == "__main__":
    main()
