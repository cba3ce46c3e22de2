"""PolicyRollout on TRL's GRPOTrainer: the scale path (vLLM generation, DeepSpeed / FSDP through accelerate).

`mpi.poro` is the teaching path: every line of GRPO visible. When generation is the bottleneck (long
policies, large G, 7B models on several GPUs) this module runs the same method on TRL's GRPOTrainer,
which can generate with vLLM and trains under any accelerate config. Optional: `pip install trl==1.16.0`
(trl is pinned in requirements.txt; `vllm` for use_vllm=True is not).

What PolicyRollout changes in TRL, and where (one subclass, three hooks):

    _generate_and_score_completions   rows of the dataset hold only an index into our items: here each row
                                      becomes its policy-free prompt + images (what TRL tokenizes and SCORES)
    _generate_single_turn             TRL's group is 2G copies of a prompt: the first G are generated from the
                                      policy-free prompt, the last G from the prompt WITH the policy, in one
                                      call to TRL's own backend (transformers or vLLM). The prompt ids TRL keeps
                                      for the loss stay the policy-free ones, so every ratio, KL and old/ref
                                      log-prob is computed without the policy, as in the paper.
    _calculate_rewards                our reward functions (mpi.rewards, 0.9 accuracy + 0.1 format), and the
                                      own / guided split of reward and accuracy in TRL's logs

The guided half is treated as the paper does ("as_own": no correction). With vLLM, TRL's sampler-vs-trainer
importance correction would divide by pi(o|q,P); we hand it NaN sampling log-probs for the guided rows, which
TRL treats as "no correction", and keep its correction for the own rows.

    from mpi.scale.poro_trl import train_poro_trl
    trainer = train_poro_trl(model, processor, items, grpo_cfg, "runs/poro_trl", use_vllm=False)
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

TRL_VERSION = "1.16.0"
INSTALL_HINT = (f"the TRL scale path needs TRL: pip install trl=={TRL_VERSION} (and vllm for use_vllm=True). "
                "The from-scratch loop mpi.poro.train_poro needs neither.")


def require_trl():
    """Import trl or fail with the install command (it is an optional dependency)."""
    if importlib.util.find_spec("trl") is None:
        raise ImportError(INSTALL_HINT)
    import trl

    return trl


# =========================================================================== data and rewards


def trl_dataset(items: Sequence[dict]):
    """The TRL train dataset: one row per item, holding only its index (and a text stand-in prompt,
    which TRL requires as a column). Images and policies stay in `items`, outside Arrow."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": str(item.get("query", ""))}], "item_index": i}
                              for i, item in enumerate(items)])


