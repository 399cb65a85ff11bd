"""The evaluation report: its HTML parsed, its files, and the page rendered by a real headless Chromium."""

import base64
import io
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from flash_grpo_core.pipeline.report import ReportInputs, is_flat, metric_rows, safe_id, write_mp4, write_report

CHROMIUM = Path("/usr/bin/chromium")


def moving_square(shift, frames=9, size=32):
    """uint8 [F, size, size, 3]: an orange square moving `shift` px right per frame."""
    video = np.zeros((frames, size, size, 3), dtype=np.uint8)
    for index in range(frames):
        video[index, 8:20, 2 + index * shift: 14 + index * shift] = (255, 100, 0)
    return video


BASE = {"reward": 0.4,
        "temporal_flickering": {"status": "ok", "per_video": [0.9, 0.9], "mean": 0.9},
        "brisque": {"status": "ok", "per_video": [50.0], "mean": 50.0},
        "imaging_quality": {"status": "not configured", "reason": "set eval.metrics.imaging_quality.path"}}
TRAINED = {"reward": 0.55,
           "temporal_flickering": {"status": "ok", "per_video": [0.85], "mean": 0.85},
           "brisque": {"status": "ok", "per_video": [40.0], "mean": 40.0},
           "imaging_quality": {"status": "not configured", "reason": "set eval.metrics.imaging_quality.path"},
           "dynamic_degree_flow": {"status": "ok", "per_video": [True], "mean": 1.0}}
HISTORY = [{"iteration": i, "reward_mean": 0.4 + 0.03 * i, "reward_std": 0.02, "loss": 0.1 / i,
            "clip_fraction": 0.01 * i} for i in range(1, 5)]
MARGIN = {"delta": 0.15, "delta_low": 0.1, "delta_high": 0.2, "prompt_std": 0.03, "prompts_improved": 2,
          "prompts": 2, "videos": 16}
EVAL_CURVES = {"reward": [{"iteration": i, "value": 0.4 + 0.05 * i} for i in (0, 2, 4)],
               "reward/color": [{"iteration": i, "value": 0.8 + 0.01 * i} for i in (0, 2, 4)]}


class Page(HTMLParser):
    """Collects table rows (cells per data-metric), <img> and <video> attributes."""

    def __init__(self):
        super().__init__()
        self.rows, self.images, self.videos, self._row, self._cell = {}, [], [], None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-metric" in attrs:
            self._row = self.rows.setdefault(attrs["data-metric"], [])
        elif tag == "td" and self._row is not None:
            self._cell = {"class": attrs.get("class", ""), "delta": attrs.get("data-delta"), "text": ""}
            self._row.append(self._cell)
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "video":
            self.videos.append(attrs)

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    samples = [{"prompt_id": "p1", "prompt": "a red <square> & a 'quote'", "base": moving_square(1),
                "trained": moving_square(2)},
               {"prompt_id": "p 2/odd", "prompt": "odd sizes", "base": moving_square(1)[:, :31, :29],
                "trained": moving_square(1)[:, :31, :29]}]
    path = write_report(out, ReportInputs(BASE, TRAINED, HISTORY, samples, title="Tiny <run>", eval_curves=EVAL_CURVES,
                                          margin=MARGIN))
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return path, page


def test_table_has_every_metric_and_right_deltas(report):
    _, page = report
    assert list(page.rows) == ["reward", "temporal_flickering", "brisque", "imaging_quality", "dynamic_degree_flow"]
    delta = {name: cells[3] for name, cells in page.rows.items()}
    assert float(delta["reward"]["delta"]) == pytest.approx(0.15)  # 0.55 - 0.40
    assert "better" in delta["reward"]["class"]
    assert float(delta["temporal_flickering"]["delta"]) == pytest.approx(-0.05)
    assert "worse" in delta["temporal_flickering"]["class"]
    assert float(delta["brisque"]["delta"]) == pytest.approx(-10.0)
    assert "better" in delta["brisque"]["class"]  # lower BRISQUE is better
    assert delta["imaging_quality"]["delta"] == "" and "not configured" in page.rows["imaging_quality"][0]["text"]
    assert page.rows["dynamic_degree_flow"][1]["text"] == "\u2013" and page.rows["dynamic_degree_flow"][2]["text"] == "1.0000"


def test_metric_rows_accept_plain_numbers_and_entries():
    rows = metric_rows({"a": 1.0, "b": {"status": "ok", "mean": 2.0}}, {"a": 1.5, "b": 2.0})
    assert [(row["name"], row["delta"]) for row in rows] == [("a", 0.5), ("b", 0.0)]


