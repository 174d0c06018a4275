"""The Gradio Space, served on 127.0.0.1: through gradio_client, and in a real headless browser."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
from PIL import Image

from cvlm.build import build

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
APP = Path(__file__).resolve().parents[1] / "spaces" / "connector_arena" / "app.py"
EXAMPLES = APP.parent / "examples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("space")
    good = [build(root / name, vision="tiny-clip", llm="tiny-llama", connector=name, image_size=64)
            for name in ("mlp", "qformer")]
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    os.environ["CVLM_SPACE_MODELS"] = ",".join(str(p) for p in [*good, broken])
    spec = importlib.util.spec_from_file_location("connector_arena_app_test", APP)
    app = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = app
    spec.loader.exec_module(app)
    variants = [app.load_variant(s, label) for s, label in app.model_sources()]
    demo = app.build_demo(variants)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    from gradio_client import Client

    client = Client(url, verbose=False)
    yield app, variants, client, url, root
    client.close()
    demo.close()
    os.environ.pop("CVLM_SPACE_MODELS", None)


def ask(client, image, question="What colour is the background?"):
    from gradio_client import handle_file

    return client.predict(handle_file(str(image)), question, api_name="/compare")


def check_answers(result, variants):
    ok = [v for v in variants if not v.error]
    assert len(result) == 1 + 3 * len(ok)
    for i, v in enumerate(ok):
        keeps, answer, table = result[1 + 3 * i : 4 + 3 * i]
        assert Path(keeps).exists() and isinstance(answer, str)
        assert table["headers"] == ["cost of this request", "value"]
        costs = dict(table["data"])  # a table a person reads: units in the cells
        assert costs["visual tokens"] == str(v.config.num_image_tokens)
        assert costs["prefill latency"].endswith(" ms") and float(costs["prefill latency"][:-3]) > 0
        assert costs["decode speed"] == "-" or costs["decode speed"].endswith(" tokens/s")
        assert costs["stopped at the time limit"] == "no"


def test_every_variant_answers_an_example_and_a_broken_one_is_an_error_card(served):
    app, variants, client, _, _ = served
    assert [v.error is None for v in variants] == [True, True, False]
    assert variants[2].error.startswith("could not load")
    check_answers(ask(client, EXAMPLES / "synthetic-background_colour.png"), variants)
    q = {v.config.connector_type: v.config.num_image_tokens for v in variants if not v.error}
    assert q == {"mlp": 64, "qformer": 64}


@pytest.mark.parametrize("mode", ["RGBA", "L", "CMYK"])
def test_grayscale_rgba_and_cmyk_uploads_are_converted(served, tmp_path, mode):
    _, variants, client, _, _ = served
    path = tmp_path / f"picture.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.new(mode, (50, 40)).save(path)
    result = ask(client, path)
    assert result[0] == f"*converted from {mode} to RGB*"
    check_answers(result, variants)


def test_a_huge_image_is_downscaled_with_a_note(served, tmp_path):
    _, variants, client, _, _ = served
    path = tmp_path / "huge.png"
    Image.new("RGB", (3000, 1500), (10, 200, 10)).save(path)
    result = ask(client, path)
    assert result[0] == "*downscaled from 3000x1500 to 1024x512*"
    check_answers(result, variants)


def test_bad_input_gets_its_message_and_the_app_still_answers(served, tmp_path):
    from gradio_client.exceptions import AppError

    _, variants, client, _, _ = served
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text, not a picture")
    for image, question, message in [
        (not_image, "What colour?", "That file is not an image this page can read: upload a PNG, JPEG or WebP picture."),
        (EXAMPLES / "coffee.jpg", "   ", "Type a question."),
    ]:
        with pytest.raises(AppError) as info:
            ask(client, image, question)
        assert message in str(info.value)
        check_answers(ask(client, EXAMPLES / "coffee.jpg", "What is in the cup?"), variants)


def test_eight_concurrent_requests_all_complete(served):
    from gradio_client import handle_file

    _, variants, client, _, _ = served
    jobs = [client.submit(handle_file(str(EXAMPLES / "chelsea.jpg")), f"Question {i}?", api_name="/compare")
            for i in range(8)]
    results = [job.result(timeout=300) for job in jobs]
    for result in results:
        check_answers(result, variants)


def chromium() -> str | None:
    for name in ("chromium-headless-shell", "chromium"):
        if shutil.which(name):
            return shutil.which(name)
    for path in ("/usr/lib/chromium/chromium-headless-shell", "/usr/lib/chromium/chromium"):
        if os.path.exists(path):
            return path
    return None


def test_a_real_browser_picks_an_example_compares_and_sees_every_answer(served):
    browser_path = chromium()
    if browser_path is None:
        pytest.skip("no Chromium here (.ci/run installs Debian's chromium-headless-shell)")
    from playwright.sync_api import sync_playwright

    _, variants, _, url, _ = served
    screenshot = Path(os.environ.get("CVLM_ARTIFACTS", "test-artifacts")) / "space.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url)
        page.get_by_text("Connector arena").first.wait_for(timeout=60_000)
        page.locator(".gallery-item, [data-testid='examples'] button, table.examples td, .table-wrap td").first.click()
        page.get_by_role("button", name="Compare").click()
        ok = [v for v in variants if not v.error]
        # every variant's costs arrive when its answer is complete
        page.wait_for_function(
            f"() => (document.body.innerText.match(/stopped at the time limit/g) || []).length >= {len(ok)}",
            timeout=120_000)
        assert page.get_by_text("Failed to load.").count() == 1
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert screenshot.stat().st_size > 10_000


def test_a_variant_that_reaches_the_time_limit_says_so(served, monkeypatch):
    app, variants, _, _, _ = served
    monkeypatch.setattr(app, "TIME_LIMIT_S", 0.0)
    image = Image.new("RGB", (64, 64), (10, 10, 200))
    *_, (text, costs) = list(app.answer_stream(variants[0], image, "What colour?"))
    assert costs["stopped_at_time_limit"] is True
    assert app.cost_rows(costs)[-1] == ["stopped at the time limit", "yes"]
    assert text.endswith("[stopped: this variant reached the 0 s time limit]")


def test_the_scatter_axes_leave_a_margin_around_every_point(served):
    app = served[0]
    assert app.padded([16, 64]) == pytest.approx([16 - 5.76, 64 + 5.76])
    low, high = app.padded([40.0])  # one point: still inside the frame
    assert low < 40.0 < high


def test_a_path_of_the_servers_own_files_is_refused(served, tmp_path):
    """Only files gradio received reach the app: a file dict naming a file on the server (no FileData
    marker, so gradio does not upload or move it) gets no answer about it, and the app still works."""
    from gradio_client.exceptions import AppError

    app, variants, client, _, _ = served
    secret = tmp_path / "server-secret.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(secret)
    with pytest.raises(AppError) as info:
        client.predict({"path": str(secret)}, "What colour is the background?", api_name="/compare")
    assert "Upload the image through this page (or pick an example); other paths are not read." in str(info.value)
    for sneaky in (str(secret), f"{app.gr.utils.get_upload_folder()}/../../{secret.relative_to('/')}"):
        with pytest.raises(app.gr.Error):
            app.received_path({"path": sneaky}, str(tmp_path / "cache"))
    check_answers(ask(client, EXAMPLES / "coffee.jpg", "What is in the cup?"), variants)


def test_the_app_binds_this_machine_only_unless_it_runs_on_a_space(served, monkeypatch):
    app = served[0]
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert app.server_name() == "127.0.0.1"
    monkeypatch.setenv("SPACE_ID", "org/arena")
    assert app.server_name() == "0.0.0.0"
