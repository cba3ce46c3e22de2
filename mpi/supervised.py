"""Stages 1 and 2: visually-masked continual pretraining (VM-CPT) and CoT / direct SFT.

Both are next-token training on the batches of `mpi.collate.SupervisedCollator`; the mode decides which
tokens carry loss ("cpt": everything but visual tokens, policy in context; "cot-sft" / "direct-sft": the
target only, no policy). One entry point trains both:

    cfg = pipeline.stage_config(plan, "cpt", seed)                   # or "cot-sft", "direct-sft"
    result = train_supervised(model, processor, train_dataset, cfg, "runs/vm_cpt")
    result["adapter"]    # runs/vm_cpt/adapter, a standard peft adapter directory

The loop is transformers' `Trainer` with our collator and a loss that runs the LM head only at
supervised positions (`logits_to_keep`). It brings gradient accumulation, the warm-up + cosine/constant
schedule, gradient clipping, the progress bar and checkpoints every `save_every` steps; we add the metrics log
(CSV + JSONL), a completeness marker per checkpoint (a checkpoint half-written when Colab disconnects is
never resumed from), the final adapter written atomically, and `result.json`, whose presence marks a
finished run that is not trained again. Notebooks 02 and 03 and the pipeline (`pipeline.train_stage`) call
`train_supervised` on the model `pipeline.start_stage` loads.

Why not TRL's SFTTrainer: its vision-language collator builds the prompt from a "messages"/"images"
column with its own chat-template call and masks the prompt or nothing; our VM-CPT mask (policy text
supervised, policy *and* input image tokens masked) and our single message builder would both have to
be bent around it, while `Trainer` + a 100-line collator does exactly what the paper says.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from mpi import distributed as dist
from mpi.atomic import atomic_directory, atomic_write_json
from mpi.collate import IGNORE_INDEX, MODES, SupervisedCollator
from mpi.engine import LR_SCHEDULES, lr_lambda, save_model

# Fields that do not change what is trained: a finished run with other values here is still "the same run".
TRAINER_BOOKKEEPING_FIELDS = ("save_every", "save_total_limit", "logging_steps", "progress", "log_every")
CHECKPOINT_MARKER = "mpi_checkpoint_complete.json"


class ConfigError(ValueError):
    """A training configuration that cannot work, with every problem found and its fix."""


@dataclass
class SupervisedConfig:
    """Every knob of one supervised stage. Defaults are the paper's SFT (LoRA r=8, lr 1e-4)."""

    mode: str = "cot-sft"  # "cpt" (VM-CPT) | "cot-sft" | "direct-sft"
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    learning_rate: float = 1e-4
    # Learning rate of embed_tokens / lm_head parameters (LoRA on them with lora_embeddings=True, or the
    # full layers when lora_r is None). Continual-pretraining recipes use a smaller one; None = learning_rate.
    embedding_learning_rate: float | None = None
    batch_size: int = 4  # reduce if out of memory
    grad_accum_steps: int = 1  # raise to keep the effective batch when batch_size shrinks
    lr_scheduler_type: str = "cosine"  # "cosine" (to 0) | "constant", after a linear warm-up (mpi.engine.learning_rate_at)
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    max_length: int = 1024  # sequences are never truncated: a longer one is a config error
    mask_vision_markers: bool = True  # VM-CPT: also no loss on <|vision_start|>/<|vision_end|>
    sparse_logits: bool = True  # run the LM head only where a label is supervised (same loss, less work)
    # SFT only: this fraction of batches keeps the policy in the prompt (0 = the paper's policy-free SFT). It
    # keeps a small model able to read the policy, which PolicyRollout's guided half relies on.
    policy_in_context_frac: float = 0.0
    seed: int = 0
    save_every: int = 50  # checkpoint every K optimizer steps (resume point after a disconnect)
    save_total_limit: int = 2
    logging_steps: int = 1
    progress: bool = True  # tqdm bar and one printed line every log_every steps
    log_every: int | None = None  # None: at most 50 printed lines
    # --- LoRA, when train_supervised gets a model without adapters
    lora_r: int | None = 8  # None: train all parameters (the paper's VM-CPT)
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str | list[str] | None = None  # None: the language model's attention + MLP
    lora_embeddings: bool = False  # also LoRA on embed_tokens / lm_head (continual-pretraining recipe)
    quantization: str | None = None  # how the model was loaded (RunConfig.quantization): check_config checks it

    def lora_settings(self):
        """The LoraSettings for a fresh adapter, or None for full-parameter training."""
        from mpi.modeling import LANGUAGE_MODEL_LORA_TARGETS, LoraSettings

        if self.lora_r is None:
            return None
        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                            target_modules=self.lora_target_modules or LANGUAGE_MODEL_LORA_TARGETS,
                            train_embeddings=self.lora_embeddings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# =========================================================================== config check


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def lora_target_matches(model, settings) -> list[str]:
    """Names of the modules of `model` (no adapters yet) that `settings` would put LoRA on, by peft's own rule."""
    from peft.tuners.tuners_utils import check_target_module_exists

    config = settings.to_peft()
    return [name for name, _ in model.named_modules() if name and check_target_module_exists(config, name)]


