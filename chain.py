"""The whole PersonaMath chain in one command, each stage run as its own script, as a user runs it:

    slice GSM8K + MATH train -> [start the LLM server] -> gen_cot -> persona_augment -> reflection
    -> [stop the server] -> build_dataset -> train (run_zero2.sh) -> evaluate.py (GSM8K and MATH, one
    engine per model) of the base and the trained model -> report.py   (--stop_after: fewer steps)

The chain declares no setting of a stage: it hands every script the recipe (--config), whose section
named after the script holds that script's own arguments; `SECTION.KEY=VALUE` words override a recipe
value (`train.learning_rate=1e-5 x-llm.temperature=0`, an `x-` anchor changing every section that merges it).

    python chain.py                                   # the embedded recipe: the CPU demo (make run)
    python chain.py --recipe paper-v1 --dry_run       # every stage's requests and cost; nothing sent
    python chain.py --recipe paper-v1 --max_cost 30   # one budget for every paid request of the chain

Everything goes under runs/NAME/ (logs/ holds each step's output; recipe.yaml the settings as run). A
step that finished is marked done and skipped on a rerun, so after a failure, or a stop at the budget,
the same command resumes where it stopped.
"""
import argparse
import hashlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from personamath.config import SHARED_PREFIX, RecipeParser, read_recipe
from personamath.data import ORDER_HELP, ORDERS, TRAIN_FILES, Selection, select_records
from personamath.errors import UserError, exit_on_user_error
from personamath.jsonl import write_jsonl
from personamath.precision import CHOICES, ENV_VAR

ROOT = Path(__file__).resolve().parent
RECIPES_DIR = ROOT / "configs" / "recipes"
GEN_OUTPUTS = ["cot", "persona", "reflection", "reflection_persona"]
GEN_STATS = {"gen_cot": ["cot"], "persona_augment": ["persona"], "reflection": ["reflection", "reflection_persona"]}
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
EXIT_BUDGET = 3  # the stages' own code for a stop at --max_cost
VOLATILE = ("--base_url", "--judge_base_url", "--max_cost", "--judge_max_cost")  # not part of what a step is


def count(text: str) -> int | None:
    """A number of items, or `all` (None)."""
    return None if str(text).strip().lower() == "all" else int(text)


def boolean(text: str) -> bool:
    if str(text).strip().lower() in ("true", "1", "yes"):
        return True
    if str(text).strip().lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"not true or false: {text!r}")


def build_parser() -> RecipeParser:
    """The chain's own settings (the recipe's `chain` section): what to generate from, which server and
    launcher to use, the budget; and where the run goes."""
    p = RecipeParser("chain", prog="chain.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="embedded",
                   help=f"NAME of {RECIPES_DIR.relative_to(ROOT)}/NAME.yaml, or a recipe file (default: embedded, the "
                        "CPU demo)")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                   help="change a recipe value for this run (VALUE is read as YAML)")
    p.add_argument("--name", default=None, help="run folder: RUNS_DIR/NAME (default: the recipe's name)")
    p.add_argument("--runs_dir", type=Path, default=ROOT / "runs")
    p.add_argument("--dry_run", action="store_true",
                   help="print every stage's request count and estimated cost, and the total; send nothing")
    p.add_argument("--max_cost", type=float, default=None,
                   help="USD: one budget for every paid request of the chain (generation and the decontamination "
                        "judge), carried from stage to stage; the chain stops, resumable, before a request that "
                        "does not fit")
    p.add_argument("--stop_after", choices=["dataset", "train"], default=None,
                   help="end the chain after build_dataset (the dataset only, e.g. to publish or inspect it) or after "
                        "training, with the report of what ran (default: run every step)")
    p.add_argument("--progress_interval", type=float, default=30, help="seconds between progress lines of a step")
    p.add_argument("--slice", choices=list(ORDERS), default="first",
                   help=f"which n_gsm8k and n_math train questions are generated from, as gen_cot.py --slice orders "
                        f"them: {ORDER_HELP}")
    p.add_argument("--n_gsm8k", type=count, default=None, help="GSM8K train questions to generate from (or all)")
    p.add_argument("--n_math", type=count, default=None, help="MATH train questions to generate from (or all)")
    p.add_argument("--serve_embedded", type=boolean, default=False,
                   help="start vLLM's server on the embedded SmolLM2-135M for the generation stages (their "
                        "--base_url and --model are then its)")
    p.add_argument("--dtype", choices=CHOICES, default=None,
                   help=f"the embedded server's vLLM dtype (default: ${ENV_VAR}, else bf16 where the CPU computes it "
                        "natively, else float32)")
    p.add_argument("--zero_stage", type=int, choices=[2, 3], default=2, help="run_zero2.sh or run_zero3.sh")
    p.add_argument("--ranks", type=int, default=None,
                   help="DeepSpeed ranks (the launcher's NUM_GPUS; default: every GPU, or one CPU rank)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None,
                   help="the launcher's PRECISION (default auto: bf16 on a GPU that has it, fp16 on one that has "
                        "not, fp32 on the CPU)")
    p.add_argument("--eval_tasks", nargs="*", choices=["gsm8k", "math"], default=["gsm8k", "math"],
                   help="test sets evaluate.py runs, each with its eval_TASK section")
    return p


