"""A real browser drives the panel: preview a demo adapter, match it, run a demo merge to completion.

Playwright for Python drives Debian's Chromium (/usr/bin/chromium).  Screenshots go to
``test-artifacts/`` at the repo root.  The test fails if the page shows an error toast.
Without Chromium it is skipped locally, but fails when CI is set.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

pytestmark = pytest.mark.browser

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing (CI installs Debian's chromium)", pytrace=False)
    pytest.skip(f"{CHROMIUM} not installed", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")
from panel_app import launch_panel, make_models  # noqa: E402


@pytest.fixture(scope="module")
def panel(tmp_path_factory):
    running = launch_panel(make_models(tmp_path_factory.mktemp("models")))
    yield running
    running.ui.close()


@pytest.fixture(scope="module")
def page(panel):
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(120_000)
        page.goto(panel.url)
        page.wait_for_selector("#lycoris-adapter")
        yield page
        browser.close()


def assert_no_error(page, where: str) -> None:
    toasts = page.locator('[data-testid="toast-body"]')
    for i in range(toasts.count()):
        toast = toasts.nth(i)
        if "error" in (toast.get_attribute("class") or ""):
            page.screenshot(path=str(ARTIFACTS / f"panel-error-{where}.png"), full_page=True)
            raise AssertionError(f"{where}: the page shows an error: {toast.inner_text()}")


def choose(page, selector: str, value: str) -> None:
    """Pick an option of a Gradio dropdown by typing it and choosing it from the list."""
    box = page.locator(f"{selector} input")
    box.click()
    box.fill(value)
    page.get_by_role("option", name=value, exact=True).first.click()


def test_the_first_adapter_is_previewed_on_load_and_tables_wait_for_data(page, panel):
    # a new user sees the first adapter's summary at once, and no empty "1 2 3" placeholder tables
    first = page.locator("#lycoris-adapter input").input_value()
    sync_api.expect(page.locator("#lycoris-summary")).to_contain_text(first)
    sync_api.expect(page.locator("#lycoris-modules")).to_be_visible()
    sync_api.expect(page.locator("#lycoris-match-ckpt")).to_be_visible()
    assert page.locator("#lycoris-report").count() == 0 or not page.locator("#lycoris-report").is_visible()
    page.get_by_role("tab", name="Preview").click()


def test_choosing_an_adapter_shows_its_preview_without_a_click(page, panel):
    choose(page, "#lycoris-adapter", "demo_loha.safetensors")
    summary = page.locator("#lycoris-summary")
    sync_api.expect(summary).to_contain_text("demo_loha.safetensors")
    sync_api.expect(page.locator("#lycoris-modules")).to_contain_text("loha")
    assert_no_error(page, "choose")


def test_preview_a_demo_adapter_and_match_it(page, panel):
    choose(page, "#lycoris-adapter", "demo_lora.safetensors")
    page.click("#lycoris-preview-btn")
    summary = page.locator("#lycoris-summary")
    sync_api.expect(summary).to_contain_text("demo_lora.safetensors")
    sync_api.expect(summary).to_contain_text("sd1")
    sync_api.expect(page.locator("#lycoris-triggers")).to_contain_text("lycotrigger")
    sync_api.expect(page.locator("#lycoris-image img")).to_be_visible()
    sync_api.expect(page.locator("#lycoris-modules")).to_contain_text("lora_unet_mid_block")
    sync_api.expect(page.locator("#lycoris-block-plot canvas, #lycoris-block-plot svg").first).to_be_visible()
    page.click("#lycoris-match-btn")
    sync_api.expect(page.locator("#lycoris-match")).to_contain_text("All applicable modules match")
    assert_no_error(page, "preview")
    page.screenshot(path=str(ARTIFACTS / "panel-preview.png"), full_page=True)


def test_run_a_demo_merge_to_completion(page, panel):
    page.get_by_role("tab", name="Merge").click()
    for name in ("demo_lora.safetensors", "demo_loha.safetensors"):
        choose(page, "#lycoris-picks", name)
    sync_api.expect(page.locator("#lycoris-rows")).to_contain_text("demo_loha.safetensors")
    rank = page.locator("#lycoris-rank input")
    rank.fill("24")
    rank.press("Tab")
    page.click("#lycoris-dry-btn")
    status = page.locator("#lycoris-status")
    sync_api.expect(status).to_contain_text("Nothing was written")
    sync_api.expect(page.locator("#lycoris-report")).to_contain_text("kept_energy")
    assert_no_error(page, "dry-run")
    page.screenshot(path=str(ARTIFACTS / "panel-merge-dry-run.png"), full_page=True)

    page.locator("#lycoris-output textarea, #lycoris-output input").first.fill("browser_merge")
    page.click("#lycoris-run-btn")
    sync_api.expect(status).to_contain_text(re.compile(r"Written.*browser_merge\.safetensors"))
    assert_no_error(page, "merge")
    assert (panel.root / "loras" / "browser_merge.safetensors").is_file()
    page.screenshot(path=str(ARTIFACTS / "panel-merge-written.png"), full_page=True)


def test_a_refused_name_shows_a_readable_message_not_a_traceback(page, panel):
    page.get_by_role("tab", name="Merge").click()
    page.locator("#lycoris-output textarea, #lycoris-output input").first.fill("../escape")
    page.click("#lycoris-run-btn")
    toast = page.locator('[data-testid="toast-body"]').first
    sync_api.expect(toast).to_contain_text("plain file name")
    assert "Traceback" not in toast.inner_text()
    page.screenshot(path=str(ARTIFACTS / "panel-refused-name.png"), full_page=True)
