"""The web UI in a real browser: Playwright drives Debian's headless Chromium against serve.py's server (on a thread
of the test process) running the scripted tiny Llama. It types an instruction, clicks Send and reads the answer, then
stops the server and sees the error bar. Screenshots go to test-artifacts/ (front_end.png: the answer;
front_end_error.png: the error bar)."""

import os
import shutil

import pytest
from helpers import ROOT, serve_in_thread
from scripted_llama import SCRIPT, build_scripted_llama

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path():
    """Debian's chromium, never a Playwright download. Missing: a failure in CI (.ci/run installs it), else a skip."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        message = "the browser test needs Debian's chromium (apt-get install chromium) and the playwright package"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def chromium():
    return chromium_path()


@pytest.fixture(scope="module")
def server(chromium, tmp_path_factory, spm_tokenizer_dir, free_port_module):
    model = build_scripted_llama(spm_tokenizer_dir, tmp_path_factory.mktemp("scripted"))
    with serve_in_thread(
        ["--model_name_or_path", str(model), "--port", str(free_port_module), "--log_level", "warning"]
    ) as running:
        yield running


def test_send_shows_the_answer_then_the_error_bar_when_the_endpoint_is_down(chromium, server):
    from playwright.sync_api import expect, sync_playwright

    url = server.url
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, timeout=60_000)
            expect(page.locator("#endpoint")).to_have_value(url)  # served by serve.py: it points at itself
            expect(page.locator("#error-bar")).to_be_hidden()

            # the defaults and ranges come from the server's /health (GenParams and generation/limits.py)
            expect(page.locator("#max_tokens")).to_have_attribute("placeholder", "256")
            expect(page.locator("#max_tokens")).to_have_attribute("max", "8192")  # the scripted model's window
            expect(page.locator("#temperature_range")).to_have_text("0 to 2; default 1.")

            page.click("#send")  # no instruction yet: refused in the page, nothing sent
            expect(page.locator("#error-text")).to_contain_text("Instruction is required")
            page.click("#error-close")

            page.fill("#instruction", "Suggest a name for a bakery.")
            page.fill("#temperature", "3")
            page.click("#send")  # out of the server's range: refused in the page
            expect(page.locator("#error-text")).to_contain_text('Temperature must be a number from 0 to 2 (got "3")')
            page.click("#error-close")
            page.fill("#temperature", "")
            page.fill("#input", "It sells rye bread only.")
            page.fill("#max_tokens", "16")
            page.click("#send")
            expect(page.locator("#response")).to_have_text("".join(SCRIPT).strip(), timeout=60_000)
            expect(page.locator("#send")).to_be_enabled()  # the loading state is over
            expect(page.locator("#error-bar")).to_be_hidden()
            expect(page.locator("#stats")).to_contain_text("tokens")  # streamed: the last event carried usage
            page.screenshot(path=str(ARTIFACTS / "front_end.png"), full_page=True)

            server.stop()
            page.click("#send")
            expect(page.locator("#error-bar")).to_be_visible(timeout=30_000)
            expect(page.locator("#error-text")).to_contain_text(f"Could not reach {url}")
            expect(page.locator("#send")).to_be_enabled()
            page.screenshot(path=str(ARTIFACTS / "front_end_error.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "front_end.png").stat().st_size > 10_000  # a real page, not a blank image
