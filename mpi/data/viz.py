"""Pictures for notebook 01: scene grids, decision trees, items."""

from __future__ import annotations

import re
from typing import Any

from .policies import Node, Policy
from .scenes import describe_object


def short_label(node: Node) -> str:
    cond = node.condition
    text = cond.text(image_attr=node.image is not None)
    text = text.replace("there is an ", "").replace("there is a ", "").replace("there are ", "")
    text = re.sub(r"(\w+ )?with the same (\w+) as the object in <image>", r"\2 = [img]", text)
    return f"{node.id}\n{text}?"


def plot_policy_tree(policy: Policy, ax=None, label_leaves: bool | None = None, fontsize: float | None = None):
    """Draw the tree top-down: yes-edges solid green, no-edges dashed red, leaves as case numbers."""
    import matplotlib.pyplot as plt

    leaves = policy.leaves()
    n = len(leaves)
    if ax is None:
        _, ax = plt.subplots(figsize=(min(18, 2 + 0.35 * n), 1.2 + 1.1 * policy.depth))
    fontsize = fontsize or (8 if n <= 8 else 6 if n <= 16 else 4)
    label_leaves = n <= 64 if label_leaves is None else label_leaves
    pos: dict[str, tuple[float, float]] = {}
    counter = iter(range(n))

    def place(node: Node, level: int) -> float:
        if node.is_leaf:
            x = float(next(counter))
        else:
            x = (place(node.yes, level + 1) + place(node.no, level + 1)) / 2
        pos[id(node)] = (x, -level)
        return x

    place(policy.root, 0)

    def draw(node: Node) -> None:
        x, y = pos[id(node)]
        if node.is_leaf:
            if label_leaves:
                ax.text(x, y, node.outcome.split()[-1], ha="center", va="center", fontsize=fontsize,
                        bbox=dict(boxstyle="round,pad=0.2", fc="#fff3c4", ec="#b08800", lw=0.5))
            return
        for child, style, color in ((node.yes, "-", "tab:green"), (node.no, "--", "tab:red")):
            cx, cy = pos[id(child)]
            ax.plot([x, cx], [y, cy], style, color=color, lw=0.8, zorder=0)
            draw(child)
        if n <= 16 or node.id.count(".") < 2:
            ax.text(x, y, short_label(node), ha="center", va="center", fontsize=fontsize,
                    bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="gray", lw=0.5))
        else:
            ax.plot([x], [y], "o", color="gray", ms=3)

    draw(policy.root)
    ax.set_title(f"{policy.name}: {policy.depth} layers, {n} outcomes (green = yes, red dashed = no)", fontsize=9)
    ax.set_xlim(-0.8, n - 0.2)
    ax.set_ylim(-policy.depth - 0.6, 0.6)
    ax.axis("off")
    return ax


def show_scenes(pairs: list[tuple[dict[str, Any], Any]], ncols: int = 4, max_listed: int = 5):
    """A grid of rendered scenes, each titled with its objects (CLEVR word order)."""
    import matplotlib.pyplot as plt

    nrows = (len(pairs) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.9 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (scene, image) in zip(axes.flat, pairs):
        ax.imshow(image)
        objs = [describe_object(o) for o in scene["objects"]]
        listed = "\n".join(objs[:max_listed]) + (f"\n+{len(objs) - max_listed} more" if len(objs) > max_listed else "")
        ax.set_title(listed, fontsize=7, loc="left")
    fig.tight_layout()
    return fig


def show_images(images: list[Any], titles: list[str] | None = None, size: float = 2.0):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(size * len(images), size + 0.4), squeeze=False)
    for k, (ax, img) in enumerate(zip(axes.flat, images)):
        ax.imshow(img)
        ax.axis("off")
        if titles:
            ax.set_title(titles[k], fontsize=8)
    fig.tight_layout()
    return fig
