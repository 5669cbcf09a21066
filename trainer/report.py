"""What a run leaves to look at: training curves (PNG) and an HTML report of sample episodes.

:func:`episode_record` turns a finished sample into a JSON-serializable record (appended to
``episodes.jsonl`` while training): the prompt and its images, the response cut into runs of equal
loss mask (model tokens vs. inserted env tokens, one entry per token, image pad runs collapsed),
each turn's tool call and score, and the images the env returned. :func:`write_report` draws
``training_curves.png`` from ``metrics.jsonl`` and writes ``report.html``, a single self-contained
file: images and the plot are embedded as data URIs, so it can be mailed or attached to an issue.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from PIL import Image

from trainer.metrics import read_metrics

EPISODES_FILE = "episodes.jsonl"
PLOT_FILE = "training_curves.png"
REPORT_FILE = "report.html"
_THUMBNAIL_PX = 384


def image_data_uri(image: Image.Image, max_side: int = _THUMBNAIL_PX) -> str:
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _token_runs(tokenizer, ids: list[int], mask: list[int], image_pad_id: int | None) -> list[dict[str, Any]]:
    """Consecutive tokens of equal mask, each run a list of decoded pieces (pad runs collapsed)."""
    runs: list[dict[str, Any]] = []
    i = 0
    while i < len(ids):
        trained = int(mask[i])
        pieces: list[str] = []
        while i < len(ids) and int(mask[i]) == trained:
            if image_pad_id is not None and ids[i] == image_pad_id:
                j = i
                while j < len(ids) and ids[j] == image_pad_id and int(mask[j]) == trained:
                    j += 1
                pieces.append(f"<|image_pad|>×{j - i}")
                i = j
                continue
            pieces.append(tokenizer.decode([ids[i]], skip_special_tokens=False))
            i += 1
        runs.append({"trained": bool(trained), "pieces": pieces})
    return runs


def episode_record(
    sample, tokenizer, *, step: int, advantage: float, image_pad_id: int | None
) -> dict[str, Any]:
    metadata = sample.metadata or {}
    response_ids = (
        list(sample.tokens[len(sample.tokens) - sample.response_length :]) if sample.response_length else []
    )
    mask = list(sample.loss_mask or [])
    # Observation images in insertion order; each turn's record says how many its observation
    # inserted, so every image is kept with the turn it followed.
    observed = [image_data_uri(image) for image in metadata.get("observation_images") or [] if isinstance(image, Image.Image)]
    turns = []
    position = 0
    for turn in metadata.get("turns") or []:
        record = {
            key: turn.get(key)
            for key in (
                "turn",
                "finish_reason",
                "model_tokens",
                "env_tokens",
                "tool_call",
                "tool_executed",
                "score",
                "error",
            )
        }
        count = int(turn.get("observation_images") or 0)
        record["observation_images"] = count
        record["images"] = observed[position : position + count]
        position += count
        turns.append(record)
    prompt_images = (sample.multimodal_inputs or {}).get("images") or []
    status = getattr(sample.status, "name", str(sample.status))
    return {
        "step": step,
        "index": sample.index,
        "group_index": sample.group_index,
        "label": sample.label,
        "reward": float(sample.reward) if sample.reward is not None else None,
        "advantage": float(advantage),
        "status": status,
        "status_reason": metadata.get("status_reason"),
        "removed": bool(sample.remove_sample),
        "prompt": sample.prompt if isinstance(sample.prompt, str) else json.dumps(sample.prompt, default=str),
        "prompt_images": [image_data_uri(image) for image in prompt_images if isinstance(image, Image.Image)],
        # Images no turn record accounts for (records written before turns counted them).
        "observation_images": observed[position:],
        "runs": _token_runs(tokenizer, response_ids, mask, image_pad_id),
        "turns": turns,
        "outcome": metadata.get("outcome"),
    }


def append_episodes(run_dir: Path, records: list[dict[str, Any]]) -> None:
    with open(Path(run_dir) / EPISODES_FILE, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, default=str) + "\n")


def read_episodes(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / EPISODES_FILE
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ---------------------------------------------------------------------------------------------------------
# Plot

_PANELS = (
    ("Reward", [("rollout/reward_mean", "mean reward"), ("rollout/pass_rate", "pass rate (reward >= 1)")]),
    (
        "Response length (tokens)",
        [("rollout/response_length_mean", "response"), ("rollout/model_tokens_mean", "model tokens")],
    ),
    (
        "Tool calls",
        [("rollout/tool_call_validity", "valid / all calls"), ("rollout/turns_mean", "turns per episode")],
    ),
    # Steps -sft_steps .. -1 of a run with a supervised warm-start (trainer.sft).
    ("SFT warm-start", [("sft/loss", "loss (NLL per token)"), ("sft/token_accuracy", "token accuracy")]),
)


def plot_metrics(records: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    panels = [p for p in _PANELS if p[0] != "SFT warm-start" or any("sft/loss" in r for r in records)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), constrained_layout=True)
    for ax, (title, series) in zip(axes, panels, strict=True):
        for key, label in series:
            values = [r.get(key) for r in records]
            values = [math.nan if v is None else float(v) for v in values]
            if any(math.isfinite(v) for v in values):
                ax.plot(steps, values, marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("rollout step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; }
table.metrics { border-collapse: collapse; font-size: 13px; }
table.metrics td, table.metrics th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
table.metrics th { background: #f4f4f4; }
.episode { border: 1px solid #ccc; border-radius: 6px; padding: 12px; margin: 16px 0; }
.episode h3 { margin: 0 0 8px 0; font-size: 15px; }
.meta { font-size: 13px; color: #555; }
.prompt { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12px; background: #fafafa;
  border-left: 3px solid #999; padding: 6px; max-height: 160px; overflow: auto; }
.run { font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap; word-break: break-all;
  padding: 6px; margin: 6px 0; border-radius: 4px; }
.model { background: #e8f5e9; border-left: 3px solid #2e7d32; }
.env { background: #eceff1; border-left: 3px solid #607d8b; color: #37474f; }
.tok { border-right: 1px solid rgba(0,0,0,0.12); }
.model .tok:nth-child(even) { background: #c8e6c9; }
.env .tok:nth-child(even) { background: #cfd8dc; }
.label { font-size: 11px; font-weight: 600; text-transform: uppercase; color: #555; display: block; }
.tool { font-size: 12px; margin: 2px 0 8px 12px; }
.good { color: #2e7d32; font-weight: 600; } .bad { color: #c62828; font-weight: 600; }
img.diagram { max-width: 320px; border: 1px solid #ddd; margin: 4px; vertical-align: top; }
.legend span { padding: 2px 6px; margin-right: 8px; font-size: 12px; }
"""

