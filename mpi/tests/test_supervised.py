"""The supervised entry point: loss, learning, exact resume, adapter round trip, config errors. toy-tiny, 1-4 steps."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mpi.collate import SupervisedCollator
from mpi.config import get_config
from mpi.modeling import LoraSettings, load_model_and_processor
from mpi.supervised import (
    ConfigError,
    SupervisedConfig,
    check_config,
    latest_trainer_checkpoint,
    supervised_loss,
    train_supervised,
)
from mpi.tests.test_collate import clevr_item, gta_item




def items(n=4):
    out = []
    for k in range(n):
        out.append(clevr_item(n_policy_images=k % 2, answer=f"Case {k % 3 + 1}", id=f"c{k}",
                              cot=f"Condition 1 is {'yes' if k % 2 else 'no'}. So Case {k % 3 + 1}."))
    return out


def fresh_model(**kw):
    return load_model_and_processor("toy-tiny", quantization=None, lora=LoraSettings(r=8), seed=0, **kw)


def tiny_cfg(**kw):
    values = dict(mode="direct-sft", max_steps=4, batch_size=2, learning_rate=1e-2, save_every=2, warmup_ratio=0.0,
                  max_length=512, progress=False, seed=0)
    values.update(kw)
    return SupervisedConfig(**values)


def adapter_weights(path):
    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("mode", ["cpt", "cot-sft"])
def test_masked_loss_matches_the_models_own_loss(toy_model_and_processor, mode):
    model, processor = toy_model_and_processor
    batch = SupervisedCollator(processor, mode)([clevr_item(id="a"), gta_item(n_images=2), clevr_item(n_policy_images=1)])
    labels = batch.pop("labels")
    with torch.no_grad():
        reference = model(**batch, labels=labels).loss  # transformers' own shifted, masked mean
        sparse_sum, n_sparse = supervised_loss(model, batch, labels, sparse=True)
        full_sum, n_full = supervised_loss(model, batch, labels, sparse=False)
    assert int(n_sparse) == int(n_full) == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(sparse_sum / n_sparse, reference, atol=1e-5)
    assert torch.allclose(full_sum / n_full, reference, atol=1e-5)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tmp_path):
    model, processor = fresh_model()
    data = items(4)
    batch = SupervisedCollator(processor, "direct-sft")(data)
    labels = batch.pop("labels")

    def loss():
        model.eval()
        with torch.no_grad():
            total, n = supervised_loss(model, batch, labels)
        return float(total / n)

    before = loss()
    # 6 steps: the toy tokenizer's corpus grew with the GTA data, and the rebuilt toy-tiny drops 0.49 in 4 steps
    result = train_supervised(model, processor, data, tiny_cfg(max_steps=6), tmp_path / "run")
    after = loss()
    assert result["steps"] == 6 and not result["skipped"]
    assert after < before - 0.5, (before, after)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and all(r["tokens_per_s"] > 0 for r in rows)


def test_training_feeds_the_policy_to_the_share_of_batches_the_config_asks_for(tmp_path, monkeypatch):
    """train_supervised hands policy_in_context_frac and seed to its collator: every batch at 1.0, none at 0."""
    import mpi.supervised as supervised

    seen = []

    class Recording(SupervisedCollator):
        def __call__(self, batch_items):
            seen.append(self.shows_policy(batch_items))
            return super().__call__(batch_items)

    monkeypatch.setattr(supervised, "SupervisedCollator", Recording)
    for frac in (1.0, 0.0):
        seen.clear()
        model, processor = fresh_model()
        train_supervised(model, processor, items(4), tiny_cfg(mode="cot-sft", max_steps=2, policy_in_context_frac=frac),
                         tmp_path / f"run{frac}")
        training = seen[-2:]  # the length check's chunk comes first; the last two are the training batches
        assert training == [frac == 1.0] * 2, (frac, seen)


class Interrupt(Exception):
    pass


def interrupt_at(step):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Interrupt(f"simulated disconnect before step {step + 1}")

    return Stop()


def test_interrupt_and_resume_gives_the_same_weights(tmp_path):
    data = items(4)
    cfg = tiny_cfg(mode="cot-sft", max_steps=4, save_every=2, batch_size=2)  # 4 steps = 2 epochs: reshuffle
    model, processor = fresh_model()
    straight = train_supervised(model, processor, data, cfg, tmp_path / "straight")

    model, processor = fresh_model()
    with pytest.raises(Interrupt):
        train_supervised(model, processor, data, cfg, tmp_path / "cut", callbacks=[interrupt_at(3)])
    assert latest_trainer_checkpoint(tmp_path / "cut" / "checkpoints").name == "checkpoint-2"
    assert not (tmp_path / "cut" / "result.json").exists()
    model, processor = fresh_model()  # a new process after the disconnect: fresh weights
    resumed = train_supervised(model, processor, data, cfg, tmp_path / "cut")
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 4  # the checkpoint-2 step

    a, b = adapter_weights(tmp_path / "straight" / "adapter"), adapter_weights(tmp_path / "cut" / "adapter")
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda d: [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert losses("straight") == losses("cut")  # the log has no duplicated or missing steps
    assert straight["final_loss"] == resumed["final_loss"]


def test_saved_adapter_reloads_with_identical_logits_and_finished_run_is_not_rerun(tmp_path):
    data = items(2)
    model, processor = fresh_model()
    result = train_supervised(model, processor, data, tiny_cfg(max_steps=2), tmp_path / "run")
    batch = SupervisedCollator(processor, "cot-sft")(data)
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
        reloaded_model, _ = load_model_and_processor("toy-tiny", quantization=None, adapter=result["adapter"],
                                                     seed=0, trainable=False)
        reloaded = reloaded_model(**batch).logits
        untouched, _ = fresh_model()
        again = train_supervised(untouched, processor, data, tiny_cfg(max_steps=2), tmp_path / "run")
        untouched.eval()
        skipped = again["model"](**batch).logits
    assert torch.equal(trained, reloaded)
    assert again["skipped"] and again["steps"] == 2
    assert torch.equal(trained, skipped)  # the finished run's weights were loaded, not retrained
    with pytest.raises(ConfigError, match="different config.*learning_rate"):
        train_supervised(untouched, processor, data, tiny_cfg(max_steps=2, learning_rate=5e-3), tmp_path / "run")


def test_config_errors_name_the_problem(toy_model_and_processor):
    model, processor = toy_model_and_processor  # no adapters: the LoRA targets of the config are checked
    data = items(2)
    with pytest.raises(ConfigError, match="dataset is empty"):
        check_config(tiny_cfg(), model=model, processor=processor, dataset=[])
    with pytest.raises(ConfigError, match=r"max_length=40 is shorter than the longest training sequence: item c\d"):
        check_config(tiny_cfg(max_length=40), model=model, processor=processor, dataset=data)
    with pytest.raises(ConfigError, match="matches no module of this model"):
        check_config(tiny_cfg(lora_target_modules=["no_such_proj"]), model=model)
    with pytest.raises(ConfigError, match="quantization='4bit' on device 'mps'.*bitsandbytes"):
        check_config(tiny_cfg(quantization="4bit"), device_type="mps")  # the real decision: no 4-bit on MPS
    with pytest.raises(ConfigError, match="quantization='4bit' on device 'cuda'"):
        check_config(tiny_cfg(quantization="4bit"), device_type="cuda", bnb_ok=False)
    with pytest.raises(ConfigError, match="empty 'cot'"):
        check_config(tiny_cfg(mode="cot-sft"), processor=processor, dataset=[clevr_item(cot="")])
    with pytest.raises(ConfigError, match=r"policy_in_context_frac=1.5: must be in \[0, 1\]"):
        check_config(tiny_cfg(mode="cot-sft", policy_in_context_frac=1.5))
    with pytest.raises(ConfigError, match="policy_in_context_frac is for SFT"):
        check_config(tiny_cfg(mode="cpt", policy_in_context_frac=0.5))
    summary = check_config(tiny_cfg(), model=model, processor=processor, dataset=data)
    lengths = SupervisedCollator(processor, "direct-sft")(data)["attention_mask"].sum(1)
    assert summary["longest_sequence"] == int(lengths.max()) and summary["lora_modules"] == 14
    # the length check measures the policy-in-context items with their policy
    summary = check_config(tiny_cfg(policy_in_context_frac=1.0), model=model, processor=processor, dataset=data)
    with_policy = SupervisedCollator(processor, "direct-sft", policy_in_context_frac=1.0)(data)["attention_mask"].sum(1)
    assert summary["longest_sequence"] == int(with_policy.max()) > int(lengths.max())


def test_stage_config_picks_the_stage_fields(tmp_path):
    from mpi.pipeline import make_plan, stage_config

    run = get_config("tiny", cpt_learning_rate=3e-4, sft_learning_rate=2e-4, sft_policy_in_context_frac=0.3,
                     out_dir=str(tmp_path), extra={"cpt": {"lora_embeddings": True}, "sft": {"max_steps": 3}})
    plan = make_plan(run)
    cpt, sft = stage_config(plan, "cpt", 0), stage_config(plan, "cot-sft", 0)
    assert (cpt.mode, cpt.learning_rate, cpt.lora_embeddings, cpt.policy_in_context_frac) == ("cpt", 3e-4, True, 0.0)
    assert (sft.mode, sft.learning_rate, sft.lora_embeddings, sft.max_steps) == ("cot-sft", 2e-4, False, 3)
    assert sft.policy_in_context_frac == 0.3
    assert stage_config(plan, "direct-sft", 0).mode == "direct-sft"
    with pytest.raises(ValueError, match="unknown training stage"):
        stage_config(plan, "rl", 0)


def test_vm_cpt_adapter_continues_into_sft_with_embedding_learning_rate(tmp_path):
    data = items(2)
    seen = {}
    from transformers import TrainerCallback

    class Groups(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            seen["groups"] = [(g.get("initial_lr", g["lr"]), len(g["params"])) for g in optimizer.param_groups]

    model, processor = load_model_and_processor("toy-tiny", quantization=None, seed=0)  # no adapter: cfg's LoRA
    cpt_cfg = tiny_cfg(mode="cpt", max_steps=1, batch_size=2, lora_embeddings=True, embedding_learning_rate=1e-5)
    cpt = train_supervised(model, processor, data, cpt_cfg, tmp_path / "vm_cpt", callbacks=[Groups()])
    assert cpt["adapter"] == str(tmp_path / "vm_cpt" / "adapter")
    assert [lr for lr, _ in seen["groups"]] == [cpt_cfg.learning_rate, 1e-5]
    assert seen["groups"][1][1] == 4  # lora_A/B of embed_tokens and of lm_head
    saved = adapter_weights(tmp_path / "vm_cpt" / "adapter")
    assert any("embed_tokens" in k for k in saved) and any("lm_head" in k for k in saved)

    # TriMPI: SFT starts from the CPT adapter, loaded trainable
    model, processor = load_model_and_processor("toy-tiny", quantization=None, seed=0, adapter=cpt["adapter"],
                                                trainable=True)
    from peft import get_peft_model_state_dict

    start = get_peft_model_state_dict(model)
    assert start.keys() == saved.keys() and all(torch.equal(start[k], saved[k]) for k in saved)
    assert any(p.requires_grad for p in model.parameters())
    sft = train_supervised(model, processor, data, tiny_cfg(mode="cot-sft", max_steps=1, batch_size=2),
                           tmp_path / "vm_cpt+cot_sft")
    assert sft["steps"] == 1 and sft["adapter"] == str(tmp_path / "vm_cpt+cot_sft" / "adapter")
    model, processor = load_model_and_processor("toy-tiny", quantization=None, seed=0)
    with pytest.raises(ConfigError, match="matches no module"):
        train_supervised(model, processor, data, tiny_cfg(lora_target_modules=["nothing_here"], max_steps=1),
                         tmp_path / "bad")


def test_full_parameter_training_saves_a_loadable_model(tmp_path):
    model, processor = load_model_and_processor("toy-tiny", quantization=None, seed=0)  # no adapters
    data = items(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_supervised(model, processor, data, tiny_cfg(max_steps=1, lora_r=None), tmp_path / "full")
    assert result["adapter"] is None and result["model"] is model
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("visual" in k for k in changed) and any("lm_head" in k for k in changed)  # all weights train
    batch = SupervisedCollator(processor, "direct-sft")(data)
    batch.pop("labels")
    reloaded, _ = load_model_and_processor(result["model_dir"], quantization=None, seed=0, trainable=False)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)


@pytest.mark.parametrize("batch_size,accum", [(4, 1), (1, 4)])
def test_logged_loss_is_the_token_mean_over_the_accumulated_batch(tmp_path, batch_size, accum):
    model, processor = fresh_model()
    data = [clevr_item(id="a"), clevr_item(cot="Short.", id="b"), gta_item(), clevr_item(n_policy_images=1, id="c")]
    batch = SupervisedCollator(processor, "cot-sft")(data)  # targets of different lengths: means would differ
    labels = batch.pop("labels")
    with torch.no_grad():
        total, n = supervised_loss(model, batch, labels, sparse=False)
    cfg = tiny_cfg(mode="cot-sft", max_steps=1, batch_size=batch_size, grad_accum_steps=accum, learning_rate=1e-12)
    result = train_supervised(model, processor, data, cfg, tmp_path / "run")
    assert result["final_loss"] == pytest.approx(float(total / n), rel=1e-5)