def recipe_path(spec: str) -> Path:
    path = Path(spec) if spec.endswith((".yaml", ".yml", ".json")) else RECIPES_DIR / f"{spec}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise UserError(f"recipe {spec}: no file {path} (recipes: {known})")
    return path


def resolve_recipe(path: Path, overrides: list[str]) -> dict:
    """The recipe with the SECTION.KEY=VALUE overrides applied (to an `x-` anchor before it is merged),
    anchors expanded and dropped: each section whole, as the scripts read it."""
    read_recipe(path)  # checked first, so that errors name the user's file
    node = yaml.compose(path.read_text())
    for word in overrides:
        target, sep, value = word.partition("=")
        section, dot, key = target.partition(".")
        if not (sep and dot and section and key):
            raise UserError(f"{word!r}: an override is SECTION.KEY=VALUE, e.g. train.learning_rate=1e-5")
        mapping = next((v for k, v in node.value if k.value == section), None)
        if mapping is None:
            mapping = yaml.MappingNode("tag:yaml.org,2002:map", [])
            node.value.append((yaml.ScalarNode("tag:yaml.org,2002:str", section), mapping))
        value_node = yaml.compose(value) or yaml.ScalarNode("tag:yaml.org,2002:null", "null")
        pairs = [(k, v) for k, v in mapping.value if k.value != key]
        mapping.value[:] = [*pairs, (yaml.ScalarNode("tag:yaml.org,2002:str", key), value_node)]
    recipe = yaml.SafeLoader("").construct_document(node)
    return {k: v for k, v in recipe.items() if not str(k).startswith(SHARED_PREFIX)}


