"""Fine-tune a causal LM on PersonaMathQA with the HuggingFace Trainer (DeepSpeed ZeRO-2/3 via --deepspeed).

    deepspeed train.py --model_name_or_path MODEL --data_path PersonaMathQA.jsonl --output_dir OUT \
        --deepspeed configs/ds_zero2.json --bf16 True

Paper defaults, defined here only (the launch scripts pass on what they are given): the authors' Alpaca
no-input prompt, prompt tokens masked, EOS appended, lr 2e-5, 3 epochs (the Trainer's default, as are
seed 42 and no evaluation), cosine schedule, warmup 3%, weight decay 0, 1 example x 4 accumulation per
device; a checkpoint every 1000 steps, the last 2 kept; the loss logged every step. The authors' flags all work, including
--data_length, --warmup_ratio, --evaluation_strategy and --group_by_length. run_zero2.sh and
run_zero3.sh launch it on GPUs, several nodes, or the CPU.

A run none of whose optimizer steps has a learning rate above 0 (too few rows for a step past warmup, say)
is refused before training, unless --allow_no_update; OUTPUT_DIR/training_summary.json records the steps
made, the loss curve and how far the weights moved from the base model's.
"""
import json
import logging
import os
from dataclasses import dataclass, field

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer

from personamath import sft
from personamath.config import RecipeMixin, write_settings_used
from personamath.errors import UserError, exit_on_user_error
from personamath.jsonl import write_json
from personamath.provenance import provenance
from personamath.training_check import StepPlan, plan_steps, summary_line, training_summary

logger = logging.getLogger("train")
# Attention implementations that keep packed examples apart given position_ids (transformers
# builds a block-diagonal mask from them, or passes sequence boundaries to flash attention).
PACKING_ATTENTION = {"sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"}
DEFAULT_DATA = "runs/dataset/PersonaMathQA.jsonl"
DEFAULT_OUTPUT_DIR = "runs/train"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "HF model folder or hub name (default: the embedded SmolLM2-135M-Instruct, converted on first use)"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager, flash_attention_2, ..."})


@dataclass
class DataArguments:
    data_path: list[str] = field(default_factory=lambda: [DEFAULT_DATA], metadata={
        "help": f"PersonaMathQA JSONL/JSON files or datasets names NAME[:CONFIG]:SPLIT, mixed in the order given "
                f"(default: {DEFAULT_DATA}, build_dataset.py's output)"})
    data_length: int | None = field(default=None, metadata={"help": "train on this many rows, drawn at "
                                                                    "random with --seed (all by default)"})
    prompt_template: str = field(default="alpaca", metadata={"help": "alpaca (the authors') or chat "
                                                                       "(the tokenizer's chat template)",
                                                               "choices": sorted(sft.TEMPLATES)})
    packing: bool = field(default=False, metadata={"help": "padding-free batches: the examples of a batch "
                                                            "concatenated, kept apart by position_ids"})
    preprocessing_num_workers: int | None = field(default=None)


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """TrainingArguments with the paper's defaults and the authors' extra and older flags."""
    output_dir: str = DEFAULT_OUTPUT_DIR
    cache_dir: str | None = field(default=None, metadata={"help": "where tokenized data is cached "
                                                                   "(default: the datasets cache)"})
    model_max_length: int = field(default=4096, metadata={"help": "longer examples are truncated (and counted)"})
    # The authors' run_zero2.sh: 1 x 4 accumulation (x 4 GPUs = 16 a step).
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-5
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.03
    weight_decay: float = 0.0
    save_steps: float = 1000
    save_total_limit: int | None = 2
    logging_steps: float = 1
    warmup_ratio: float | None = field(default=None, metadata={"help": "older name of a warmup_steps below 1"})
    evaluation_strategy: str | None = field(default=None, metadata={"help": "older name of eval_strategy"})
    group_by_length: bool = field(default=False, metadata={"help": "batch examples of similar length "
                                                                    "(train_sampling_strategy=group_by_length)"})
    overwrite_output_dir: bool = field(default=True, metadata={"help": "accepted for the authors' scripts"})
    allow_no_update: bool = field(default=False, metadata={
        "help": "train even when no optimizer step will have a learning rate above 0, so the saved model will "
                "equal the base (a warning instead of the refusal)"})

    def __post_init__(self):
        if self.warmup_ratio is not None:
            self.warmup_steps = self.warmup_ratio
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        if self.deepspeed and not torch.cuda.is_available() and not isinstance(self.accelerator_config, str):
            cpu_deepspeed_state()
            self.accelerator_config = {**(self.accelerator_config or {}), "use_configured_state": True}
        super().__post_init__()


