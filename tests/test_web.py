"""The chat and labeling pages in a real headless Chromium (Debian's `chromium`, driven by
Playwright with the system browser): every action a person takes lands as the right store rows.
Screenshots are saved as test artifacts in build/screenshots/ (chat-tiny.png, compare-tiny.png,
label-tiny.png; the model is a random tiny one, so the answers are gibberish; the README's
screenshots come from test_web_screenshots.py with a real model)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from chatforge import feedback as F
from chatforge.serve.config import ServeConfig
from chatforge.store import ConversationRow, Feedback, Generation, Message, RankingItem, RankingRow
from chatforge import checkpoint
from chatforge.model import GPT, GPTConfig
from serve_helpers import LiveServer, slow_engine

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need the `playwright` package (pip install -e '.[dev]')")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="the browser tests need Debian's chromium (apt-get install -y chromium); .ci/run installs it")
ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "screenshots"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def tiny_long_context(tok, path: Path) -> Path:
    """serve_helpers' tiny model with room for a few turns (the browser session is several turns long)."""
    m = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=512, block="llama"))
    m.init_weights(3)
    return checkpoint.save(path, m, tok, {"stage": "test"})


@pytest.fixture(scope="module")
def server(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("browser")
    ckpt = tiny_long_context(tok, root / "tiny")
    cfg = ServeConfig(models=[str(ckpt)], db=f"sqlite:///{root / 'chatforge.db'}", dtype="fp32", max_batch=4)
    with LiveServer(cfg) as s:
        s.key = s.store.create_key("alice")[1]
        s.key_bob = s.store.create_key("bob", role="labeler")[1]
        yield s


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def rank_answers(page, cards: str, order: tuple[int, ...], n: int = 3, timeout: float = 30000) -> list[str]:
    """Wait for `n` answer cards (the CSS selector `cards`), click "Next best" on them in `order`
    (best first) and return the cards' message ids."""
    page.wait_for_function(f"() => document.querySelectorAll('{cards}').length === {n}", timeout=timeout)
    found = page.locator(cards)
    ids = [found.nth(i).get_attribute("data-id") for i in range(n)]
    for i in order:
        found.nth(i).locator(".pick").click()
    return ids


def sign_in(page, server, key: str, path: str = "/") -> None:
    page.goto(server.base_url + path)
    page.fill("#key-input", key)
    page.click("#sign-in")
    page.wait_for_selector("#signin", state="hidden")


def rows(server, model, *where):
    with server.store.session() as s:
        return list(s.execute(sa.select(model).where(*where)).scalars())


def test_chat_page_stream_feedback_edit_compare_reload(server, browser):
    """Guards the chat page end to end in a real browser: a streamed answer (seen growing, then
    stored as the model's own output), thumbs down with a reason, an edited answer saved as a
    demonstration, a 3-way compare ranked by clicks, stop, and the conversation found again
    after a reload; each checked as store rows."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    sign_in(page, server, server.key)
    page.click("#settings-toggle")
    page.fill("#system", "Be brief.")
    page.fill("#max-tokens", "12")
    page.click("#settings-toggle")
    # 1. a streamed answer: slow the engine so the page shows the answer growing before it ends
    step = server.model.engine.step
    slow_engine(server.model, 0.08)
    try:
        page.fill("#prompt", "Hello 你好, what is **Markdown**?")
        page.keyboard.press("Enter")
        page.wait_for_function("() => { const b = document.querySelector('.live .body'); return b && b.textContent.length > 0 "
                               "&& !document.getElementById('stop').hidden; }", timeout=20000)
    finally:
        server.model.engine.step = step
    answer = page.wait_for_selector(".msg.assistant[data-id]", timeout=20000)
    mid = answer.get_attribute("data-id")
    msg = rows(server, Message, Message.id == mid)[0]
    gen = rows(server, Generation, Generation.id == msg.generation_id)[0]
    assert gen.output == msg.content and gen.completion_tokens > 0 and gen.sampling["max_new_tokens"] == 12
    conv = rows(server, ConversationRow, ConversationRow.id == msg.conversation_id)[0]
    assert conv.source == "chat" and conv.title == "Hello 你好, what is **Markdown**?"
    user = rows(server, Message, Message.id == msg.parent_id)[0]
    assert user.content == "Hello 你好, what is **Markdown**?" and rows(server, Message, Message.id == user.parent_id)[0].content == "Be brief."
    assert page.inner_text(".msg.user") == "Hello 你好, what is **Markdown**?"  # user text is shown as typed, never as HTML
    # 2. thumbs down with a reason
    page.click(f'[data-id="{mid}"] .thumb-down')
    page.fill(f'[data-id="{mid}"] .reason-input', "too short")
    page.click(f'[data-id="{mid}"] .reason-submit')
    page.wait_for_selector(f'[data-id="{mid}"] .thumb-down.on')
    fb = rows(server, Feedback, Feedback.message_id == mid)
    assert [(f.rating, f.reason) for f in fb] == [(-1, "too short")]
    # 3. edit the answer: a person-written sibling, shown in its place, rendered as Markdown
    page.click(f'[data-id="{mid}"] .edit')
    page.fill(f'[data-id="{mid}"] .edit-input', "A better answer:\n\n```python\nprint('hi <b>')\n```\n\nUse `x < y`.")
    page.click(f'[data-id="{mid}"] .edit-save')
    page.wait_for_selector("pre.code code")
    assert page.inner_text("pre.code code") == "print('hi <b>')" and page.locator(".msg.assistant b").count() == 0
    corr = [f for f in rows(server, Feedback, Feedback.message_id == mid) if f.correction_id]
    assert len(corr) == 1
    edited = rows(server, Message, Message.id == corr[0].correction_id)[0]
    assert edited.generation_id is None and edited.parent_id == user.id and edited.content.startswith("A better answer")
    page.screenshot(path=str(ARTIFACTS / "chat-tiny.png"))
    # 4. compare three answers and rank them by clicking "Next best" in order
    page.select_option("#compare", "3")
    page.fill("#prompt", "Give me three ideas")
    page.keyboard.press("Enter")
    ids = rank_answers(page, ".compare .answer-card", (2, 0, 1))
    page.screenshot(path=str(ARTIFACTS / "compare-tiny.png"))
    page.click(".save-ranking")
    page.wait_for_selector("text=Ranking saved")
    (ranking,) = rows(server, RankingRow, RankingRow.conversation_id == conv.id)
    items = sorted(rows(server, RankingItem, RankingItem.ranking_id == ranking.id), key=lambda i: i.rank)
    assert [i.message_id for i in items] == [ids[2], ids[0], ids[1]] and ranking.source == "compare"
    assert len({g.request_id for g in rows(server, Generation, Generation.id.in_([m.generation_id for m in rows(server, Message, Message.id.in_(ids))]))}) == 1
    # 5. stop an answer: the user turn is kept, the partial answer is not
    page.select_option("#compare", "1")
    page.click("#settings-toggle")
    page.fill("#max-tokens", "100")
    page.click("#settings-toggle")
    slow_engine(server.model, 0.2)
    try:
        page.fill("#prompt", "Tell me a long story")
        page.keyboard.press("Enter")
        page.wait_for_function("() => !document.getElementById('stop').hidden && document.querySelector('.live .body').textContent.length > 0",
                               timeout=20000)
        page.click("#stop")
        page.wait_for_selector("text=Stopped")
    finally:
        server.model.engine.step = step
    stopped = rows(server, Message, Message.conversation_id == conv.id, Message.content == "Tell me a long story")
    assert len(stopped) == 1 and not rows(server, Message, Message.parent_id == stopped[0].id)
    # 6. reload: the conversation is in the sidebar and opens with its edited answer and ranking
    page.reload()
    page.wait_for_selector(f'#conv-list li[data-id="{conv.id}"]')
    page.click(f'#conv-list li[data-id="{conv.id}"] .title')
    page.wait_for_selector(".msg.user >> text=Tell me a long story")
    page.wait_for_selector("text=Your ranking (best first)")
    assert page.locator(".msg.system").inner_text().endswith("Be brief.")
    # 7. rename and delete from the sidebar
    page.once("dialog", lambda d: d.accept("Foxes and dogs"))
    page.click(f'#conv-list li[data-id="{conv.id}"] .rename')
    page.wait_for_selector(f'#conv-list li[data-id="{conv.id}"] >> text=Foxes and dogs')
    assert rows(server, ConversationRow, ConversationRow.id == conv.id)[0].title == "Foxes and dogs"
    page.once("dialog", lambda d: d.accept())
    page.click(f'#conv-list li[data-id="{conv.id}"] .delete')
    page.wait_for_selector(f'#conv-list li[data-id="{conv.id}"]', state="detached")
    assert rows(server, ConversationRow, ConversationRow.id == conv.id)[0].deleted_at is not None
    assert page.locator(".empty").inner_text().startswith("Start a conversation")
    assert errors == []
    page.close()


def test_label_page_ranks_samples_and_takes_a_demonstration(server, browser):
    """Guards the labeling page: a queued prompt gets K samples on first view, the labeler's
    click ranking and written demonstration land as rows, and progress/agreement stats show."""
    F.add_label_items(server.store, [[{"role": "user", "content": "Name three colours."}]], "rank")
    F.add_label_items(server.store, [[{"role": "user", "content": "Say hello in Chinese."}]], "demo")
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    sign_in(page, server, server.key_bob, "/label?kind=rank&k=3")
    ids = rank_answers(page, "#item .answer-card", (1, 2, 0))
    page.screenshot(path=str(ARTIFACTS / "label-tiny.png"))
    page.click(".save-ranking")
    page.wait_for_selector("text=The queue is done")
    (ranking,) = rows(server, RankingRow, RankingRow.source == "label")
    assert [i.message_id for i in sorted(rows(server, RankingItem, RankingItem.ranking_id == ranking.id), key=lambda i: i.rank)] == [ids[1], ids[2], ids[0]]
    page.select_option("#kind", "demo")
    page.fill("#demo-input", "你好！")
    page.click(".save-demo")
    page.wait_for_selector("text=The queue is done")
    demo = [f for f in rows(server, Feedback, Feedback.correction_id.is_not(None)) if rows(server, Message, Message.id == f.correction_id)[0].content == "你好！"]
    assert len(demo) == 1 and demo[0].key_id == server.store.find_key("bob").id
    assert "You: 2 of 2 items done" in page.inner_text("#stats")
    assert errors == []
    page.close()


def test_label_page_tells_a_user_key_it_needs_the_labeler_role(server, browser):
    """Guards the labeling page for a key without the labeler role (the queue answers 403): it says
    what is missing and how to get it, with no script error."""
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    sign_in(page, server, server.key, "/label")  # alice: role "user"
    page.wait_for_selector("text=needs a labeler key")
    assert "chatforge keys role alice labeler" in page.inner_text("#item") and errors == []
    page.close()


def test_markdown_renderer_is_safe_and_renders_code(server, browser):
    """Guards the page's Markdown renderer against model output that carries HTML or script:
    nothing becomes an element except the renderer's own tags, links keep only http(s)/mailto
    URLs, and code (also a half-streamed, unclosed fence) is shown verbatim."""
    page = browser.new_page()
    page.goto(server.base_url + "/static/label.html")
    payloads = ["<script>window.pwned = 1</script>", "<img src=x onerror=\"window.pwned = 1\">", "[x](javascript:window.pwned=1)",
                "[ok](https://example.com/a\"onmouseover=\"window.pwned=1)", "**<svg onload=window.pwned=1>**",
                "```html\n<iframe src=\"javascript:1\"></iframe>\n", "`<b>` and <b>bold</b>", "> <a href=x onclick=y>q</a>",
                "3. three\n\n4. four <i>\n- other", "[a_](http://x/_y_)", "see [**b**](https://x/**y**) and _z_ [c](mailto:q_r_s)"]
    found = page.evaluate("""async (payloads) => {
        const { renderMarkdown } = await import('/static/markdown.js');
        const out = [];
        for (const p of payloads) {
            const box = document.createElement('div');
            box.innerHTML = renderMarkdown(p);
            document.body.append(box);
            const tags = [...box.querySelectorAll('*')].map((e) => e.tagName.toLowerCase());
            const attrs = [...box.querySelectorAll('*')].flatMap((e) => [...e.attributes].map((a) => a.name));
            const hrefs = [...box.querySelectorAll('a')].map((a) => a.getAttribute('href'));
            out.push({ tags, attrs, hrefs, text: box.textContent });
        }
        await new Promise((r) => setTimeout(r, 50));
        return { out, pwned: window.pwned || 0 };
    }""", payloads)
    assert found["pwned"] == 0
    allowed_tags = {"p", "br", "strong", "em", "code", "pre", "a", "blockquote", "ul", "ol", "li", "h1", "h2", "h3", "hr"}
    for p, r in zip(payloads, found["out"]):
        assert set(r["tags"]) <= allowed_tags, (p, r)
        assert set(r["attrs"]) <= {"href", "target", "rel", "class", "data-lang", "start"}, (p, r)
        assert all(h.startswith(("https://", "http://", "mailto:")) for h in r["hrefs"]), (p, r)
    assert found["out"][3]["hrefs"] == ['https://example.com/a"onmouseover="window.pwned=1']  # one attribute, quotes kept inside it
    assert found["out"][5]["tags"] == ["pre", "code"] and '<iframe src="javascript:1"></iframe>' in found["out"][5]["text"]
    assert found["out"][6]["text"] == "<b> and <b>bold</b>" and found["out"][6]["tags"] == ["p", "code"]
    assert found["out"][8]["tags"] == ["ol", "li", "li", "ul", "li"] and found["out"][8]["text"] == "threefour <i>\nother"
    # finding 4: emphasis ran after the links were written and rewrote their hrefs
    assert found["out"][9]["hrefs"] == ["http://x/_y_"] and found["out"][9]["tags"] == ["p", "a"] and found["out"][9]["text"] == "a_"
    assert found["out"][10]["hrefs"] == ["https://x/**y**", "mailto:q_r_s"]
    assert found["out"][10]["tags"] == ["p", "a", "strong", "em", "a"] and found["out"][10]["text"] == "see b and z c"
    # finding 4: the page's Content-Security-Policy is in force: markup that slips past any renderer runs no inline handler
    blocked = page.evaluate("""async () => {
        const box = document.createElement('div');
        box.innerHTML = '<img src="/static/nothing.png" onerror="window.inlinePwned = 1">';
        document.body.append(box);
        await new Promise((r) => setTimeout(r, 300));
        return window.inlinePwned || 0;
    }""")
    assert blocked == 0
    page.close()