_SUMMARY_KEYS = (
    "rollout/reward_mean",
    "rollout/pass_rate",
    "rollout/turns_mean",
    "rollout/tool_call_validity",
    "rollout/response_length_mean",
    "train/pg_clipfrac",
    "train/ppo_kl",
    "train/logprob_abs_diff_mean",
    "perf/rollout_time_s",
    "perf/update_time_s",
    "sft/loss",  # the supervised warm-start's steps (negative step numbers)
    "sft/token_accuracy",
)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _metrics_table(records: list[dict[str, Any]]) -> str:
    if not records:
        return "<p>No metrics recorded.</p>"
    shown = records if len(records) <= 12 else records[:3] + records[-9:]
    head = "".join(f"<th>{html.escape(k.split('/')[-1])}</th>" for k in _SUMMARY_KEYS)
    rows = [f"<tr><th>step</th>{head}</tr>"]
    for record in shown:
        cells = "".join(f"<td>{_fmt(record.get(k))}</td>" for k in _SUMMARY_KEYS)
        rows.append(f"<tr><th>{record['step']}</th>{cells}</tr>")
    return f"<table class='metrics'>{''.join(rows)}</table>"


def _turn_line(turn: dict[str, Any]) -> str:
    call = turn.get("tool_call")
    parts = [
        f"turn {turn.get('turn')}: {turn.get('model_tokens') or 0} model tokens, finish={_fmt(turn.get('finish_reason'))}"
    ]
    if call:
        parts.append(f"tool call <code>{html.escape(json.dumps(call))}</code>")
        if turn.get("score") is not None:
            css = "good" if float(turn["score"]) >= 1 else "bad"
            parts.append(f"score <span class='{css}'>{_fmt(turn['score'])}</span>")
    else:
        parts.append("no tool call")
    if turn.get("error"):
        parts.append(f"<span class='bad'>{html.escape(str(turn['error']))}</span>")
    return "<div class='tool'>" + " · ".join(parts) + "</div>"


