"""Evaluation: policy-free accuracy, override, referral, and what dropping the policy saves.

    result = evaluate_accuracy(model, processor, test_set)               # the MPI metric: no policy in the prompt
    result = evaluate_accuracy(model, processor, test_set, with_policy=True)   # the in-context baseline
    score_predictions(items, texts)        # pure: exact match (ClevrPolicy), tool/arg/overall (GTAPolicy)
    referral_score(cot, gold_path)         # which policy sections a CoT cites vs the gold path (no LLM judge)
    prompt_token_counts(processor, item)   # prompt tokens with and without the policy
    measure_prefill(model, processor, items)   # prefill seconds (and peak memory on CUDA) with and without it

Generation is greedy and batched; prompts come from `mpi.data.messages.build_messages` (the one place
prompt text is made), answers from the last `\\boxed{...}` (`mpi.rewards.parse_boxed`).
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections import Counter, defaultdict
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from mpi.rewards import normalize_answer, parse_boxed

# =========================================================================== scoring (pure)


def _score_tool_call(pred: Any, gold: Any) -> dict[str, float]:
    from mpi.data.scoring import score_tool_call  # here: scoring CLEVR answers never needs the data package

    return score_tool_call(pred, gold)


def score_one(item: Mapping[str, Any], prediction: str | None) -> dict[str, Any]:
    """Score one generated text against one item.

    ClevrPolicy: `score` = exact match of the boxed answer (case/whitespace-insensitive).
    GTAPolicy: `score` = overall = 0.5 tool accuracy + 0.5 argument score; `tool`, `args` too.
    `parsed` says whether a complete \\boxed{} was found (a formatting failure scores 0).
    """
    dataset = item.get("dataset")
    boxed = parse_boxed(prediction)
    out: dict[str, Any] = {"parsed": boxed is not None, "answer": boxed}
    if dataset == "clevr":
        out["score"] = float(boxed is not None and normalize_answer(boxed) == normalize_answer(item["answer"]))
    elif dataset == "gta":
        s = _score_tool_call(boxed, item["answer"]) if boxed is not None else {"tool": 0.0, "args": 0.0, "overall": 0.0}
        out.update(tool=float(s["tool"]), args=float(s["args"]), score=float(s["overall"]))
    else:
        raise ValueError(f"item['dataset'] must be 'clevr' or 'gta', got {dataset!r} (item id {item.get('id')!r})")
    return out


def group_key(item: Mapping[str, Any]) -> str:
    """'clevr-T-N2', 'clevr-M-N4', 'gta': the rows of the paper's table."""
    if item.get("dataset") == "gta":
        return "gta"
    return f"clevr-{item.get('variant', 'T')}-N{item.get('depth', 0)}"


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def score_predictions(items: Sequence[Mapping[str, Any]], predictions: Sequence[str | None]) -> dict[str, Any]:
    """Accuracy of `predictions` (raw model texts) on `items`, overall and per dataset/variant/N.

    Returns {"accuracy", "n", "parsed_rate", "per_item": [...], "groups": {key: {"accuracy", "n", ...}}}
    with "tool_accuracy" / "arg_score" for GTAPolicy groups. Pure: no model, no randomness.
    """
    if len(items) != len(predictions):
        raise ValueError(f"score_predictions: {len(items)} items but {len(predictions)} predictions; pass one text per item")
    per_item = [score_one(item, text) for item, text in zip(items, predictions)]
    groups: dict[str, list[int]] = defaultdict(list)
    for k, item in enumerate(items):
        groups[group_key(item)].append(k)
    out_groups = {}
    for key, idx in sorted(groups.items()):
        g = {"accuracy": _mean([per_item[i]["score"] for i in idx]), "n": len(idx),
             "parsed_rate": _mean([float(per_item[i]["parsed"]) for i in idx])}
        if key == "gta":
            g["tool_accuracy"] = _mean([per_item[i]["tool"] for i in idx])
            g["arg_score"] = _mean([per_item[i]["args"] for i in idx])
        out_groups[key] = g
    return {
        "accuracy": _mean([p["score"] for p in per_item]),
        "n": len(items),
        "parsed_rate": _mean([float(p["parsed"]) for p in per_item]),
        "per_item": per_item,
        "groups": out_groups,
    }