def test_plots_previews_and_videos_are_present(report):
    from PIL import Image

    path, page = report
    plots = {image["data-metric"]: image["src"] for image in page.images if image.get("class") == "plot"}
    # training curves (approx_kl is not in this history), then the held-out metrics over checkpoints
    assert list(plots) == ["reward_mean", "loss", "clip_fraction", "reward", "reward/color"]
    for src in plots.values():
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    previews = [image["src"] for image in page.images if image.get("class") == "preview"]
    assert len(previews) == 2
    gif = Image.open(io.BytesIO(base64.b64decode(previews[0].split(",", 1)[1])))
    # 32x32 enlarged 4x (to 128 px) with nearest-neighbour, base | 4 px gap | trained
    assert gif.format == "GIF" and gif.n_frames == 9 and gif.size == (128 + 4 + 128, 128)
    frame = np.asarray(gif.convert("RGB"))[:, :128]  # the base half, first frame
    assert (frame == np.kron(moving_square(1)[0], np.ones((4, 4, 1), dtype=np.uint8))).all()  # sharp, not blurred
    assert [video["src"] for video in page.videos] == ["p1-base.mp4", "p1-trained.mp4",
                                                       "p_2_odd-base.mp4", "p_2_odd-trained.mp4"]
    for video in page.videos:
        data = (path.parent / video["src"]).read_bytes()
        assert data[4:8] == b"ftyp" and len(data) > 500
    assert not list(path.parent.glob(".*.tmp"))  # atomic writes leave no temporary files
    assert "Tiny &lt;run&gt;" in path.read_text() and "<square>" not in path.read_text()


def test_every_video_has_its_prompt_under_it_and_the_margin_is_stated(report):
    path, _ = report
    text = path.read_text()
    prompt = '<span class="prompt">a red &lt;square&gt; &amp; a &#x27;quote&#x27;</span>'
    assert text.count(prompt) == 3  # under the base video, the trained video and the preview
    assert all(f"<b>{label}</b><br>{prompt}" in text for label in ("base", "trained"))
    assert '<p id="margin" data-delta="0.15" data-low="0.1" data-high="0.2">' in text
    assert "+0.1500</b> (95% interval +0.1000 to +0.2000" in text and "beyond noise" in text


def test_curves_use_integer_ticks_and_say_when_they_are_flat(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from flash_grpo_core.pipeline import report as report_module

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep each figure to read its axes
    flat = [{"iteration": i, "reward_mean": 0.4629 + 1e-5 * (i % 2), "loss": 0.0} for i in (1, 2, 3)]
    report_module.curve_png(flat, "reward_mean")
    axes = figures[-1].axes[0]
    ticks = [tick for tick in axes.get_xticks() if 1 <= tick <= 3]
    assert ticks and all(float(tick).is_integer() for tick in ticks)  # no 1.25, 1.5, ... iterations
    low, high = axes.get_ylim()
    assert high - low > 0.04  # +-5% of 0.46, not a 1e-5 wiggle stretched over the axis
    assert any(text.get_text().startswith("flat: 0.4629 (range 1e-05)") for text in axes.texts)
    assert is_flat(np.array([0.0, 0.0])) and not is_flat(np.array([1e-7, 3e-7]))
    page = write_report(tmp_path, ReportInputs({"reward": 1.0}, {"reward": 1.0}, flat, []))
    assert 'data-metric="reward_mean" data-flat="1" alt="reward_mean over iterations (flat)"' in page.read_text()
    assert 'data-metric="loss" data-flat="1"' in page.read_text()


def test_empty_history_and_duplicate_ids(tmp_path):
    path = write_report(tmp_path, ReportInputs({"reward": 1.0}, {"reward": 1.0}, [], []))
    assert "No training history" in path.read_text() and "No samples" in path.read_text()
    video = moving_square(1)
    with pytest.raises(ValueError, match="unique"):
        write_report(tmp_path, ReportInputs({}, {}, [], [
            {"prompt_id": "a/b", "prompt": "", "base": video, "trained": video},
            {"prompt_id": "a b", "prompt": "", "base": video, "trained": video}]))
    with pytest.raises(ValueError, match="uint8 video"):
        write_mp4(video.astype(np.float32), tmp_path / "x.mp4")
    assert safe_id("../x y") == "x_y"


def chromium(*args, timeout=60):
    """Run headless Chromium isolated from the network and any profile; returns stdout."""
    return subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-background-networking", "--disable-component-update", "--no-first-run",
                           "--disable-sync", *args], capture_output=True, text=True, timeout=timeout, check=True).stdout


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    path, _ = report
    url = path.resolve().as_uri()
    dom = chromium(f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", url)
    rendered = Page()
    rendered.feed(dom)
    assert 'data-script-ran="1"' in dom  # the page's own script ran
    plots = [image for image in rendered.images if image.get("class") == "plot"]
    assert len(plots) == 5 and all(image.get("data-rendered") == "420x280" for image in plots)
    previews = [image for image in rendered.images if image.get("class") == "preview"]
    # enlarged 4x and 5x (shorter side >= 128 px): 128 + 4 + 128 and 145 + 4 + 145 wide
    assert [image.get("data-rendered") for image in previews] == ["260x128", "294x155"]
    assert len(rendered.videos) == 4
    for video in rendered.videos:
        if video["data-codec"] == "h264":  # Chromium decodes H.264; the mp4v fallback it cannot
            assert video.get("data-loaded") in ("128x128", "146x156"), video  # 145x155 padded to even sizes
    screenshot = tmp_path / "shot.png"
    chromium(f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1200", f"--screenshot={screenshot}", url)
    pixels = np.asarray(Image.open(screenshot).convert("RGB"))
    assert pixels.shape[:2] == (1200, 1000)
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not a blank page