def completion_text(completion: Any) -> str:
    """TRL hands conversational completions as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion:
        content = completion[-1].get("content", "")
        if isinstance(content, list):
            return "".join(part.get("text") or "" for part in content if isinstance(part, dict))
        return content or ""
    return ""


def reward_functions(items: Sequence[dict]) -> list[Callable]:
    """[accuracy, format] as TRL reward functions over our items (weights go in GRPOConfig.reward_weights)."""
    from mpi.rewards import accuracy_reward, format_reward

    def accuracy(completions, item_index, **_):
        return [float(accuracy_reward(items[i], completion_text(c))) for i, c in zip(item_index, completions)]

    def format(completions, **_):  # noqa: A001 - the logged name
        return [float(format_reward(completion_text(c))) for c in completions]

    return [accuracy, format]


# =========================================================================== config


def trl_config(cfg, out_dir: str | Path, *, num_processes: int = 1, use_vllm: bool = False, **overrides: Any):
    """A TRL GRPOConfig from our mpi.poro.GRPOConfig (field names already follow TRL's).

    TRL's num_generations is our whole group (2G with PolicyRollout); cfg.prompts_per_step is the global
    number of groups per step, split across processes so that every group stays on one process."""
    trl = require_trl()
    from mpi.device import describe_device, get_device, pick_dtype

    if cfg.prompts_per_step % num_processes:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be a multiple of the number of processes "
                         f"({num_processes}) so that each process generates whole groups")
    if cfg.dynamic_sampling:
        raise ValueError("dynamic_sampling (DAPO's refill of flat groups) is not available on the TRL path; use "
                         "mpi.poro.train_poro, or set dynamic_sampling=False")
    if cfg.offpolicy_rule != "as_own":
        raise ValueError(f"the TRL path implements the paper's offpolicy_rule='as_own' only, got {cfg.offpolicy_rule!r}")
    if cfg.adaptive_guidance:
        raise ValueError("adaptive_guidance (guided samples only for all-wrong groups) is not implemented on the TRL "
                         "path; use mpi.poro.train_poro, or set adaptive_guidance=False")
    if cfg.guided_context != "own_policy":
        raise ValueError(f"guided_context={cfg.guided_context!r} (the wrong-policy control) is not implemented on the "
                         "TRL path; use mpi.poro.train_poro, or set guided_context='own_policy'")
    dtype = pick_dtype(describe_device(get_device()))
    values = dict(
        output_dir=str(out_dir), num_generations=cfg.group_size,
        per_device_train_batch_size=cfg.group_size * cfg.prompts_per_step // num_processes,
        gradient_accumulation_steps=1, steps_per_generation=1, max_steps=cfg.steps,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
        top_k=cfg.top_k, beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
        loss_type=cfg.loss_type, scale_rewards="group" if cfg.scale_rewards else "none",
        num_iterations=cfg.num_iterations, mask_truncated_completions=cfg.truncated_completions == "mask",
        learning_rate=cfg.learning_rate, max_grad_norm=cfg.max_grad_norm, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_betas[0], adam_beta2=cfg.adam_betas[1], seed=cfg.seed,
        reward_weights=[cfg.accuracy_weight, cfg.format_weight], use_vllm=use_vllm, vllm_mode="colocate",
        logging_steps=1, report_to="none", remove_unused_columns=False, save_strategy="no",
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not cfg.progress, lr_scheduler_type="constant",
        disable_dropout=cfg.disable_dropout,  # as mpi.poro: sampler and scorer both without dropout
    )
    values.update(overrides)
    return trl.GRPOConfig(**values)


# =========================================================================== the trainer


def _trainer_class():
    trl = require_trl()

    class PolicyRolloutGRPOTrainer(trl.GRPOTrainer):
        """TRL's GRPOTrainer with PolicyRollout groups: G own + G guided completions per prompt."""

        def __init__(self, *args, items: Sequence[dict], build_messages: Callable, policy_rollout: bool = True,
                     **kwargs):
            self.items, self.build_messages, self.policy_rollout = list(items), build_messages, policy_rollout
            self._rows: list[dict] | None = None
            super().__init__(*args, **kwargs)
            if policy_rollout and self.num_generations % 2:
                raise ValueError(f"PolicyRollout needs an even group (G own + G guided), got num_generations="
                                 f"{self.num_generations}")
            local = self.args.per_device_train_batch_size * self.args.steps_per_generation
            if local % self.num_generations:
                raise ValueError(f"per_device_train_batch_size x steps_per_generation = {local} must be a multiple of "
                                 f"num_generations = {self.num_generations}: groups must stay whole on a process")

        # --- 1. rows -> policy-free prompts (what TRL tokenizes, generates from by default, and scores)
        def _generate_and_score_completions(self, inputs):
            rows = [self.items[int(x["item_index"])] for x in inputs]
            enriched = []
            for x, item in zip(inputs, rows):
                messages, images = self.build_messages(item, with_policy=False)
                enriched.append({**x, "prompt": messages, "images": list(images)})
            self._rows = rows
            try:
                return super()._generate_and_score_completions(enriched)
            finally:
                self._rows = None

        def guided_rows(self, n: int) -> list[bool]:
            """Row k of a process's batch is guided when it is in the second half of its group."""
            half = self.num_generations // 2
            return [self.policy_rollout and (k % self.num_generations) >= half for k in range(n)]

        # --- 2. the guided half is generated with the policy in context
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            if not self.policy_rollout or self._rows is None:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                     has_tool_images)
            from trl.data_utils import prepare_multimodal_messages

            guided = self.guided_rows(len(prompt_ids))
            prompts = []
            for item, g in zip(self._rows, guided):
                messages, imgs = self.build_messages(item, with_policy=g)
                prompts.append(prepare_multimodal_messages(messages, images=list(imgs)))
            gen_ids, gen_images, gen_fields = self._tokenize_prompts(prompts)
            # rows come as G copies of the own prompt then G of the guided one: a vLLM backend de-duplicates by G
            completion_ids, logprobs = super()._generate_single_turn(gen_ids, gen_images, gen_fields,
                                                                     num_generations // 2, has_tool_images)
            if logprobs is not None:  # "as_own": no sampler correction for tokens sampled under the policy
                logprobs = [[math.nan] * len(lp) if g else lp for lp, g in zip(logprobs, guided)]
            return completion_ids, logprobs

        # --- 3. rewards, with the own / guided split in the logs
        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # gathered
            mode = "train" if self.model.training else "eval"
            weights = self.reward_weights.to(per_func.device)
            total = (per_func.nan_to_num(0.0) * weights).sum(1)
            guided = torch.tensor(self.guided_rows(per_func.shape[0]), device=per_func.device)
            for name, sel in (("own", ~guided), ("guided", guided)):
                if sel.any():
                    self._metrics[mode][f"{name}/reward_mean"].append(float(total[sel].mean()))
                    self._metrics[mode][f"{name}/accuracy"].append(float(per_func[sel, 0].nanmean()))
            return per_func

    return PolicyRolloutGRPOTrainer


def make_trainer(model, processor, items: Sequence[dict], cfg, out_dir: str | Path, *, use_vllm: bool = False,
                 build_messages: Callable | None = None, reward_funcs: list[Callable] | None = None,
                 num_processes: int | None = None, **config_overrides: Any):
    """A ready PolicyRolloutGRPOTrainer (call .train()). `cfg` is an mpi.poro.GRPOConfig; reward_funcs
    replaces [accuracy, format] (TRL signature: f(completions, item_index, **kw) -> list[float])."""
    from mpi import distributed as dist
    from mpi.poro import default_build_messages
    from mpi.sampling import vision_token_ids

    cfg.validate()
    build_messages = build_messages or default_build_messages()
    num_processes = num_processes or dist.num_processes()
    overrides = dict(config_overrides)
    if not use_vllm:  # the sampler never emits vision placeholders (same support as mpi.poro)
        overrides.setdefault("generation_kwargs", {"suppress_tokens": vision_token_ids(model) or None})
    args = trl_config(cfg, out_dir, num_processes=num_processes, use_vllm=use_vllm, **overrides)
    Trainer = _trainer_class()
    if reward_funcs is not None and len(reward_funcs) != len(args.reward_weights):
        args.reward_weights = [1.0] * len(reward_funcs)
    return Trainer(model=model, processing_class=processor, reward_funcs=reward_funcs or reward_functions(items), args=args,
                   train_dataset=trl_dataset(items), items=items, build_messages=build_messages,
                   policy_rollout=cfg.policy_rollout)


def train_poro_trl(model, processor, items: Sequence[dict], cfg, out_dir: str | Path, **kwargs: Any):
    """PolicyRollout GRPO on TRL for cfg.steps steps; returns the trainer (its state.log_history holds the
    metrics, including own/ and guided/ reward and accuracy)."""
    trainer = make_trainer(model, processor, items, cfg, out_dir, **kwargs)
    trainer.train()
    return trainer