def _is_4bit(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(getattr(model, "config", None), "quantization_config", None))


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def sequence_lengths(processor, dataset, cfg: SupervisedConfig, chunk: int = 16) -> list[tuple[str, int, int]]:
    """(id, sequence tokens, prompt tokens) of the items check_config measures (images included)."""
    n = len(dataset)
    # Any item may land in a batch that shows the policy: measure every item at its longest.
    collate = SupervisedCollator(processor, cfg.mode, max_length=None, mask_vision_markers=cfg.mask_vision_markers,
                                 policy_in_context_frac=1.0 if cfg.policy_in_context_frac > 0 else 0.0)
    out = []
    for start in range(0, n, chunk):
        items = [dataset[i] for i in range(start, min(n, start + chunk))]
        batch = collate(items)
        lengths = batch["attention_mask"].sum(1).tolist()
        for k, item in enumerate(items):
            row = batch["labels"][k]
            if cfg.mode == "cpt":
                prompt = lengths[k]
            else:
                prompt = int((row != IGNORE_INDEX).nonzero()[0]) if (row != IGNORE_INDEX).any() else lengths[k]
            out.append((str(item.get("id", start + k)), int(lengths[k]), prompt))
    return out


def check_config(cfg: SupervisedConfig, *, model=None, processor=None, dataset=None,
                 device_type: str | None = None, bnb_ok: bool | None = None) -> dict[str, Any]:
    """Find every problem that would make training fail or silently do nothing, before it starts.

    Raises ConfigError naming each problem and its fix. Returns a summary (items, longest sequence, ...).
    `device_type` / `bnb_ok` default to the current device and bitsandbytes; tests pass them explicitly.
    """
    from mpi.device import get_device
    from mpi.modeling import bitsandbytes_can_4bit, lora_module_names

    problems: list[str] = []
    summary: dict[str, Any] = {}
    if cfg.mode not in MODES:
        problems.append(f"mode={cfg.mode!r}: choose one of {MODES}")
    if cfg.lr_scheduler_type not in LR_SCHEDULES:
        problems.append(f"lr_scheduler_type={cfg.lr_scheduler_type!r}: choose one of {list(LR_SCHEDULES)}")
    for name in ("batch_size", "grad_accum_steps", "save_every", "max_length"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            problems.append(f"{name}={getattr(cfg, name)!r}: must be an integer >= 1")
    if not cfg.learning_rate > 0:
        problems.append(f"learning_rate={cfg.learning_rate}: must be > 0")
    if cfg.max_steps <= 0 and not cfg.epochs > 0:
        problems.append(f"epochs={cfg.epochs} and max_steps={cfg.max_steps}: set epochs > 0 or max_steps > 0")
    if not 0.0 <= cfg.policy_in_context_frac <= 1.0:
        problems.append(f"policy_in_context_frac={cfg.policy_in_context_frac}: must be in [0, 1] (0 = policy-free SFT)")
    elif cfg.policy_in_context_frac and cfg.mode == "cpt":
        problems.append("policy_in_context_frac is for SFT; VM-CPT (mode='cpt') always has the policy in context: set it to 0")
    if not 0 <= cfg.warmup_ratio < 1:
        problems.append(f"warmup_ratio={cfg.warmup_ratio}: must be in [0, 1)")

    # 4-bit asked where bitsandbytes cannot do it
    device_type = device_type or (str(next(model.parameters()).device.type) if model is not None else get_device().type)
    if cfg.quantization == "4bit":
        ok = bitsandbytes_can_4bit(device_type) if bnb_ok is None else bnb_ok
        if not ok:
            problems.append(
                f"quantization='4bit' on device '{device_type}', but bitsandbytes cannot run 4-bit here: install "
                "bitsandbytes>=0.45 with support for this device, or set quantization=None (or 'auto')")

    if model is not None:
        if is_peft_model(model):
            names = lora_module_names(model)
            summary["lora_modules"] = len(names)
            if not names and not any(p.requires_grad for p in model.parameters()):
                problems.append("the peft model has no LoRA modules and nothing trainable: check the adapter's target_modules")
            elif not any(p.requires_grad for p in model.parameters()):
                problems.append("the adapter is frozen (nothing requires grad): load it with trainable=True "
                                "(load_model_and_processor(..., adapter=path, trainable=True))")
        elif cfg.lora_r is not None:
            settings = cfg.lora_settings()
            matched = lora_target_matches(model, settings)
            summary["lora_modules"] = len(matched)
            if not matched:
                problems.append(
                    f"lora_target_modules={settings.target_modules!r} matches no module of this model; pick names "
                    "from model.named_modules() (e.g. the default, mpi.modeling.LANGUAGE_MODEL_LORA_TARGETS)")
        else:
            if _is_4bit(model):
                problems.append("lora_r=None (train all parameters) on a 4-bit model: quantized weights cannot be "
                                "trained; set lora_r (QLoRA) or load with quantization=None")
            if _model_dtype(model) == torch.float16:
                problems.append("lora_r=None on an fp16 model: full-parameter fp16 training needs fp32 master "
                                "weights; use a bf16 GPU, load in fp32, or set lora_r (LoRA keeps adapters fp32)")
        if cfg.embedding_learning_rate is not None and not cfg.embedding_learning_rate > 0:
            problems.append(f"embedding_learning_rate={cfg.embedding_learning_rate}: must be > 0 or None")

    if dataset is not None:
        summary["items"] = len(dataset)
        if len(dataset) == 0:
            problems.append("the training dataset is empty: build it with mpi.data (e.g. build_clevr_policy(cfg, 'train'))")
        elif processor is not None and cfg.mode in MODES:
            if cfg.mode != "direct-sft":
                cots = dataset["cot"] if hasattr(dataset, "column_names") else [row.get("cot") for row in dataset]
                empty = [str(dataset[i].get("id", i)) for i, c in enumerate(cots) if not c]
                if empty:
                    problems.append(f"{len(empty)} item(s) have an empty 'cot' (first: {empty[0]}) but mode={cfg.mode!r} "
                                    "trains on the chain of thought: filter them out or use mode='direct-sft'")
            if not problems:
                lengths = sequence_lengths(processor, dataset, cfg)
                item_id, longest, prompt = max(lengths, key=lambda t: t[1])
                summary.update(longest_sequence=longest, longest_item=item_id, longest_prompt=max(p for _, _, p in lengths),
                               mean_sequence=sum(t[1] for t in lengths) / len(lengths), measured_items=len(lengths))
                if longest > cfg.max_length:
                    problems.append(
                        f"max_length={cfg.max_length} is shorter than the longest training sequence: item {item_id} has "
                        f"{longest} tokens ({prompt} of them prompt); raise max_length to at least {longest} "
                        "(RunConfig.max_length) or drop long items")
    if problems:
        raise ConfigError("training config problem(s):\n  - " + "\n  - ".join(problems))
    return summary


# =========================================================================== loss


def supervised_loss(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor, *, sparse: bool = True):
    """(sum of token losses, number of supervised tokens) for one batch.

    sparse=True runs the LM head only on positions whose next token is supervised (`logits_to_keep` with
    the union of those positions over the batch): the same numbers as the full head, without the
    (batch x length x vocabulary) logits for prompt tokens that carry no loss.
    """
    targets = labels[:, 1:]
    if sparse:
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
        if keep.numel() == 0:
            keep = torch.zeros(1, dtype=torch.long, device=labels.device)
        logits = model(**inputs, logits_to_keep=keep).logits
        targets = targets[:, keep]
    else:
        logits = model(**inputs).logits[:, :-1]
    loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (targets != IGNORE_INDEX).sum()


def _trainer_classes():
    from transformers import Trainer
    from transformers.trainer_callback import ProgressCallback, TrainerCallback

    class SupervisedTrainer(Trainer):
        """Trainer with the masked next-token loss, token counters and an optional embedding learning rate."""

        loss_is_scaled_for_ga = True  # compute_loss divides by the tokens of the whole accumulated batch

        def __init__(self, *args, sparse_logits: bool = True, embedding_learning_rate: float | None = None,
                     lr_scheduler_type: str = "cosine", **kwargs):
            super().__init__(*args, **kwargs)
            self.lr_scheduler_type = lr_scheduler_type
            # Trainer then passes num_items_in_batch: the supervised tokens (shifted labels) of the whole
            # accumulated batch, summed over processes. Qwen2.5-VL's accepts_loss_kwargs=False would switch
            # that off, and each micro-batch would be averaged on its own (short targets weighing more).
            self.model_accepts_loss_kwargs = True
            self.sparse_logits = sparse_logits
            self.embedding_learning_rate = embedding_learning_rate
            self._tokens = 0
            self._supervised = 0
            self._clock = time.perf_counter()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            loss_sum, count = supervised_loss(model, inputs, labels, sparse=self.sparse_logits)
            self._tokens += int(inputs["attention_mask"].sum())
            self._supervised += int(count)
            if num_items_in_batch is not None:
                loss = loss_sum / torch.as_tensor(num_items_in_batch, device=loss_sum.device).clamp(min=1)
                if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                    loss = loss * self.accelerator.num_processes  # DDP averages; the count is global
            else:
                loss = loss_sum / count.clamp(min=1) / self.current_gradient_accumulation_steps
            return (loss, None) if return_outputs else loss

        def create_optimizer(self, model=None):
            if self.optimizer is None and self.embedding_learning_rate is not None:
                model = model or self.model
                main, embed = [], []
                for name, param in model.named_parameters():
                    if param.requires_grad:
                        (embed if ("embed_tokens" in name or "lm_head" in name) else main).append(param)
                optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
                groups = [{"params": main, "weight_decay": self.args.weight_decay}]
                if embed:
                    groups.append({"params": embed, "weight_decay": 0.0, "lr": self.embedding_learning_rate})
                self.optimizer = optimizer_cls(groups, **kwargs)
                return self.optimizer
            return super().create_optimizer(model) if model is not None else super().create_optimizer()

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            """The loops' one schedule (mpi.engine.learning_rate_at), warm-up steps from warmup_ratio."""
            if self.lr_scheduler is None:
                warmup = self.args.get_warmup_steps(num_training_steps)
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lr_lambda(num_training_steps, warmup, self.lr_scheduler_type))
                self._created_lr_scheduler = True
            return self.lr_scheduler

        def log(self, logs, start_time=None):
            if "loss" in logs:
                now = time.perf_counter()
                logs["tokens_per_s"] = round(self._tokens / max(now - self._clock, 1e-9), 1)
                logs["supervised_tokens"] = self._supervised
                self._tokens, self._supervised, self._clock = 0, 0, now
            return super().log(logs, start_time)

    class LineProgress(ProgressCallback):
        """The tqdm bar, printing a logged step as one short line (not a dict) every `log_every` steps."""

        def __init__(self, log_every: int | None):
            super().__init__()
            self.log_every = log_every

        def on_log(self, args, state, control, logs=None, **kwargs):
            from mpi.metrics import format_row, progress_every

            every = progress_every(self.log_every, state.max_steps)
            if (state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs
                    and (state.global_step % every == 0 or state.global_step == state.max_steps)):
                row = {"step": state.global_step, **{k: v for k, v in logs.items() if k in _LOGGED}}
                self.training_bar.write(format_row(row))

    class MetricsCallback(TrainerCallback):
        """metrics.csv / metrics.jsonl via MetricsLogger, one row per logged step."""

        def __init__(self, logger):
            self.logger = logger

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and state.is_world_process_zero:
                self.logger.log(step=state.global_step, **{k: v for k, v in logs.items() if k in _LOGGED})

    class CheckpointMarker(TrainerCallback):
        """Written after the Trainer has finished a checkpoint: only marked checkpoints are resumed from."""

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                atomic_write_json(folder / CHECKPOINT_MARKER, {"step": state.global_step})

    return SupervisedTrainer, LineProgress, MetricsCallback, CheckpointMarker