def cpu_deepspeed_state() -> None:
    """Without a GPU, DeepSpeed needs its CPU accelerator and accelerate a gloo process group made for
    DeepSpeed; left alone, accelerate starts no process group and every rank thinks it is alone, which
    DeepSpeed then rejects (train_batch_size does not match the world size)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def load_model(model_args: ModelArguments, training_args: TrainingArguments, packing: bool):
    attention = model_args.attn_implementation
    if packing and attention == "sdpa":
        # Packed rows under plain sdpa pay for attention across the whole row; run it per example.
        from personamath import packed_attention

        attention = packed_attention.NAME
    # Under ZeRO-3, TrainingArguments has already registered the DeepSpeed config, so the weights
    # are partitioned across ranks as they load.
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, cache_dir=training_args.cache_dir,
                                                 attn_implementation=attention, dtype=torch.float32)
    model.config.use_cache = False
    return model


def build_dataset(data_args: DataArguments, training_args: TrainingArguments, tokenizer):
    import datasets

    with training_args.main_process_first(desc="tokenizing"):
        rows = sft.load_rows(data_args.data_path)
        if data_args.data_length is not None:
            rows = datasets.Dataset.from_list(rows).shuffle(seed=training_args.seed) \
                .select(range(min(data_args.data_length, len(rows)))).to_list()
        cache_dir = training_args.cache_dir or datasets.config.HF_DATASETS_CACHE
        dataset = sft.tokenized_dataset(rows, tokenizer, data_args.prompt_template, training_args.model_max_length,
                                        os.path.join(cache_dir, "personamath_sft"), data_args.preprocessing_num_workers)
    stats = sft.data_stats(dataset)
    dataset = dataset.filter(lambda n: n > 0, input_columns="response_tokens") \
        if stats["dropped_no_response_tokens"] else dataset
    if not len(dataset):
        raise UserError(f"{data_args.data_path}: no example has a response token within "
                        f"--model_max_length {training_args.model_max_length}")
    logger.info("training data: %s", json.dumps(stats))
    if stats["truncated"]:
        logger.warning("%d of %d examples were longer than --model_max_length %d and were truncated "
                       "(their EOS is cut off)", stats["truncated"], stats["examples"], training_args.model_max_length)
    return dataset.remove_columns(["truncated", "straddled", "response_tokens", "shows_wrong_attempt"]), stats


def collator(tokenizer, packing: bool, pad_to_multiple_of: int | None):
    if packing:
        # One row per batch, no padding; position_ids restart at each example.
        return transformers.DataCollatorWithFlattening(return_position_ids=True, separator_id=sft.IGNORE_INDEX)
    return transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=sft.IGNORE_INDEX,
                                               pad_to_multiple_of=pad_to_multiple_of)


class TrainParser(RecipeMixin, HfArgumentParser):
    """train.py's arguments: the three dataclasses, read from the `train` section of --config, then the flags."""

    def __init__(self):
        super().__init__((ModelArguments, DataArguments, TrainingArguments), prog="train.py")
        self.setup_recipe("train")

    def parse(self, argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
        model_args, data_args, training_args, _config = self.parse_args_into_dataclasses(args=argv)
        if model_args.model_name_or_path is None:
            from personamath.embedded_model import ensure_embedded_model

            model_args.model_name_or_path = str(ensure_embedded_model())
        return model_args, data_args, training_args


def settings_used(parser: TrainParser, model_args, data_args, training_args) -> dict:
    """train.py's settings as the Trainer uses them (TrainingArguments.to_dict), and where each came from."""
    values = {**vars(model_args), **vars(data_args), **training_args.to_dict()}
    return parser.settings_used({k: v for k, v in values.items() if not k.startswith("_")})


def main(argv: list[str] | None = None) -> None:
    parser = TrainParser()
    model_args, data_args, training_args = parser.parse(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if training_args.should_log else logging.WARNING)
    if data_args.packing and model_args.attn_implementation not in PACKING_ATTENTION:
        raise UserError(f"--packing needs an attention implementation that keeps packed examples apart "
                        f"({', '.join(sorted(PACKING_ATTENTION))}), not {model_args.attn_implementation}")

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, cache_dir=training_args.cache_dir,
                                              model_max_length=training_args.model_max_length, padding_side="right")
    logger.info("pad token: %s", sft.choose_pad_token(tokenizer))
    train_dataset, stats = build_dataset(data_args, training_args, tokenizer)
    model = load_model(model_args, training_args, data_args.packing)
    # Keep `length` for group_by_length; the collators ignore it.
    training_args.remove_unused_columns = False
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, processing_class=tokenizer,
                      data_collator=_without_length(collator(tokenizer, data_args.packing,
                                                             8 if torch.cuda.is_available() else None)))
    plan = plan_steps_or_refuse(trainer)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_state()
    trainer.model.config.use_cache = True  # off for training only; generation wants it
    # Under ZeRO-3 save_model gathers the partitioned weights (stage3_gather_16bit_weights_on_model_save).
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        record = provenance()
        write_settings_used(training_args.output_dir, settings_used(parser, model_args, data_args, training_args))
        write_json(os.path.join(training_args.output_dir, "train_data_stats.json"), {**stats, "provenance": record})
        # trainer_state.json holds the loss curve: it says what produced it too.
        state_file = os.path.join(training_args.output_dir, "trainer_state.json")
        with open(state_file) as f:
            state = json.load(f)
        write_json(state_file, {**state, "provenance": record})
        summary = training_summary(plan, trainer.state, model_args.model_name_or_path, training_args.output_dir)
        write_json(os.path.join(training_args.output_dir, "training_summary.json"), {**summary, "provenance": record})
        (logger.warning if summary["weights"].get("equals_base") else logger.info)(summary_line(summary))


def plan_steps_or_refuse(trainer: Trainer) -> StepPlan:
    """The run's plan of optimizer steps; a UserError, before any step, when none of them has a learning
    rate above 0 (the saved model would be the base model), unless --allow_no_update."""
    plan = plan_steps(trainer)
    logger.info("training plan: %s", plan.describe())
    if not plan.steps_above_zero_lr:
        problem = f"training would not change the model: {plan.describe()}"
        if not trainer.args.allow_no_update:
            raise UserError(f"{problem}. For a step at a learning rate above 0: lower --gradient_accumulation_steps "
                            f"(or --per_device_train_batch_size), set --warmup_steps 0, raise --num_train_epochs "
                            f"(or --max_steps), give more rows, or set a --learning_rate above 0; --allow_no_update "
                            f"True trains anyway")
        logger.warning("%s; training anyway (--allow_no_update)", problem)
    return plan


def _without_length(collate):
    def collate_examples(examples):
        return collate([{k: v for k, v in example.items() if k != "length"} for example in examples])
    return collate_examples


if __name__ == "__main__":
    with exit_on_user_error():
        main()