def majority_baseline(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The chance line: always answer each policy's most common gold answer (the best a model that
    ignores the image can do), scored with the same metric as the model."""
    by_policy: dict[str, Counter] = defaultdict(Counter)
    for item in items:
        by_policy[item.get("policy_name", "")][item["answer"]] += 1
    guesses = [f"\\boxed{{{by_policy[item.get('policy_name', '')].most_common(1)[0][0]}}}" for item in items]
    scored = score_predictions(items, guesses)
    return {"accuracy": scored["accuracy"], "groups": {k: v["accuracy"] for k, v in scored["groups"].items()}}


# =========================================================================== referral


# '# Condition 1.2' / 'Condition 1' (the paper's format), or '#1.2 metal? yes' (the toy's compact format, where
# '#1.2.1 Case 3' names the leaf the walk ends at: a response, not a condition)
_CITED = re.compile(r"#?\s*Condition\s+(\d+(?:\.\d+)*)|#(\d+(?:\.\d+)*)(?![\d.]| Case)")


def cited_conditions(cot: str | None) -> list[str]:
    """Condition ids a CoT cites ('# Condition 1.2', 'Condition 1', '#1.2'), first mention order, no repeats."""
    seen: list[str] = []
    for paper, compact in _CITED.findall(cot or ""):
        cid = paper or compact
        if cid not in seen:
            seen.append(cid)
    return seen


def referral_score(cot: str | None, gold_path: Sequence[str]) -> dict[str, Any]:
    """How well a CoT refers to the policy: its cited condition ids against the gold path through the tree.

    exact: the cited ids are the gold path, in order; precision/recall/f1 over the id sets;
    score: 10 * f1, on the paper's 0-10 judge scale (cheap, exact and reproducible: no LLM judge).
    """
    cited = cited_conditions(cot)
    gold = [str(g) for g in gold_path]
    if not gold:
        raise ValueError("referral_score: gold_path is empty; referral is defined for ClevrPolicy items (condition ids)")
    hit = len(set(cited) & set(gold))
    precision = hit / len(cited) if cited else 0.0
    recall = hit / len(gold)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"cited": cited, "exact": cited == gold, "precision": precision, "recall": recall, "f1": f1,
            "score": 10.0 * f1}


# The paper rates policy referral with an LLM judge on a 0-10 scale. This is that prompt, for users
# who have a judge model; `referral_score` is the judge-free default.
JUDGE_PROMPT = (
    "You are given a policy with numbered sections, a question about an image, the correct path of "
    "sections for this image, and a model's reasoning. Rate from 0 to 10 how correctly and completely "
    "the reasoning refers to the policy sections it needs (10: cites exactly the right sections in the "
    "right order with correct conclusions; 0: does not refer to the policy at all). Reply with the number only.\n\n"
    "Policy:\n{policy}\n\nQuestion: {query}\nCorrect path: {gold_path}\nModel reasoning:\n{cot}\n\nScore:"
)


def judge_referral(judge: Callable[[str], str], item: Mapping[str, Any], cot: str) -> float | None:
    """Optional LLM-judge hook: `judge(prompt) -> text`; the first number in its reply, clipped to 0-10."""
    prompt = JUDGE_PROMPT.format(policy=item["policy_text"], query=item["query"],
                                 gold_path=" -> ".join(item["gold_path"]), cot=cot)
    match = re.search(r"\d+(?:\.\d+)?", judge(prompt) or "")
    return None if match is None else min(10.0, max(0.0, float(match.group())))


def referral_summary(items: Sequence[Mapping[str, Any]], predictions: Sequence[str | None]) -> dict[str, float]:
    """Mean referral over the ClevrPolicy items whose prediction has any text (the CoT part is used)."""
    scores = []
    for item, text in zip(items, predictions):
        if item.get("dataset") != "clevr" or not item.get("gold_path"):
            continue
        cot = (text or "").split("</think>")[0]
        scores.append(referral_score(cot, item["gold_path"]))
    return {"n": len(scores), "exact": _mean([float(s["exact"]) for s in scores]),
            "f1": _mean([s["f1"] for s in scores]), "score": _mean([s["score"] for s in scores])}


# =========================================================================== generation


def _build_messages():
    from mpi.data.messages import build_messages

    return build_messages


def _rows(dataset: Any, limit: int | None = None) -> list[dict[str, Any]]:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return [dict(dataset[i]) for i in range(n)]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def encode_batch(processor, items: Sequence[Mapping[str, Any]], *, with_policy: bool, build_messages=None):
    """Left-padded prompt tensors for `items` (generation prompts, no response)."""
    build_messages = build_messages or _build_messages()
    texts, images = [], []
    for item in items:
        messages, imgs = build_messages(item, with_policy=with_policy)
        texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        images.extend(imgs)
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation appends on the right
    try:
        return processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side


def _stop_ids(model, processor) -> list[int]:
    ids = {processor.tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_texts(model, processor, items: Sequence[Mapping[str, Any]], *, with_policy: bool = False,
                   batch_size: int = 8, max_new_tokens: int = 64, build_messages=None,
                   progress: bool = False, desc: str = "generate") -> list[str]:
    """Greedy completions for `items`, `batch_size` prompts per `generate` call."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    build_messages = build_messages or _build_messages()
    device = _device(model)
    was_training = model.training
    model.eval()
    out: list[str] = []
    stops = _stop_ids(model, processor)
    try:
        starts = range(0, len(items), batch_size)
        for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
            chunk = items[s: s + batch_size]
            enc = encode_batch(processor, chunk, with_policy=with_policy, build_messages=build_messages).to(device)
            gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops,
                                 pad_token_id=processor.tokenizer.pad_token_id, temperature=None, top_p=None,
                                 top_k=None)
            completions = gen[:, enc["input_ids"].shape[1]:]
            out.extend(processor.tokenizer.batch_decode(completions, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def evaluate_accuracy(model, processor, dataset, *, with_policy: bool = False, batch_size: int = 8,
                      max_new_tokens: int = 64, limit: int | None = None, build_messages=None,
                      progress: bool = False, desc: str | None = None) -> dict[str, Any]:
    """Greedy-decode every item and score it.

    with_policy=False is the MPI metric (policy-free accuracy); True is the in-context baseline (and,
    on override items, the policy-override test). Returns {"accuracy", "n", "predictions", "parsed_rate",
    "groups", "per_item", "chance", "referral", "seconds"}.
    """
    items = _rows(dataset, limit)
    if not items:
        raise ValueError("evaluate_accuracy: the dataset is empty; build a test split first (mpi.data)")
    start = time.perf_counter()
    texts = generate_texts(model, processor, items, with_policy=with_policy, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, build_messages=build_messages, progress=progress,
                           desc=desc or ("eval (policy in context)" if with_policy else "eval (policy-free)"))
    scored = score_predictions(items, texts)
    scored.update(predictions=texts, chance=majority_baseline(items), referral=referral_summary(items, texts),
                  seconds=time.perf_counter() - start, with_policy=with_policy, ids=[i.get("id") for i in items])
    return scored


# =========================================================================== cost


def prompt_token_counts(processor, item: Mapping[str, Any], build_messages=None) -> dict[str, Any]:
    """Prompt tokens (image tokens included) with and without the policy for one item.

    `saved` = 1 - without/with: the fraction of the prompt the policy costs (the paper: up to 93.9%).
    """
    build_messages = build_messages or _build_messages()
    counts = {}
    for with_policy in (True, False):
        messages, images = build_messages(item, with_policy=with_policy)
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = processor(text=[text], images=images or None, return_tensors="pt")
        counts["with_policy" if with_policy else "without_policy"] = int(enc["input_ids"].shape[1])
    counts["policy_tokens"] = counts["with_policy"] - counts["without_policy"]
    counts["saved"] = counts["policy_tokens"] / counts["with_policy"] if counts["with_policy"] else 0.0
    return counts


def token_cost_table(processor, dataset, build_messages=None, limit: int | None = 64) -> dict[str, dict[str, float]]:
    """Mean prompt tokens with/without the policy per dataset group (clevr-T-N2, gta, ...)."""
    rows = _rows(dataset, limit)
    by_group: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in rows:
        by_group[group_key(item)].append(prompt_token_counts(processor, item, build_messages))
    table = {}
    for key, counts in sorted(by_group.items()):
        w = _mean([c["with_policy"] for c in counts])
        wo = _mean([c["without_policy"] for c in counts])
        table[key] = {"with_policy": w, "without_policy": wo, "saved": 1 - wo / w if w else 0.0, "n": len(counts)}
    return table


@torch.no_grad()
def measure_prefill(model, processor, items: Sequence[Mapping[str, Any]], *, repeats: int = 3,
                    build_messages=None) -> dict[str, Any]:
    """Measured prefill (one forward over the prompt, the KV cache built) with and without the policy.

    Each item is run alone (batch 1, no padding), `repeats` times after one warm-up; the fastest run
    per item is kept (the least disturbed by other work on the machine) and averaged over items. Peak memory is read from CUDA's allocator where there is one; the KV-cache size
    (2 x layers x kv_heads x head_dim x tokens x bytes) is reported on every device.
    """
    build_messages = build_messages or _build_messages()
    device = _device(model)
    cfg = getattr(model, "config", None)
    text_cfg = getattr(cfg, "text_config", cfg)
    layers = getattr(text_cfg, "num_hidden_layers", 0)
    kv_heads = getattr(text_cfg, "num_key_value_heads", getattr(text_cfg, "num_attention_heads", 0))
    head_dim = getattr(text_cfg, "head_dim", None) or (text_cfg.hidden_size // text_cfg.num_attention_heads)
    bytes_per = torch.finfo(next(model.parameters()).dtype).bits // 8 if next(model.parameters()).is_floating_point() else 2
    was_training = model.training
    model.eval()
    result: dict[str, Any] = {}
    try:
        for with_policy in (True, False):
            seconds, tokens, peaks = [], [], []
            for item in items:
                enc = encode_batch(processor, [item], with_policy=with_policy, build_messages=build_messages).to(device)
                model(**enc, use_cache=True)  # warm-up
                times = []
                for _ in range(repeats):
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                        torch.cuda.reset_peak_memory_stats(device)
                    t0 = time.perf_counter()
                    model(**enc, use_cache=True)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                        peaks.append(torch.cuda.max_memory_allocated(device))
                    times.append(time.perf_counter() - t0)
                seconds.append(min(times))
                tokens.append(int(enc["input_ids"].shape[1]))
            key = "with_policy" if with_policy else "without_policy"
            mean_tokens = _mean(tokens)
            result[key] = {"prefill_seconds": _mean(seconds), "prompt_tokens": mean_tokens,
                           "kv_cache_bytes": 2 * layers * kv_heads * head_dim * mean_tokens * bytes_per,
                           "peak_memory_bytes": max(peaks) if peaks else None}
    finally:
        model.train(was_training)
    w, wo = result["with_policy"], result["without_policy"]
    result["token_saving"] = 1 - wo["prompt_tokens"] / w["prompt_tokens"]
    result["prefill_saving"] = 1 - wo["prefill_seconds"] / w["prefill_seconds"]
    if w["peak_memory_bytes"] and wo["peak_memory_bytes"]:
        result["memory_saving"] = 1 - wo["peak_memory_bytes"] / w["peak_memory_bytes"]
    result["device"] = device.type
    result["n_items"] = len(items)
    return result


# =========================================================================== summaries


def mean_and_spread(values: Iterable[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max over seeds."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": _mean(vals), "std": std, "min": min(vals), "max": max(vals), "n": len(vals)}


def strip_for_json(result: Mapping[str, Any], keep_predictions: int = 20) -> dict[str, Any]:
    """A result dict small enough to store: full per-item rows dropped, a few predictions kept, and one
    compact `"item_scores": [[id, score], ...]` for EVERY item (what mpi.report's paired bootstrap pairs on).

    Items without ids (a result from score_predictions alone) are named by their position, which pairs
    correctly across methods because every method is evaluated on the same rows in the same order.
    """
    out = {k: v for k, v in result.items() if k not in ("per_item", "predictions", "ids")}
    all_per = list(result.get("per_item") or [])
    all_ids = list(result.get("ids") or [])
    if all_ids and len(all_ids) != len(all_per):
        raise ValueError(f"strip_for_json: {len(all_ids)} ids but {len(all_per)} per_item rows; the result's "
                         "'ids' and 'per_item' must list the same items in the same order")
    if all_per:
        names = all_ids if all_ids else list(range(len(all_per)))
        out["item_scores"] = [[i, float(p["score"])] for i, p in zip(names, all_per)]
    preds = list(result.get("predictions") or [])[:keep_predictions]
    ids = list(result.get("ids") or [])[:keep_predictions]
    per = list(result.get("per_item") or [])[:keep_predictions]
    out["examples"] = [{"id": i, "text": t, "score": p.get("score")} for i, t, p in zip(ids, preds, per)]
    return json.loads(json.dumps(out, default=str))