def parse_args(argv=None) -> argparse.Namespace:
    """The chain's settings, and the run's recipe (overrides applied): every section checked by its
    script's own parser before anything runs, errors naming the user's file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = build_parser().parse_known_args(argv)[0]  # where the recipe is, before reading it
    path = recipe_path(first.recipe)
    resolved = resolve_recipe(path, first.overrides)
    if not first.overrides:
        args = checked(path, resolved, argv)
    else:  # checked as the steps will read it: the resolved recipe, in a file of its own for now
        with tempfile.TemporaryDirectory(prefix="recipe-") as scratch:
            copy = Path(scratch) / path.name
            copy.write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True, width=110))
            try:
                args = checked(copy, resolved, argv)
            except UserError as e:
                where = f"{path} with {' '.join(first.overrides)}"
                raise UserError(re.sub(rf"{re.escape(str(copy))}(:[\d?]+)?", where, str(e))) from None
    args.recipe_file, args.recipe = path, resolved
    args.name = args.name or path.stem
    return args


def checked(path: Path, recipe: dict, argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(["--config", str(path), *argv])
    # In a process of its own: the training stack the parsers import (about 600 MiB) is not held by the
    # chain through the hours its steps run
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as checker:
        checker.submit(check_sections, path, recipe).result()
    args.settings_used = parser.settings_used(args)
    return args


def check_sections(path: Path, recipe: dict) -> None:
    """Every script's section parsed now, by the script's own parser, so that a bad value stops the chain
    before the first request rather than at its step."""
    import evaluate
    import gen_cot
    import persona_augment
    import reflection
    import train
    from personamath import dataset

    parsers = {"gen_cot": gen_cot.build_parser, "persona_augment": persona_augment.build_parser,
               "reflection": reflection.build_parser, "build_dataset": dataset.build_parser,
               "train": train.TrainParser, "eval_gsm8k": lambda: evaluate.task_parser("gsm8k"),
               "eval_math": lambda: evaluate.task_parser("math")}
    for section, make in parsers.items():
        if section in recipe:
            make().parse_known_args(["--config", str(path)])


class Chain:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.run_dir = args.runs_dir.resolve() / args.name
        self.logs = self.run_dir / "logs"
        self.done_dir = self.run_dir / ".done"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.done_dir.mkdir(exist_ok=True)
        self.server_state = self.run_dir / "server.json"
        self.recipe = self.run_dir / "recipe.yaml"
        self.spend_file = self.run_dir / "spend.json"
        self.rerun_rest = False

    def write_recipe(self) -> None:
        """run_dir/recipe.yaml: the recipe every step reads, overrides applied, with its notes."""
        self.recipe.write_text(f"# {self.args.recipe_file} as run by chain.py; the settings of chain.py itself: "
                               f"settings.chain.yaml\n" + yaml.safe_dump(self.args.recipe, sort_keys=False,
                                                                         allow_unicode=True, width=110))
        used = {**self.args.settings_used, "config": str(self.recipe)}
        (self.run_dir / "settings.chain.yaml").write_text(yaml.safe_dump(used, sort_keys=False, allow_unicode=True,
                                                                         width=110))

    # --- steps ------------------------------------------------------------------------------------
    def signature(self, command: list[str], env: dict | None, sections: tuple[str, ...]) -> str:
        """What a step is, for its done marker: its command less what changes from run to run (a server's
        port, the budget left), its environment, and its sections of the recipe."""
        words = [str(w) for w in command]
        for flag in VOLATILE:
            if flag in words:
                del words[words.index(flag) + 1]
        settings = {s: self.args.recipe.get(s) for s in sections}
        return json.dumps([words, env or {}, hashlib.sha256(json.dumps(settings, sort_keys=True, default=str)
                                                             .encode()).hexdigest()])

    def is_done(self, name: str, command: list[str], sections=(), env: dict | None = None) -> bool:
        marker = self.done_dir / name
        return (not self.rerun_rest and marker.exists()
                and marker.read_text() == self.signature(command, env, sections))

    def step(self, name: str, command: list[str], sections=(), env: dict | None = None, ok_codes=(0,),
             hint: str = "") -> int:
        """Run one step unless it is done with the same settings; its output goes to logs/NAME.log, and
        its latest progress line to the console every --progress_interval seconds. Once a step runs,
        every later one runs too (its inputs may have changed). `hint` is added to a failure's message."""
        if self.is_done(name, command, sections, env):
            print(f"[chain] {name}: done before, skipped")
            return 0
        self.rerun_rest = True
        log = self.logs / f"{name}.log"
        print(f"[chain] {name}: running (log: {log})", flush=True)
        started = time.time()
        with log.open("w") as out:
            out.write("$ " + " ".join(map(str, command)) + "\n")
            out.flush()
            process = subprocess.Popen(list(map(str, command)), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
            code = self.watch(name, process, log, started)
        self.record_spend(name, started, command)
        if code == EXIT_BUDGET and self.args.max_cost is not None:
            raise UserError(f"step {name} stopped at the chain's budget: spent at most ${self.spent():.4f} of "
                            f"--max_cost ${self.args.max_cost} (each request is reserved at its worst case before "
                            f"it is sent). Everything answered is kept and cached: run the same command with a "
                            f"higher --max_cost to resume from {name}, paying nothing twice.")
        if code not in ok_codes:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise UserError(f"step {name} failed (exit {code}) after {time.time() - started:.0f} s; the last lines "
                            f"of {log}:\n{tail}\n{hint}Everything finished so far is kept under {self.run_dir}; "
                            f"fix the cause and run the same command again to resume from {name}.")
        (self.done_dir / name).write_text(self.signature(command, env, sections))
        print(f"[chain] {name}: done in {time.time() - started:.0f} s", flush=True)
        return code

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
        return [sys.executable, script, "--config", self.recipe, *args]

    # --- the budget ---------------------------------------------------------------------------------
    def spent(self) -> float:
        """USD spent at most by every run of every paid step so far (spend.json), resumed runs included."""
        return sum(entry["spent_usd_at_most"] for entry in self.spend_log())

    def spend_log(self) -> list[dict]:
        return json.loads(self.spend_file.read_text()) if self.spend_file.exists() else []

    def record_spend(self, name: str, started: float, command: list) -> None:
        """Add what a run of a paid step spent: its stats' spent_usd_at_most, written by this run. A run
        that had a cap and wrote no account (killed, or the judge stopped at its cap, which writes nothing)
        is counted at its whole cap: at most, so the budget still holds."""
        files = [self.run_dir / "gen" / f"{stem}.stats.json" for stem in GEN_STATS.get(name, [])]
        if name == "build_dataset":
            files = [self.run_dir / "dataset" / "stats.json"]
        fresh = [json.loads(f.read_text()) for f in files if f.exists() and f.stat().st_mtime >= started]
        if name == "build_dataset":
            fresh = [s["decontamination"]["judge"] for s in fresh if (s.get("decontamination") or {}).get("judge")]
        # a stage's client counts its spend over all its phases: its last stats hold the total
        spent = max((s.get("spent_usd_at_most") or 0.0 for s in fresh), default=0.0)
        words = list(map(str, command))
        cap = next((float(words[i + 1]) for i, w in enumerate(words) if w in ("--max_cost", "--judge_max_cost")), None)
        if not fresh and cap is not None:
            print(f"[chain] {name}: wrote no account of its spending: counted at its whole cap, ${cap:.6f}", flush=True)
            spent = cap
        if spent:
            self.spend_file.write_text(json.dumps([*self.spend_log(), {"step": name, "spent_usd_at_most": spent,
                                                                         "at": time.time()}], indent=1))

    def budget_args(self, flag: str = "--max_cost") -> list:
        """The budget left to the next paid step, as its cap; stops the chain when none is left."""
        if self.args.max_cost is None:
            return []
        left = self.args.max_cost - self.spent()
        if left <= 0:
            raise UserError(f"the chain's budget is spent: at most ${self.spent():.4f} of --max_cost "
                            f"${self.args.max_cost}; run the same command with a higher --max_cost to go on")
        return [flag, f"{left:.6f}"]

    # --- generation -----------------------------------------------------------------------------
    def write_slices(self) -> list[Path]:
        """inputs/TASK_train_slice.jsonl: the first n_TASK questions (None: all) of each train file in --slice
        order, chosen as gen_cot.py chooses them, each keeping the id it has in the train file."""
        slices = []
        for task, n in (("gsm8k", self.args.n_gsm8k), ("math", self.args.n_math)):
            if n == 0:
                continue
            path = self.run_dir / "inputs" / f"{task}_train_slice.jsonl"
            write_jsonl(path, select_records(task, ROOT / TRAIN_FILES[task], Selection(order=self.args.slice), n))
            slices.append(path)
        if not slices:
            raise UserError("chain.n_gsm8k and chain.n_math are both 0: nothing to generate from")
        return slices

    def server_args(self, url: str) -> list[str]:
        from personamath.serve import SERVED_NAME

        return ["--base_url", url, "--model", SERVED_NAME] if self.args.serve_embedded else []

    def generation_steps(self, slices: list[Path], url: str) -> list[tuple[str, list, tuple]]:
        """(name, command, exit codes that count as success) of each generation stage."""
        gen = self.run_dir / "gen"
        server = self.server_args(url)
        return [
            # gen_cot exits 1 when it keeps nothing; the chain goes on and judges the dataset as a
            # whole (a question gen_cot misses may still be corrected by reflection).
            ("gen_cot", self.py("gen_cot.py", "--output_dir", gen, "--inputs", *slices, *server), (0, 1)),
            ("persona_augment", self.py("persona_augment.py", "--output_dir", gen, *server), (0,)),
            ("reflection", self.py("reflection.py", "--output_dir", gen, *server), (0,))]

    def generate(self) -> None:
        gen = self.run_dir / "gen"
        slices = self.write_slices()
        # The server's address is not part of a step's signature, so "done?" is asked before starting one.
        planned = self.generation_steps(slices, url="")
        if all(self.is_done(name, command, (name,)) for name, command, _ in planned):
            for name, _, _ in planned:
                print(f"[chain] {name}: done before, skipped")
        else:
            url, hint = self.start_llm()
            try:
                for name, command, ok_codes in self.generation_steps(slices, url):
                    self.step(name, [*command, *self.budget_args()], (name,), ok_codes=ok_codes, hint=hint)
            finally:
                self.stop_llm()
        dataset = self.run_dir / "dataset"
        judged = self.args.recipe.get("build_dataset", {}).get("judge") == "llm"
        self.step("build_dataset", self.py("build_dataset.py", "--output_dir", dataset, "--inputs",
                                           *[gen / f"{name}.jsonl" for name in GEN_OUTPUTS],
                                           *(self.budget_args("--judge_max_cost") if judged else [])),
                  ("build_dataset",), ok_codes=(0, 1))
        stats = dataset / "stats.json"
        if not (json.loads(stats.read_text())["kept"]["total"] if stats.exists() else 0):
            (self.done_dir / "build_dataset").unlink(missing_ok=True)  # so that a rerun judges again
            raise UserError(f"the generation stages kept no row, so there is nothing to train on (yields in "
                            f"{gen}/*.stats.json). Raise gen_cot.num_samples, chain.n_gsm8k or chain.n_math, or "
                            f"use a stronger model; finished requests are cached, so a rerun only sends new ones.")

    def start_llm(self) -> tuple[str, str]:
        """The embedded server's URL, started now (or "" when the recipe's stages name their own server),
        and what to say about it when a stage fails."""
        if not self.args.serve_embedded:
            return "", ""
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

    def stop_llm(self) -> None:
        if self.args.serve_embedded:
            from personamath.serve import stop

            stop(self.server_state)
            print("[chain] embedded LLM server stopped", flush=True)

    # --- training and evaluation -------------------------------------------------------------------
    def base_model(self) -> str:
        """The recipe's train.model_name_or_path (a local folder made absolute), or the embedded model."""
        model = (self.args.recipe.get("train") or {}).get("model_name_or_path")
        if model is None:
            from personamath.embedded_model import ensure_embedded_model

            return str(ensure_embedded_model())
        return str((ROOT / model).resolve()) if (ROOT / model).exists() else model

    def train(self) -> Path:
        out = self.run_dir / "train"
        # The launcher's own choices only; every training setting comes from the recipe's train section.
        launcher = {"NUM_GPUS": self.args.ranks, "PRECISION": self.args.precision,
                    "DEEPSPEED": Path(sys.executable).parent / "deepspeed"}
        env = {key: str(value) for key, value in launcher.items() if value is not None}
        env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        command = ["bash", f"run_zero{self.args.zero_stage}.sh", "--config", self.recipe, "--model_name_or_path",
                   self.base_model(), "--data_path", self.run_dir / "dataset/PersonaMathQA.jsonl", "--output_dir", out]
        self.step("train", command, ("train",), env=env)
        return out

    def evaluate(self, role: str, model) -> None:
        """Evaluate under eval/LABEL/, LABEL spelled as the published table names the model (the base
        model's name, and PersonaMath-NAME once trained), so that report.py puts the two side by side."""
        if not self.args.eval_tasks:
            return
        name = Path(self.base_model().rstrip("/")).name
        label = name if role == "base" else f"PersonaMath-{name}"
        # both models also on the questions of the training set: whether training took
        self.step(f"eval_{role}", self.py("evaluate.py", "--model", model, "--output_dir",
                                          self.run_dir / "eval" / label, "--tasks", *self.args.eval_tasks,
                                          "--training_questions", self.run_dir / "dataset" / "PersonaMathQA.jsonl"),
                  tuple(f"eval_{task}" for task in self.args.eval_tasks))

    def run(self) -> None:
        started = time.time()
        self.write_recipe()
        print(f"[chain] recipe {self.args.recipe_file}; as run: {self.recipe}", flush=True)
        self.generate()
        if self.args.stop_after != "dataset":
            trained = self.train()
            if self.args.stop_after != "train":
                self.evaluate("base", self.base_model())
                self.evaluate("trained", trained)
        subprocess.run([sys.executable, "report.py", "--run_dir", self.run_dir], cwd=ROOT, check=True)
        spent = f"; spent at most ${self.spent():.4f}" if self.spend_file.exists() else ""
        print(f"[chain] finished in {time.time() - started:.0f} s{spent}; everything is under {self.run_dir}")

    # --- the dry run --------------------------------------------------------------------------------
    def dry_run(self) -> None:
        """Each generation stage's --dry_run, nothing sent: gen_cot over the slices; persona_augment and
        reflection over gen_cot's outputs once it has run, before that over the slices' questions at the yield
        they assume (their --dry_run_solved_share, stated in their lines; in their worst case, every question).
        Expected and worst case per stage and for the run (worst_case_of_the_run)."""
        from personamath.serve import SERVED_NAME
        from personamath.stage import usd

        self.write_recipe()
        slices = self.write_slices()
        plan = self.run_dir / "dry_run"
        plan.mkdir(exist_ok=True)
        gen = self.run_dir / "gen"
        gen.mkdir(exist_ok=True)
        for stand_in in ("cot.jsonl", "cot_failed.jsonl"):  # what earlier dry runs priced the later stages from
            (plan / stand_in).unlink(missing_ok=True)
        gen_cot, gen_cot_command, _ = self.generation_steps(slices, url="")[0]
        stage_one = gen if self.is_done(gen_cot, gen_cot_command, (gen_cot,)) else plan  # plan: without its outputs
        port = (self.run_dir / "server.port").read_text() if (self.run_dir / "server.port").exists() else "0"
        server = (["--base_url", f"http://127.0.0.1:{port}/v1", "--model", SERVED_NAME]
                  if self.args.serve_embedded else [])
        cache = ["--cache", gen / "llm_cache.sqlite"]
        steps = [("gen_cot", ["--inputs", *slices]),
                 ("persona_augment", ["--input", stage_one / "cot.jsonl", "--dry_run_inputs", *slices]),
                 ("reflection", ["--input", stage_one / "cot_failed.jsonl", "--dry_run_inputs", *slices])]
        estimates = {}
        for name, inputs in steps:
            command = self.py(f"{name}.py", "--output_dir", plan, *inputs, *server, *cache, "--dry_run")
            result = subprocess.run(list(map(str, command)), cwd=ROOT, capture_output=True, text=True)
            if result.returncode != 0:
                raise UserError(f"{name} --dry_run failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
            print(result.stdout.strip())
            estimates[name] = json.loads((plan / f"{name}.estimate.json").read_text())
        total = {key: sum(e[key] or 0.0 for e in estimates.values()) for key in ("requests_expected", "cost_usd_est")}
        total["to_send"], total["cost_usd_worst"] = worst_case_of_the_run(estimates)
        unknown = any(e["cost_usd_est"] is None for e in estimates.values())
        cost = (lambda usd_or_none: "unknown") if unknown else usd  # a stage without a price: no total either
        print(f"chain --dry_run: {'':<16} {'requests: expected':>18} {'at most':>9} {'cost: expected':>15} "
              f"{'worst case':>11}")
        for name, e in [*estimates.items(), ("total", total)]:
            print(f"chain --dry_run: {name:<16} {e['requests_expected']:>18,.0f} {e['to_send']:>9,.0f} "
                  f"{cost(e['cost_usd_est']):>15} {cost(e['cost_usd_worst']):>11}")
        judge = (self.args.recipe.get("build_dataset") or {}).get("judge") == "llm"
        print(f"chain --dry_run: at most {total['to_send']:,.0f} requests to send, estimated cost "
              f"{cost(total['cost_usd_est'])} expected, {cost(total['cost_usd_worst'])} worst case (expected: at the "
              f"yields the stages assume, answers of --dry_run_output_tokens; worst case, whatever the yields: every "
              f"request the stages may send, every answer --max_tokens long, each question the costlier of "
              f"persona_augment's and reflection's ways; retries aside)"
              + ("; at batch prices" if any(e["batch_prices"] for e in estimates.values()) else "")
              + ("; the decontamination judge comes on top (its pairs are known once the rows are)" if judge else "")
              + (f"; --max_cost ${self.args.max_cost} caps all of it" if self.args.max_cost is not None else ""))


def worst_case_of_the_run(estimates: dict) -> tuple[int, float | None]:
    """The most requests and USD the generation stages' --dry_run estimates allow together: gen_cot's worst
    case, then for each question the costlier of the two ways it may take, persona_augment's (solved) or
    reflection's (failed), each at its worst (their worst_by_question)."""
    from personamath.llm import cost_of

    requests, usd = estimates["gen_cot"]["to_send"], estimates["gen_cot"]["cost_usd_worst"]
    ways = [estimates["persona_augment"], estimates["reflection"]]
    for question in set().union(*(way["worst_by_question"] for way in ways)):
        sent = [way["worst_by_question"].get(question, (0, 0)) for way in ways]
        costs = [cost_of(way["price_per_million_tokens"], prompt, n * way["max_tokens"])
                 for way, (n, prompt) in zip(ways, sent)]
        requests += max(n for n, _ in sent)
        usd = None if usd is None or None in costs else usd + max(costs)
    return requests, usd


def latest_line(log: Path, limit: int = 240) -> str:
    """The last line a step wrote (a progress bar's latest state: bars redraw with carriage returns)."""
    with log.open("rb") as f:
        f.seek(max(0, log.stat().st_size - 8192))
        text = f.read().decode(errors="replace")
    lines = [line.strip() for line in re.split(r"[\r\n]", ANSI_ESCAPE.sub("", text)) if line.strip()]
    return lines[-1][:limit] if lines else "(no output yet)"


def main(argv=None) -> None:
    with exit_on_user_error():
        args = parse_args(argv)
        chain = Chain(args)
        chain.dry_run() if args.dry_run else chain.run()


if __name__ == "__main__":
    main()
