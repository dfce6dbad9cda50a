"""Screenshots of the chat page and the ranking views in headless Chromium with a real chat model
(SmolLM2-135M-Instruct), so the answers are readable: build/screenshots/chat.png, compare.png and
label.png. The README shows copies of them from docs/img/ (copy them there to update it). Also
checks that a real model's Markdown answer (greedy, so the same every run) renders with its code
block."""

from __future__ import annotations

import re

import pytest
import sqlalchemy as sa

from chatforge import feedback as F
from chatforge.feedback import queue as FQ
from chatforge.serve.config import ServeConfig
from chatforge.store import Feedback, Generation, LabelItem, Message
from known_models import known_checkpoint
from serve_helpers import LiveServer
from test_web import ARGS, ARTIFACTS, CHROMIUM, rank_answers, sign_in, sync_api

pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")]


def test_readme_screenshots_with_smollm2(tmp_path):
    """Guards the page with real model output: a greedy answer with a fenced code block renders as
    a code block, a Chinese answer renders and its thumbs-up is stored, and the compare and
    labeling views fill with K real samples, stored as the model's own (finding 7: this test
    used to take the screenshots and assert nothing)."""
    known_checkpoint()  # the model imported (or skip/fail saying why it cannot be had)
    cfg = ServeConfig(models=["smollm2-135m-instruct"], db=f"sqlite:///{tmp_path / 'chatforge.db'}", dtype="fp32", max_batch=4)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with LiveServer(cfg) as server, sync_api.sync_playwright() as p:
        key = server.store.create_key("alice", role="labeler")[1]
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        sign_in(page, server, key)
        page.click("#settings-toggle")
        page.fill("#system", "You are a helpful assistant.")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "160")
        page.click("#settings-toggle")
        page.fill("#prompt", "Write a Python function that checks whether a number is prime.")
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.assistant[data-id] pre.code", timeout=120000)
        code = page.locator(".msg.assistant[data-id] pre.code").first.inner_text()
        assert "def " in code and "return" in code, code  # the fenced Python block arrived as a code block, verbatim
        page.fill("#prompt", "用一句话介绍一下长城。")
        page.keyboard.press("Enter")
        page.wait_for_function("() => document.querySelectorAll('.msg.assistant[data-id]').length === 2", timeout=120000)
        answer = page.locator(".msg.assistant[data-id]").nth(1)
        assert re.search(r"[\u4e00-\u9fff]", answer.inner_text()), answer.inner_text()  # answered in Chinese, rendered as such
        answer.locator(".thumb-up").click()
        page.wait_for_selector(".thumb-up.on")
        with server.store.session() as s:
            rated = s.execute(sa.select(Feedback).where(Feedback.message_id == answer.get_attribute("data-id"))).scalar_one()
        assert rated.rating == 1
        page.screenshot(path=str(ARTIFACTS / "chat.png"))

        page.click("#new-chat")
        page.click("#settings-toggle")
        page.fill("#temperature", "0.8")
        page.fill("#max-tokens", "60")
        page.click("#settings-toggle")
        page.select_option("#compare", "3")
        page.fill("#prompt", "Give me a name for a friendly robot.")
        page.keyboard.press("Enter")
        ids = rank_answers(page, ".compare .answer-card", (1, 0), timeout=120000)
        with server.store.session() as s:  # three real answers of one request, stored as the model's own
            gens = [s.get(Generation, s.get(Message, i).generation_id) for i in ids]
        assert len({g.request_id for g in gens}) == 1 and all(g.output.strip() and g.model == "smollm2-135m-instruct" for g in gens)
        page.screenshot(path=str(ARTIFACTS / "compare.png"))

        F.add_label_items(server.store, [[{"role": "user", "content": "What should I pack for a day hike?"}]], "rank")
        page.goto(server.base_url + "/label?kind=rank&k=3&max_tokens=80")
        rank_answers(page, "#item .answer-card", (2,), timeout=180000)
        page.screenshot(path=str(ARTIFACTS / "label.png"))
        with server.store.session() as s:
            (item,) = s.execute(sa.select(LabelItem)).scalars()
            samples = FQ._item_view(s, item)["samples"]
        assert len(samples) == 3 and all(x["content"].strip() for x in samples)
        assert errors == []
        browser.close()
