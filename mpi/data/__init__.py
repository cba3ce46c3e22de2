"""ClevrPolicy and GTAPolicy: construction, the chat-message builder and the tool-call scorer.

    from mpi.data import get_data_config, build_clevr_policy, build_gta_policy, build_messages, format_response
    cfg = get_data_config("toy")
    ds = build_clevr_policy(cfg, split="train")
    messages, images = build_messages(ds[0], with_policy=True, response=format_response(ds[0]["cot"], ds[0]["answer"]))

Modules: `scenes` (CLEVR-style sampler, renderer, real-CLEVR loader), `policies` (decision trees),
`clevr` (items, CoT, balancing, chance line), `gta` (tools, rules, items), `scoring`
(`score_tool_call`), `messages` (prompts), `build` (datasets, presets, token report), `samples`
(the committed `data_samples/`).
"""

from .build import (
    COLUMNS,
    DATA_PRESETS,
    SPLITS,
    DataConfig,
    build_clevr_policy,
    build_gta_policy,
    build_split,
    chance_report,
    dataset_fingerprint,
    get_data_config,
    load_dataset_dir,
    save_dataset,
    split_item_counts,
    token_report,
    tokenizer_corpus,
)
from .clevr import (OVERRIDE_QUERY, QUERY, clevr_policies, forward_cot, outcome_report, plot_outcomes,
                    scene_statistics, split_overlap)
from .gta import TOOLS, Rulebook, gta_records, override_rulebook
from .messages import build_messages, format_response
from .policies import Condition, Policy, PolicyError, generate_policy
from .samples import load_samples, write_samples
from .scenes import ATTRIBUTES, SceneError, load_clevr_scenes, render_object, render_scene, sample_scene
from .scoring import score_tool_call, set_text_similarity

__all__ = [
    "ATTRIBUTES", "COLUMNS", "Condition", "DATA_PRESETS", "SPLITS", "DataConfig", "OVERRIDE_QUERY", "Policy", "PolicyError",
    "QUERY", "Rulebook", "SceneError", "TOOLS", "build_clevr_policy", "build_gta_policy", "build_messages",
    "build_split", "chance_report", "clevr_policies", "dataset_fingerprint", "format_response", "forward_cot",
    "generate_policy", "get_data_config", "gta_records", "load_clevr_scenes", "load_dataset_dir", "load_samples",
    "outcome_report", "override_rulebook", "plot_outcomes", "render_object", "render_scene", "sample_scene",
    "save_dataset", "scene_statistics", "score_tool_call", "set_text_similarity", "split_item_counts",
    "split_overlap", "token_report", "tokenizer_corpus", "write_samples",
]
