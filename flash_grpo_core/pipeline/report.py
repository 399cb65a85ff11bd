"""The evaluation report: one self-contained HTML page with the videos as files beside it.

    write_report(out_dir, ReportInputs(metrics_base, metrics_trained, history, samples, title)) -> out_dir/report.html

- a metrics table: base, trained and trained - base per metric, the delta marked better / worse
  by the metric's direction; "not configured" dimensions are listed with their reason;
- the held-out reward's paired margin (trained - base) with its 95% interval and per-prompt spread;
- training curves over iterations from ``history`` (reward_mean with its std band, loss,
  clip_fraction, approx_kl where present), as inline base64 PNGs drawn with matplotlib, with
  integer iteration ticks; a curve whose values agree to 1e-3 of their size is drawn flat and
  labelled so, instead of stretching a rounding-level wiggle over the whole axis;
- per sample prompt: base and trained videos side by side as ``<id>-base.mp4`` /
  ``<id>-trained.mp4`` next to the page, each with the prompt under it, and an animated GIF preview
  (base | trained) inlined as base64, so motion is visible where mp4 playback is not (a file://
  page, a mail attachment). Small videos (the toy's 16x16) are enlarged by an integer factor with
  nearest-neighbour (every pixel repeated) to at least 128 px, so the squares stay sharp squares.

MP4: H.264 (yuv420p, +faststart) through ``imageio-ffmpeg``, whose wheel ships an ffmpeg binary;
Chromium and Firefox play it. Without it OpenCV's ``mp4v`` (MPEG-4 Part 2) is written, which
Chromium does not play; the GIF preview still shows the motion. Every file is written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flash_grpo_core.artifacts.atomic import atomic_path

CURVES = ("reward_mean", "loss", "clip_fraction", "approx_kl")


# ---------------------------------------------------------------------------------------------
# Media


def as_video_array(video) -> np.ndarray:
    """uint8 video [F, H, W, 3] as numpy; ValueError otherwise."""
    array = video.detach().cpu().numpy() if hasattr(video, "detach") else np.asarray(video)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise ValueError(f"expected a uint8 video [F, H, W, 3], got {array.dtype} {tuple(array.shape)}")
    return array


def even_sized(video: np.ndarray) -> np.ndarray:
    """Pad H and W up to even sizes by repeating the last row / column (yuv420p needs even sizes)."""
    pad_h, pad_w = video.shape[1] % 2, video.shape[2] % 2
    return np.pad(video, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge") if pad_h or pad_w else video


def write_mp4(video, path: str | os.PathLike, fps: int = 8) -> str:
    """Write a uint8 video [F, H, W, 3] as mp4, atomically; returns the codec used ("h264" or "mp4v")."""
    frames = even_sized(as_video_array(video))  # [F, H', W', 3]
    with atomic_path(path) as temporary:
        try:
            import imageio_ffmpeg
        except ImportError:
            codec = "mp4v"
            _write_mp4v(frames, temporary, fps)
        else:
            codec = "h264"
            writer = imageio_ffmpeg.write_frames(
                str(temporary), (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264",
                pix_fmt_out="yuv420p", macro_block_size=1, quality=8, ffmpeg_log_level="error",
                output_params=["-f", "mp4", "-movflags", "+faststart"])
            writer.send(None)  # start the generator
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
            writer.close()
    return codec


def _write_mp4v(frames: np.ndarray, temporary: Path, fps: int) -> None:
    """OpenCV fallback; VideoWriter picks the container from the extension, so write x.mp4 then move."""
    import cv2

    staging = temporary.with_name(temporary.name + ".mp4")
    writer = cv2.VideoWriter(str(staging), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frames.shape[2], frames.shape[1]))
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    shutil.move(staging, temporary)


def gif_data_uri(video, fps: int = 8) -> str:
    """An animated GIF of a uint8 video [F, H, W, 3] as a data: URI."""
    from PIL import Image

    frames = [Image.fromarray(frame) for frame in as_video_array(video)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:],
                   duration=max(1, round(1000 / fps)), loop=0)
    return "data:image/gif;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def side_by_side(base: np.ndarray, trained: np.ndarray, gap: int = 2) -> np.ndarray:
    """[F, H, W, 3] videos of equal F and H joined left to right with a white gap."""
    spacer = np.full((base.shape[0], base.shape[1], gap, 3), 255, dtype=np.uint8)
    return np.concatenate([base, spacer, trained], axis=2)


PREVIEW_SIDE = 128  # px: the shorter side small videos are enlarged to (at least)


def upscaled(video: np.ndarray, side: int = PREVIEW_SIDE) -> np.ndarray:
    """[F, H, W, 3] enlarged by the integer factor that brings its shorter side to >= `side` px,
    each pixel repeated (nearest-neighbour: a 4x4 square becomes a sharp 32x32 one, not a blur)."""
    factor = max(1, math.ceil(side / min(video.shape[1], video.shape[2])))
    return video.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else video


# ---------------------------------------------------------------------------------------------
# Metrics table


def metric_value(value) -> tuple[float | None, str]:
    """(number or None, note) from a float or an evaluate_videos entry."""
    if isinstance(value, dict):
        if value.get("status", "ok") != "ok":
            return None, f"{value.get('status')}: {value.get('reason', '')}".strip(": ")
        value = value.get("mean")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, "" if value is None else f"not a number: {value!r}"
    return float(value), ""


def metric_rows(metrics_base: dict, metrics_trained: dict) -> list[dict]:
    """One row per metric name (base order, then names only the trained side has)."""
    from flash_grpo_core.metrics import higher_is_better

    rows = []
    for name in [*metrics_base, *(key for key in metrics_trained if key not in metrics_base)]:
        base, base_note = metric_value(metrics_base.get(name))
        trained, trained_note = metric_value(metrics_trained.get(name))
        delta = trained - base if base is not None and trained is not None else None
        rows.append({"name": name, "base": base, "trained": trained, "delta": delta,
                     "higher_is_better": higher_is_better(name), "note": base_note or trained_note})
    return rows


def _number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "&ndash;"
    return f"{value:.4f}"


def table_html(rows: list[dict]) -> str:
    """The metrics table; delta cells carry class better / worse / same."""
    lines = ['<table id="metrics"><thead><tr><th>metric</th><th>base</th><th>trained</th><th>delta</th></tr>'
             + '</thead><tbody>']
    for row in rows:
        delta, verdict = row["delta"], "same"
        if delta is not None and delta != 0:
            verdict = "better" if (delta > 0) == row["higher_is_better"] else "worse"
        delta_text = "&ndash;" if delta is None else f"{delta:+.4f}"
        note = f'<div class="note">{html.escape(row["note"])}</div>' if row["note"] else ""
        arrow = "" if row["higher_is_better"] else ' <span class="dir" title="lower is better">&darr;</span>'
        lines.append(f'<tr data-metric="{html.escape(row["name"])}"><td>{html.escape(row["name"])}{arrow}{note}</td>'
                     f'<td class="base">{_number(row["base"])}</td><td class="trained">{_number(row["trained"])}</td>'
                     f'<td class="delta {verdict}" data-delta="{"" if delta is None else repr(delta)}">'
                     f'{delta_text}</td></tr>')
    lines.append("</tbody></table>")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Curves


def is_flat(values: np.ndarray, relative: float = 1e-3) -> bool:
    """True when the values' range is within `relative` x their largest magnitude (all zero counts):
    a 1e-5 wiggle on a reward of 0.46 is flat, a KL going from 1e-7 to 3e-7 is not."""
    return len(values) > 0 and float(np.ptp(values)) <= relative * float(np.abs(values).max())


def curve_png(history: list[dict], key: str) -> str:
    """One metric over iterations as a base64 PNG data: URI (reward_mean with a +-reward_std band),
    integer iteration ticks; a flat curve (`is_flat`) gets a y-range of +-5% around its value and a
    label saying it is flat."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [row for row in history if isinstance(row.get(key), (int, float))]
    iterations = [row.get("iteration", index + 1) for index, row in enumerate(rows)]
    values = np.array([row[key] for row in rows], dtype=float)
    figure, axes = plt.subplots(figsize=(4.2, 2.8), dpi=100)
    axes.plot(iterations, values, marker="o", color="#1f6feb")
    if key == "reward_mean" and all("reward_std" in row for row in rows):
        spread = np.array([row["reward_std"] for row in rows], dtype=float)
        axes.fill_between(iterations, values - spread, values + spread, alpha=0.2, color="#1f6feb")
    axes.set(xlabel="iteration", title=key)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if is_flat(values):
        centre = float(values.mean())
        pad = max(0.05 * abs(centre), 1e-3)
        axes.set_ylim(centre - pad, centre + pad)
        axes.text(0.5, 0.85, f"flat: {centre:.4g} (range {float(np.ptp(values)):.1g})", transform=axes.transAxes,
                  ha="center", color="#57606a")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def curves_html(history: list[dict], keys=CURVES) -> str:
    """An <img class="plot"> per curve present in the history, or a note when there is none."""
    present = [key for key in keys if any(isinstance(row.get(key), (int, float)) for row in history)]
    if not present:
        return '<p class="note">No training history (no iterations recorded).</p>'
    flat = {key: is_flat(np.array([row[key] for row in history if isinstance(row.get(key), (int, float))],
                                  dtype=float)) for key in present}
    return "\n".join(f'<img class="plot" data-metric="{key}" data-flat="{int(flat[key])}" '
                     f'alt="{key} over iterations{" (flat)" if flat[key] else ""}" '
                     f'src="{curve_png(history, key)}">' for key in present)