def _episode_html(record: dict[str, Any]) -> str:
    reward = record.get("reward")
    css = "good" if reward is not None and reward >= 1 else "bad"
    out = [
        "<div class='episode'>",
        f"<h3>step {record['step']} · sample {record['index']} (group {record['group_index']}) · "
        f"reward <span class='{css}'>{_fmt(reward)}</span> · advantage {_fmt(record.get('advantage'))} · "
        f"{html.escape(str(record.get('status')))}{' (removed)' if record.get('removed') else ''}</h3>",
        f"<div class='meta'>label: <code>{html.escape(str(record.get('label')))}</code> · "
        f"{html.escape(str(record.get('status_reason') or ''))}</div>",
    ]
    for uri in record.get("prompt_images") or []:
        out.append(f"<img class='diagram' src='{uri}' alt='prompt image'>")
    out.append(
        f"<span class='label'>prompt</span><div class='prompt'>{html.escape(record.get('prompt') or '')}</div>"
    )
    turns = record.get("turns") or []
    model_run = 0
    for run in record.get("runs") or []:
        kind = "model" if run["trained"] else "env"
        title = (
            f"model, turn {model_run + 1} (loss mask 1)"
            if run["trained"]
            else "inserted by the env (loss mask 0)"
        )
        tokens = "".join(f"<span class='tok'>{html.escape(piece)}</span>" for piece in run["pieces"])
        out.append(f"<span class='label'>{title}</span><div class='run {kind}'>{tokens}</div>")
        if run["trained"]:
            if model_run < len(turns):
                out.append(_turn_line(turns[model_run]))
            model_run += 1
        elif 0 < model_run <= len(turns):
            # The env tokens after model turn k are turn k's observation: its images go here.
            for uri in turns[model_run - 1].get("images") or []:
                out.append(
                    f"<span class='label'>image inserted after turn {model_run}</span><img class='diagram' src='{uri}'>"
                )
    for uri in record.get("observation_images") or []:
        out.append(f"<span class='label'>image returned by the env</span><img class='diagram' src='{uri}'>")
    out.append("</div>")
    return "\n".join(out)


def _env_line(config: dict[str, Any]) -> str:
    """Which env the run trained on and the plugin settings it ran with, from the plugin YAML with
    the trainer's overrides."""
    path = config.get("custom_config_path")
    try:
        from rollout.config import RolloutConfig

        plugin = RolloutConfig.from_yaml(path) if path else RolloutConfig()
        env, turns, kwargs = plugin.rollout_interaction_env_path, plugin.max_turns, plugin.env_kwargs
        per_turn, tools = plugin.max_tokens_per_turn, plugin.tools_in_prompt
    except Exception as exc:  # a report is still worth writing
        return f"env: unknown (plugin config {path}: {exc})"
    turns = config.get("max_turns") or turns
    per_turn = config.get("max_tokens_per_turn") or per_turn
    kwargs = config.get("env_kwargs") if config.get("env_kwargs") is not None else kwargs
    return (
        f"env {env} · plugin config {path} · max_turns={turns} · max_tokens_per_turn={per_turn} · "
        f"tools_in_prompt={tools} · env_kwargs={json.dumps(kwargs, default=str)}"
    )


def select_episodes(episodes: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Episodes of the first and the last recorded step (half each), best reward first."""
    if not episodes or limit < 1:
        return []
    steps = sorted({e["step"] for e in episodes})
    chosen: list[dict[str, Any]] = []
    buckets = [steps[0]] if len(steps) == 1 else [steps[0], steps[-1]]
    per_bucket = max(1, limit // len(buckets))
    for step in buckets:
        in_step = [e for e in episodes if e["step"] == step]
        in_step.sort(key=lambda e: -(e.get("reward") or 0.0))
        chosen.extend(in_step[:per_bucket])
    return chosen[:limit]


def write_report(
    run_dir: Path, *, title: str = "GRPO run", limit: int = 12, config: dict[str, Any] | None = None
) -> Path:
    """Draw the curves and write ``report.html``; returns the report's path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    plot_uri = ""
    if records:
        plot = plot_metrics(records, run_dir / PLOT_FILE)
        plot_uri = "data:image/png;base64," + base64.b64encode(plot.read_bytes()).decode("ascii")
    episodes = select_episodes(read_episodes(run_dir), limit)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='meta'>{html.escape(str(run_dir))} · {len(records)} steps</p>",
    ]
    if config:
        parts.append("<p class='meta'>" + html.escape(_env_line(config)) + "</p>")
        keys = (
            "hf_checkpoint",
            "prompt_data",
            "rollout_batch_size",
            "n_samples_per_prompt",
            "lr",
            "rollout_max_response_len",
            "seed",
        )
        parts.append(
            "<p class='meta'>" + " · ".join(f"{k}={html.escape(str(config.get(k)))}" for k in keys) + "</p>"
        )
    if plot_uri:
        parts.append(
            f"<h2>Training curves</h2><img src='{plot_uri}' alt='training curves' style='max-width:100%'>"
        )
    parts.append("<h2>Metrics</h2>" + _metrics_table(records))
    parts.append(
        "<h2>Episodes</h2><p class='legend'><span class='run model'>model tokens (trained)</span>"
        "<span class='run env'>env tokens (not trained)</span> one box per token; image pad runs collapsed</p>"
    )
    parts.extend(_episode_html(e) for e in episodes)
    if not episodes:
        parts.append("<p>No episodes recorded.</p>")
    parts.append("</body></html>")
    out = run_dir / REPORT_FILE
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