_LOGGED = ("loss", "grad_norm", "learning_rate", "epoch", "tokens_per_s", "supervised_tokens")


# =========================================================================== checkpoints


def latest_trainer_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest *complete* checkpoint (it has our marker), or None."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    done = [p for p in checkpoint_dir.glob("checkpoint-*") if (p / CHECKPOINT_MARKER).exists()
            and p.name.split("-")[-1].isdigit()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in TRAINER_BOOKKEEPING_FIELDS}


def _config_mismatch(saved: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    now = _comparable(json.loads(json.dumps(identity)))
    saved = _comparable(saved)
    return sorted(k for k in set(now) | set(saved) if now.get(k) != saved.get(k))


def dataset_signature(dataset) -> str:
    """A cheap identity of the training data (item ids, answers and count): another dataset in the same
    out_dir is a different run, not one to resume."""
    import hashlib

    ids = dataset["id"] if hasattr(dataset, "column_names") else [row.get("id") for row in dataset]
    answers = dataset["answer"] if hasattr(dataset, "column_names") else [row.get("answer") for row in dataset]
    text = "\n".join(f"{i}\t{a}" for i, a in zip(ids, answers))
    return f"{len(ids)}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _run_identity(model, dataset, cfg: SupervisedConfig) -> dict[str, Any]:
    base = getattr(getattr(model, "config", None), "_name_or_path", None)
    return {**cfg.to_dict(), "data": dataset_signature(dataset), "base_model": Path(str(base)).name if base else None}


def _load_finished_weights(model, result: dict[str, Any]) -> None:
    """Put a finished run's trained weights into `model` (so a skipped run still returns the trained model)."""
    if result.get("adapter"):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(str(Path(result["adapter"]) / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, state)
    elif result.get("model_dir"):
        from transformers import AutoModelForImageTextToText

        trained = AutoModelForImageTextToText.from_pretrained(result["model_dir"], dtype=_model_dtype(model))
        model.load_state_dict(trained.state_dict())


def save_trained(model, processor, out_dir: Path) -> dict[str, str | None]:
    """The adapter in peft format (out_dir/adapter), or the whole model (out_dir/model) when there is none."""
    kind = "adapter" if is_peft_model(model) else "model"
    with atomic_directory(out_dir / kind) as tmp:
        save_model(model, processor, tmp)
    return {"adapter": str(out_dir / kind) if kind == "adapter" else None,
            "model_dir": str(out_dir / kind) if kind == "model" else None}


# =========================================================================== training


def _wrap_lora(model, cfg: SupervisedConfig):
    from peft import get_peft_model

    return get_peft_model(model, cfg.lora_settings().to_peft())


def _training_arguments(cfg: SupervisedConfig, out_dir: Path, model):
    from transformers import TrainingArguments

    from mpi.device import describe_device, pick_dtype

    device = next(model.parameters()).device
    # Mixed precision follows the GPU (bf16 on Ampere+, fp16 on a T4), not the first parameter's dtype:
    # under QLoRA prepare_model_for_kbit_training leaves some layers in fp32 and the adapters are fp32.
    dtype = pick_dtype(describe_device(device)) if device.type == "cuda" else torch.float32
    return TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # < 1: a fraction of the total steps
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_every,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device.type == "cpu",
        report_to="none",
        remove_unused_columns=False,  # the collator needs the raw items (images, policy, cot)
        dataloader_num_workers=0,  # the collator renders chat text and images: cheap next to a step, no copies
        dataloader_pin_memory=device.type == "cuda",
        disable_tqdm=not cfg.progress,
        save_only_model=False,  # optimizer, scheduler and RNG states too: resume must be exact
    )


def train_supervised(model, processor, train_dataset, cfg: SupervisedConfig, out_dir: str | Path, *,
                     resume: bool = True, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train one supervised stage and save the result; resumable, and a finished run is not rerun.

    model: a peft model (its trainable adapters are trained as they are: a fresh LoRA from
        `load_model_and_processor(..., lora=...)`, or a saved adapter loaded with `adapter=path,
        trainable=True`), or a plain model: LoRA from cfg.lora_* is added (lora_r=None trains all weights).
    train_dataset: items of the mpi.data schema (a datasets.Dataset or a list of dicts).
    out_dir: gets checkpoints/, metrics.csv, metrics.jsonl, config.json, adapter/ (peft format; or model/
        for full-parameter training) and result.json last.
    resume: continue from the newest complete checkpoint in out_dir; a finished run (result.json with the
        same config) is not trained again, its saved weights are loaded into the model. resume=False
        starts over.
    callbacks: extra transformers TrainerCallbacks.

    Returns {"final_loss", "mean_loss", "steps", "adapter", "model_dir", "out_dir", "metrics",
    "tokens_per_s", "seconds", "resumed_from" (the checkpoint's step), "skipped", "check", "model"} ("model": the trained model,
    a peft model when LoRA was added here; not written to result.json).
    """
    from mpi.device import seed_everything
    from mpi.metrics import MetricsLogger

    out_dir = Path(out_dir)
    result_path = out_dir / "result.json"
    identity = _run_identity(model, train_dataset, cfg)
    if resume and result_path.exists():
        result = json.loads(result_path.read_text())
        mismatch = _config_mismatch(result.get("config", {}), identity)
        if mismatch:
            raise ConfigError(f"{out_dir} holds a finished run with a different config (fields {mismatch}); use another "
                              "out_dir, or resume=False to train again there")
        if not is_peft_model(model) and cfg.lora_r is not None and result.get("adapter"):
            model = _wrap_lora(model, cfg)
        _load_finished_weights(model, result)
        return {**result, "skipped": True, "model": model}
    if not resume and dist.is_main_process():
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        for name in ("result.json", "config.json"):
            (out_dir / name).unlink(missing_ok=True)

    check = check_config(cfg, model=model, processor=processor, dataset=train_dataset)
    config_path = out_dir / "config.json"
    last = latest_trainer_checkpoint(out_dir / "checkpoints") if resume else None
    if last is not None and config_path.exists():
        mismatch = _config_mismatch(json.loads(config_path.read_text()), identity)
        if mismatch:
            raise ConfigError(f"{out_dir} holds checkpoints of a run with a different config (fields {mismatch}); "
                              "use another out_dir, or resume=False to start over")
    if dist.is_main_process():
        atomic_write_json(config_path, identity)
    dist.wait_for_everyone()

    if not is_peft_model(model) and cfg.lora_r is not None:
        model = _wrap_lora(model, cfg)
    seed_everything(cfg.seed)
    SupervisedTrainer, LineProgress, MetricsCallback, CheckpointMarker = _trainer_classes()
    resume_step = int(last.name.split("-")[-1]) if last is not None else None
    logger = (MetricsLogger(out_dir, resume_step=resume_step if resume_step is not None else 0, echo=False)
              if dist.is_main_process() else dist.NullLogger())
    collator = SupervisedCollator(processor, cfg.mode, max_length=cfg.max_length,
                                  mask_vision_markers=cfg.mask_vision_markers,
                                  policy_in_context_frac=cfg.policy_in_context_frac, seed=cfg.seed)
    trainer = SupervisedTrainer(
        model=model, args=_training_arguments(cfg, out_dir, model), train_dataset=train_dataset,
        data_collator=collator, sparse_logits=cfg.sparse_logits,
        embedding_learning_rate=cfg.embedding_learning_rate, lr_scheduler_type=cfg.lr_scheduler_type,
        callbacks=[MetricsCallback(logger), CheckpointMarker(), *callbacks],
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    if cfg.progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LineProgress(cfg.log_every))
    if resume_step is not None and cfg.progress:
        print(f"resuming from {last} (step {resume_step})")
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(last) if last is not None else None)
    seconds = time.perf_counter() - start

    saved = save_trained(model, processor, out_dir) if dist.is_main_process() else None
    saved = dist.gather_objects(saved)[0]  # every process returns process 0's paths
    rows = logger.rows
    losses = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
    speeds = [r["tokens_per_s"] for r in rows if isinstance(r.get("tokens_per_s"), (int, float))]
    result = {
        "stage": cfg.mode, "final_loss": losses[-1] if losses else math.nan,
        "mean_loss": float(output.training_loss), "steps": int(trainer.state.global_step),
        **saved, "out_dir": str(out_dir), "metrics": str(out_dir / "metrics.jsonl"),
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else None, "seconds": seconds,
        "resumed_from": resume_step, "check": check, "config": identity,
    }
    if dist.is_main_process():
        atomic_write_json(result_path, result)
    dist.wait_for_everyone()
    return {**result, "skipped": False, "model": model}
