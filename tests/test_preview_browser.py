"""The preview page in real headless Chromium (Debian's package) driven by Playwright."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from proxy import config, create_app
from proxy.sandbox.server import RunningServer

# A loaded CI machine renders slowly: wait for states generously (not a speed check).
expect.set_options(timeout=30_000)

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The machine's network is closed: keep Chromium from calling home (and waiting on it).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def live_proxy(sandboxes):
    settings = config.load(overrides=sandboxes.proxy_settings(), environ={})
    server = RunningServer(create_app(settings)).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def page():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1300, "height": 1000})
        yield context.new_page()
        browser.close()


def test_preview_two_users_side_by_side(page, live_proxy):
    page.goto(f"{live_proxy}/preview")
    page.wait_for_selector("body[data-ready=true]")
    page.select_option("#template-select", "recs_block")
    columns = page.locator(".user-column")
    expect(columns).to_have_count(2)
    # Fill the form as a person would: a known user and an unknown one, then render.
    columns.nth(0).locator('.param-input[data-param="user_id"]').fill("testUser")
    columns.nth(1).locator('.param-input[data-param="user_id"]').fill("unknown-42")
    page.click("#render-all")

    first, second = columns.nth(0), columns.nth(1)
    expect(first.locator(".status")).to_contain_text("Rendered")
    expect(second.locator(".status")).to_contain_text("Rendered")
    items = first.frame_locator("iframe.result-frame").locator(".rec-item")
    expect(items).to_have_count(5)
    expect(items.nth(0)).to_contain_text("cookie")
    expect(second.frame_locator("iframe.result-frame").locator(".rec-item").nth(0)).to_contain_text(
        "Classic croissant"
    )
    expect(first.locator(".result-text")).to_contain_text("1. cookie")
    expect(first.locator(".result-json")).to_contain_text('"item_1": "cookie"')
    # The page renders its default users on load, so this one may already be cached.
    expect(first.locator(".result-json .badge").first).to_have_text(re.compile(r"^(HIT|MISS|COALESCED)$"))
    snippet = first.locator(".snippet")
    value = snippet.input_value()
    assert (f"{{% connected_content {live_proxy}/v1/render/recs_block?user_id={{{{${{user_id}} | url_param_escape}}}}"
            "&rec_id=testRecId :retry :cache_max_age 300 %}") in value
    assert ":save recs %}" in value and "{{recs.item_1}}" in value
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "preview-recs.png"), full_page=True)


def test_experiment_control_vs_treatment(page, live_proxy):
    page.goto(f"{live_proxy}/preview")
    page.wait_for_selector("body[data-ready=true]")
    page.select_option("#template-select", "hero_banner")
    page.click("#render-all")
    columns = page.locator(".user-column")
    expect(columns.nth(1).locator(".status")).to_contain_text("Rendered")
    expect(columns.nth(0).frame_locator("iframe").locator(".hero-headline")).to_have_text("Spring picks are in")
    expect(columns.nth(1).frame_locator("iframe").locator(".hero-headline")).to_have_text(
        "Summer sale: up to 40% off"
    )
    expect(columns.nth(1).locator(".result-json")).to_contain_text('"tracked": false')
    # the hero image comes from the sandbox itself: it loads with no internet
    hero = columns.nth(1).frame_locator("iframe").locator("img")
    expect(hero).to_have_attribute("src", re.compile(r"^http://127\.0\.0\.1:\d+/images/summer-sale\.svg$"))
    for column in range(2):
        frame = columns.nth(column).locator("iframe.result-frame").element_handle().content_frame()
        assert frame is not None
        frame.wait_for_function(
            "() => { const img = document.querySelector('img');"
            " return img && img.complete && img.naturalWidth === 600; }")
    # variants live 60 s, less than Braze's minimum cache: the page says what Braze will do
    expect(columns.nth(1).locator(".snippet-notes")).to_contain_text("at least 5 minutes")
    assert "treatment-1" not in columns.nth(1).locator(".snippet").input_value()


def open_liquid_tab(page, live_proxy):
    page.goto(f"{live_proxy}/preview")
    page.wait_for_selector("body[data-ready=true]")
    page.click("#tab-liquid")


def test_liquid_tab_aborts_and_renders_users_side_by_side(page, live_proxy):
    open_liquid_tab(page, live_proxy)
    # The default message, for the two default users: a known one and an unknown one.
    page.click("#liquid-render")
    results = page.locator(".liquid-result")
    expect(results).to_have_count(2)
    expect(results.nth(0).locator(".liquid-output")).to_contain_text(
        "Hi Camille, picked for you: cookie, cracker and chocolate milk")
    expect(results.nth(1).locator(".liquid-status")).to_contain_text("aborted: no recommendations")
    expect(results.nth(0).locator(".liquid-warnings")).to_contain_text("No warnings")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "preview-liquid.png"), full_page=True)


def test_liquid_tab_attribute_editor_and_warnings(page, live_proxy):
    open_liquid_tab(page, live_proxy)
    # A third user, and an attribute that is neither user_id nor first_name.
    page.click("#liquid-add-user")
    rows = page.locator("#liquid-attributes tbody tr")
    rows.nth(0).locator('.attr-value[data-user="2"]').fill("a1-mbox3rdPartyId")
    page.click("#liquid-add-attribute")
    tier = rows.nth(2)
    tier.locator(".attr-name").fill("custom_attribute.tier")
    tier.locator('.attr-value[data-user="0"]').fill("gold")
    tier.locator('.attr-value[data-user="2"]').fill("silver")
    page.fill("#liquid-source", (
        f"{{% connected_content {live_proxy}/v1/adobe-target/profile?third_party_id={{{{${{user_id}}}}}} :save target %}}\n"
        "Tier {{custom_attribute.${tier} | default: 'none'}}\n"
        "{% if target.profile.user_points > 2000 %}Free pastry{% endif %}"))
    page.click("#liquid-render")
    results = page.locator(".liquid-result")
    expect(results).to_have_count(3)
    expect(results.nth(0).locator(".liquid-output")).to_contain_text("Tier gold")
    expect(results.nth(1).locator(".liquid-output")).to_contain_text("Tier none")
    third = results.nth(2)
    expect(third.locator(".liquid-output")).to_contain_text("Tier silver")
    # Target's points are a string: Braze prints the error, and the linter says so beside it
    expect(third.locator(".liquid-output")).to_contain_text("Liquid error: comparison of String with 2000 failed")
    warning = third.locator('.liquid-warnings li[data-code="string_number_comparison"]')
    expect(warning).to_have_count(1)
    expect(warning).to_have_attribute("data-line", "3")
    expect(warning).to_contain_text("target.numbers.user_points")
    # Warnings sit beside the output, not below it.
    output_box = third.locator(".liquid-output").bounding_box()
    warning_box = warning.bounding_box()
    assert output_box and warning_box and warning_box["x"] > output_box["x"] + output_box["width"] - 1
    # Removing a user removes its column.
    page.locator('#liquid-attributes thead th[data-user="1"] .liquid-remove-user').click()
    page.click("#liquid-render")
    expect(results).to_have_count(2)
    expect(results.nth(1).locator(".liquid-output")).to_contain_text("Tier silver")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "preview-liquid-warnings.png"), full_page=True)