def eval_curves_html(curves: dict[str, list[dict]] | None) -> str:
    """The held-out metrics of the evaluated checkpoints over iterations, one plot per metric."""
    if not curves:
        return ""
    rows: dict[int, dict] = {}
    for name, points in curves.items():
        for point in points:
            rows.setdefault(point["iteration"], {"iteration": point["iteration"]})[name] = point["value"]
    return ('<h2>Held-out metrics over iterations</h2>\n'
            f'<div class="plots">{curves_html([rows[k] for k in sorted(rows)], keys=tuple(curves))}</div>')


# ---------------------------------------------------------------------------------------------
# Samples and the page


def safe_id(prompt_id) -> str:
    """A file-name-safe form of a prompt id ("p 1/x" -> "p_1_x")."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(prompt_id)).strip("._")
    return cleaned or "sample"


def sample_html(out_dir: Path, sample: dict, fps: int) -> str:
    """Write one sample's two mp4 files; return its <section> (videos + inline GIF preview)."""
    ident = safe_id(sample["prompt_id"])
    base, trained = (upscaled(as_video_array(sample[key])) for key in ("base", "trained"))
    prompt = f'<span class="prompt">{html.escape(str(sample["prompt"]))}</span>'
    cells = []
    for label, video in (("base", base), ("trained", trained)):
        name = f"{ident}-{label}.mp4"
        codec = write_mp4(video, out_dir / name, fps=fps)
        cells.append(f'<figure><video class="sample" data-codec="{codec}" src="{html.escape(name)}" controls loop '
                     f'muted autoplay playsinline preload="auto"></video>'
                     f'<figcaption><b>{label}</b><br>{prompt}</figcaption></figure>')
    preview = side_by_side(base, trained, gap=4) if base.shape[:3] == trained.shape[:3] else base
    cells.append(f'<figure><img class="preview" alt="base | trained preview" src="{gif_data_uri(preview, fps)}">'
                 f'<figcaption><b>preview: base | trained</b><br>{prompt}</figcaption></figure>')
    return (f'<section class="sample" data-prompt-id="{html.escape(ident)}"><h3>{html.escape(str(sample["prompt_id"]))}'
            f'</h3><p class="prompt">{html.escape(str(sample["prompt"]))}</p>'
            f'<div class="row">{"".join(cells)}</div></section>')


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #1b1f24; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border-bottom: 1px solid #d0d7de; padding: 0.3rem 0.8rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.better { color: #1a7f37; font-weight: 600; } td.worse { color: #cf222e; font-weight: 600; }
.note { color: #57606a; font-size: 0.8rem; font-weight: normal; }
.plots img { margin: 0.3rem; border: 1px solid #d0d7de; }
.row { display: flex; gap: 1rem; flex-wrap: wrap; align-items: flex-start; }
figure { margin: 0; } figcaption { text-align: center; color: #57606a; font-size: 0.85rem; }
video.sample { width: 256px; background: #000; image-rendering: pixelated; }
img.preview { height: 256px; image-rendering: pixelated; }
#margin { font-size: 1.05rem; }
.prompt { font-style: italic; }
"""

# Records in the DOM what the browser did, so a headless check can read it from --dump-dom.
SCRIPT = """
document.documentElement.dataset.scriptRan = "1";
for (const video of document.querySelectorAll("video")) {
  video.dataset.canPlay = video.canPlayType('video/mp4; codecs="avc1.42E01E"') || "no";
  const mark = () => { video.dataset.loaded = String(video.videoWidth) + "x" + String(video.videoHeight); };
  if (video.readyState >= 2) mark(); else video.addEventListener("loadeddata", mark);
  video.addEventListener("error", () => {
    video.dataset.error = String(video.error && video.error.code);
    video.insertAdjacentHTML("afterend", '<div class="note">this browser cannot play this file; see the preview</div>');
  });
}
for (const img of document.querySelectorAll("img")) {
  const mark = () => { img.dataset.rendered = String(img.naturalWidth) + "x" + String(img.naturalHeight); };
  if (img.complete) mark(); else img.addEventListener("load", mark);
}
"""


def margin_html(margin: dict | None) -> str:
    """One sentence: the held-out reward's paired difference, its 95% interval and per-prompt spread."""
    if not margin:
        return ""
    low, high = margin["delta_low"], margin["delta_high"]
    verdict = "above the base, beyond noise" if low > 0 else "below the base" if high < 0 else "within noise"
    return (f'<p id="margin" data-delta="{margin["delta"]!r}" data-low="{low!r}" data-high="{high!r}">'
            f'Held-out reward, trained &minus; base: <b>{margin["delta"]:+.4f}</b> (95% interval {low:+.4f} to '
            f'{high:+.4f}, bootstrap over {margin["videos"]} paired videos of {margin["prompts"]} prompts; per-prompt '
            f'spread {margin["prompt_std"]:.4f}, {margin["prompts_improved"]}/{margin["prompts"]} prompts improved): '
            f'<b>{verdict}</b>.</p>')


@dataclass(frozen=True)
class ReportInputs:
    """What one report is made from.

    metrics_base / metrics_trained: {name: float | evaluate_videos entry}; history: one dict per
    iteration (``iteration`` plus numeric metrics); samples: dicts with ``prompt_id``, ``prompt``
    and uint8 videos ``base`` / ``trained`` [F, H, W, 3]; eval_curves: {metric: [{"iteration",
    "value"}]} of the evaluated checkpoints (a section of its own when given); margin: the reward's
    paired difference (flash_grpo_core.metrics.paired.paired_delta), stated above the table.
    """

    metrics_base: dict
    metrics_trained: dict
    history: list[dict]
    samples: list[dict]
    title: str = "Flash-GRPO evaluation"
    fps: int = 8
    eval_curves: dict[str, list[dict]] | None = None
    margin: dict | None = None


def write_report(out_dir: str | os.PathLike, report: ReportInputs) -> Path:
    """Write ``out_dir/report.html`` and the sample videos beside it from ``report``; return the page's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    idents = [safe_id(sample["prompt_id"]) for sample in report.samples]
    if len(set(idents)) != len(idents):
        raise ValueError(f"sample prompt ids must be unique as file names, got {idents}")
    sections = [sample_html(out_dir, sample, report.fps) for sample in report.samples]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(report.title)}</title>
<style>{STYLE}</style></head>
<body><h1>{html.escape(report.title)}</h1>
<h2>Metrics: trained vs base</h2>
{margin_html(report.margin)}
<p class="note">delta = trained &minus; base; green is an improvement in the metric's direction.</p>
{table_html(metric_rows(report.metrics_base, report.metrics_trained))}
<h2>Training curves</h2>
<div class="plots">{curves_html(report.history)}</div>
{eval_curves_html(report.eval_curves)}
<h2>Samples (same prompt, same noise)</h2>
{"".join(sections) or '<p class="note">No samples.</p>'}
<script>{SCRIPT}</script>
</body></html>
"""
    path = out_dir / "report.html"
    with atomic_path(path) as temporary:
        temporary.write_text(page, encoding="utf-8")
    return path
